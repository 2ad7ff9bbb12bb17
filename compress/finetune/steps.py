"""Recipe step ``s2ft``: apply S2FT, train the slices, merge them, keep the adapter for export.

    - {algorithm: s2ft, mlp_ratio: 0.05, task: bbc_topics, steps: 100, batch_size: 8, lr: 1e-3}

The step trains on the *train* split of ``corpus`` (``task: bbc_topics``: labelled articles
as instruction data; ``task: lm``: causal-LM windows), then ``handle.remove(merge=True)``:
the model is a plain model again (original unit order, deltas in the weights), so verify,
export and a later quantization step see an ordinary checkpoint. The adapter (deltas +
config, relative to the model as it was *before* this step) goes to
``ctx.state.adapters``; the export writes it into ``s2ft_adapter/``.

Order with other steps:

* pruning -> s2ft: S2FT as recovery; per-layer sizes of the pruned blocks are honoured.
* s2ft -> gptq/rtn: fine-tune, merge, then quantize the merged float weights (supported).
* gptq/rtn -> s2ft: refused. Training would move the weights off the quantization grid and
  the packed weights the export writes would no longer be the model that was verified.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from compress.algorithms import StepContext
from compress.errors import CompressError
from compress.finetune.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_s2ft, read_adapter,
                                       save_adapter)
from compress.finetune.data import check_dataset, lm_dataset, micro_batches, topic_dataset
from compress.finetune.config import S2FTStepConfig
from compress.finetune.training import train
from compress.runtime import on_device

SELECTION_BATCHES = 4  # micro-batches the activation/gradient selection strategies look at


@dataclass
class AdapterSnapshot:
    """An adapter's files in memory (the handle is gone after the merge); ``save`` writes them."""

    config: dict
    tensors: dict[str, torch.Tensor]

    @classmethod
    def of(cls, handle) -> "AdapterSnapshot":
        with tempfile.TemporaryDirectory() as tmp:  # one writer of the format: save_adapter
            meta, tensors = read_adapter(save_adapter(handle, tmp))
        return cls(meta, tensors)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors, str(folder / ADAPTER_WEIGHTS),
                  metadata={"format": "pt", "adapter": self.config["format"]})
        (folder / ADAPTER_CONFIG).write_text(json.dumps(self.config, indent=1) + "\n")
        return folder


def build_dataset(cfg: S2FTStepConfig, tokenizer):
    if cfg.task == "bbc_topics":
        return topic_dataset(tokenizer, cfg.corpus, cfg.split, max_len=cfg.max_len,
                             max_examples=cfg.max_examples, max_chars=cfg.max_chars, seed=cfg.seed)
    return lm_dataset(tokenizer, cfg.corpus, cfg.split, max_len=cfg.max_len, max_examples=cfg.max_examples)


def pad_token_id(tokenizer) -> int:
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if pad is not None:
            return pad
    return 0


def s2ft_step(model: torch.nn.Module, cfg: S2FTStepConfig, ctx: StepContext) -> dict:
    """Apply S2FT, train the selected slices on the task's train split, merge, keep the adapter."""
    if ctx.state.quant:
        raise CompressError(f"{ctx.where}: fine-tuning after quantization would move the weights off the "
                            f"quantization grid; put the s2ft stage before the quantization stage")
    s2ft_cfg, train_cfg = cfg.s2ft(), cfg.training()
    dataset = build_dataset(cfg, ctx.tokenizer)
    check_dataset(dataset)
    pad = pad_token_id(ctx.tokenizer)
    with on_device(model, ctx.device):
        batches = None
        if s2ft_cfg.strategy in ("activation", "gradient"):
            stream = micro_batches(dataset, cfg.batch_size, cfg.seed, pad_id=pad)
            batches = [{k: v.to(ctx.device) for k, v in next(stream).items()} for _ in range(SELECTION_BATCHES)]
        handle = apply_s2ft(model, s2ft_cfg, batches)
        try:
            result = train(model, handle.named_parameters(), dataset, train_cfg, pad_id=pad, device=ctx.device,
                           progress=ctx.progress, desc="s2ft")
            snapshot = AdapterSnapshot.of(handle)
        except BaseException:
            handle.remove(merge=False)  # leave the model as it came
            raise
        trainable = handle.num_trainable()
        handle.remove(merge=True)
    adapters = ctx.state.adapters  # folder name in the export -> AdapterSnapshot
    name = "s2ft_adapter" if "s2ft_adapter" not in adapters else f"s2ft_adapter_{len(adapters) + 1}"
    adapters[name] = snapshot
    total = sum(p.numel() for p in model.parameters())
    selection = snapshot.config["selection"]
    return {"task": cfg.task, "corpus": cfg.corpus, "train_examples": len(dataset),
            "trainable_params": trainable, "trainable_fraction": round(trainable / total, 6),
            "kv_groups_selected": sum(map(len, selection["attention_kv_heads"])),
            "channels_selected": sum(map(len, selection["mlp_channels"])),
            "adapter": name, **result.report()}

