"""Speculative decoding on the models' own forward with transformers' dynamic caches: any causal
LM, no compilation. ``EagerDecoder`` is the decoder; ``speculative_generate`` / ``target_generate``
run compress/draft/loop.py's one loop on two models."""
from __future__ import annotations

from typing import Iterable

import torch

from compress.draft.loop import run_speculative, run_target
from compress.draft.speculative import Calibrator, SpecResult, context_length, model_device, pad_rows


class EagerDecoder:
    """A model on its own forward with a ``DynamicCache``, cropped by length after every round."""

    def __init__(self, model: torch.nn.Module, name: str = "model"):
        self.model, self.name = model, name
        self.device = model_device(model)
        self.context = context_length(model)
        self.reset()

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, keep: int = 1, pad_to: int | None = None) -> torch.Tensor:
        ids = ids.to(self.device)
        real = ids.numel()
        if pad_to is not None:  # padding rows repeat the last id; their results are dropped
            ids = pad_rows(ids, pad_to)
        n = ids.numel()
        out = self.model(input_ids=ids[None], past_key_values=self.cache, use_cache=True,
                         logits_to_keep=n - real + keep)
        self.length += n
        return out.logits[0, :keep].float()  # the last `keep` real positions

    def rewind(self, length: int) -> None:
        extra = self.length - length
        if extra > 0:
            self.cache.crop(-extra)  # negative = remove from the end, in transformers 5.17 and 5.23 alike
            self.length = length

    def reset(self) -> None:
        from transformers import DynamicCache  # transformers loads slowly; only decoding needs it

        self.cache, self.length = DynamicCache(config=self.model.config), 0


def target_generate(target: torch.nn.Module, input_ids, max_new_tokens: int, *,
                    eos_token_id: int | Iterable[int] | None = None) -> SpecResult:
    """Baseline: the target alone, greedy, with a KV cache (one target call per new token)."""
    return run_target(EagerDecoder(target, "target"), input_ids, max_new_tokens, eos_token_id=eos_token_id)


def speculative_generate(target: torch.nn.Module, drafter: torch.nn.Module, input_ids, *,
                         max_new_tokens: int, gamma: int, mode: str = "greedy",
                         temperature: float = 1.0, top_p: float | None = None,
                         confidence_threshold: float | None = None,
                         calibrator: Calibrator | None = None, seed: int = 0,
                         eos_token_id: int | Iterable[int] | None = None) -> SpecResult:
    """Generate ``max_new_tokens`` tokens (fewer if ``eos_token_id`` comes) by speculative decoding
    with both models on dynamic caches; greedy output is the target's own greedy decoding."""
    return run_speculative(EagerDecoder(target, "target"), EagerDecoder(drafter, "drafter"), input_ids,
                           max_new_tokens=max_new_tokens, gamma=gamma, mode=mode, temperature=temperature,
                           top_p=top_p, confidence_threshold=confidence_threshold, calibrator=calibrator,
                           seed=seed, eos_token_id=eos_token_id)
