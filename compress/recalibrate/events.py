"""What a calibrator is fitted on: next-token events of a language model over token windows
(top-1 confidence, whether it was right, and the full logits of a sample of positions), and the
BBC-topic label scores of labelled articles.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from calibration import confidence_score, make_calibrator
from compress.errors import CompressError
from compress.formats.calibrator import LMCalibrator
from compress.tasks import bbc_topic_examples, topic_label_logits


@dataclass
class TokenEvents:
    confidence: torch.Tensor  # [N] top-1 next-token probability
    correct: torch.Tensor  # [N] bool: the argmax was the next token
    logits: torch.Tensor | None  # [K, V] full logits of K sampled positions (None when not kept)
    labels: torch.Tensor | None  # [K] their next tokens


def logit_rows_within(vocab_size: int, max_logit_mb: float) -> int:
    """How many full-vocabulary float32 logit rows fit in ``max_logit_mb`` MB."""
    return max(1, int(max_logit_mb * 2**20 // (4 * vocab_size)))


@torch.no_grad()
def token_events(model, windows: torch.Tensor, *, batch_size: int = 1, device=None, keep_logits: int = 0,
                 seed: int = 0, progress: bool = False) -> TokenEvents:
    """Next-token (confidence, correct) at every position of ``windows`` [n, L] (each window scored
    alone), plus the full logits of ``keep_logits`` positions drawn uniformly (seeded) from all of them.

    ``no_grad``, not ``inference_mode``: the kept logits are fitted with autograd afterwards.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    n, per = windows.shape[0], windows.shape[1] - 1
    keep = torch.zeros(n * per, dtype=torch.bool)
    if keep_logits:
        keep[torch.randperm(n * per, generator=torch.Generator().manual_seed(seed))[:keep_logits]] = True
    confs, hits, kept, kept_labels = [], [], [], []
    for start in tqdm(range(0, n, batch_size), desc="recalibrate", unit="batch", disable=not progress):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        labels = ids[:, 1:]
        conf, pred = logits.softmax(-1).max(-1)
        confs.append(conf.flatten().cpu())
        hits.append((pred == labels).flatten().cpu())
        rows = keep[start * per:(start + len(ids)) * per].to(device)
        if bool(rows.any()):
            kept.append(logits.reshape(-1, logits.shape[-1])[rows].cpu())
            kept_labels.append(labels.flatten()[rows].cpu())
    return TokenEvents(torch.cat(confs), torch.cat(hits), torch.cat(kept) if kept else None,
                       torch.cat(kept_labels) if kept else None)


def fit_token_calibrator(method: str, events: TokenEvents, *, options: dict | None = None,
                         fitted_on: dict | None = None) -> LMCalibrator:
    """``temperature``: on the kept full logits; any other method: top-label binary form on all events."""
    cal = make_calibrator(method, **(options or {}))
    if method == "temperature":
        if events.logits is None:
            raise CompressError("temperature on tokens needs full logits: collect them with keep_logits > 0")
        cal.fit(events.logits, events.labels)
        return LMCalibrator(cal, "tokens", "logits", fitted_on or {})
    cal.fit(confidence_score(events.confidence), events.correct.long())
    return LMCalibrator(cal, "tokens", "top_label", fitted_on or {})


def topic_events(model, tokenizer, split: str, *, max_examples: int | None, max_chars: int, seed: int,
                 device=None, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """([N, 5] label-word log-probabilities, [N] labels, N) of BBC articles of ``split``."""
    examples = bbc_topic_examples(split, max_examples=max_examples, max_chars=max_chars, seed=seed)
    logits, labels = topic_label_logits(model, tokenizer, examples, device=device, batch_size=8, progress=progress)
    return logits, labels, len(examples)
