"""Standalone evaluation: perplexity in the GPTQ convention, token-level calibration.

Perplexity: the text (documents joined with "\\n\\n") is tokenized once and cut
into non-overlapping windows of ``seq_len`` tokens; each window is scored on its
own (no context carried over), the trailing partial window is dropped, and
perplexity = exp(mean NLL over every predicted token). Confidence is the top-1
next-token probability; ECE uses 15 equal-width bins.

With a shipped calibrator (``compress.formats.calibrator.LMCalibrator``, target tokens) the metrics are
those of the calibrated model: a pure temperature divides the logits first (NLL, perplexity and
ECE all change), a top-label calibrator maps the top-1 confidences (ECE changes; NLL and
perplexity do not). The raw numbers are kept under ``uncalibrated``.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibration.metrics import expected_calibration_error
from compress.errors import CompressError


def window_token_ids(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[n_windows, seq_len] token ids, non-overlapping, in text order."""
    if seq_len < 2:
        raise CompressError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise CompressError(f"the evaluation text has {len(ids)} tokens, fewer than one window of "
                            f"seq_len={seq_len}; use a longer text or a smaller seq_len")
    if max_windows is not None:
        n = min(n, max_windows)
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@torch.no_grad()
def evaluate_windows(model, windows: torch.Tensor, *, batch_size: int = 1, device=None,
                     progress: bool = True, n_bins: int = 15, calibrator=None, desc: str = "eval") -> dict:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    nll_sum, n_tok, n_correct = 0.0, 0, 0
    confs, hits = [], []
    raw_nll_sum, raw_confs = 0.0, []  # before the calibrator, when there is one
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(windows), batch_size), desc=desc, unit="batch", disable=not progress):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        labels = ids[:, 1:]
        if calibrator is not None:
            raw_logp = F.log_softmax(logits, dim=-1)
            raw_nll_sum += float(-raw_logp.gather(-1, labels.unsqueeze(-1)).double().sum())
            raw_confs.append(raw_logp.max(dim=-1).values.exp().flatten().cpu())
            del raw_logp
            logits = calibrator.scale_logits(logits)
        logp = F.log_softmax(logits, dim=-1)
        nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        conf, pred = logp.max(dim=-1)
        conf = conf.exp() if calibrator is None else calibrator.confidence(conf.exp())
        hit = pred == labels
        nll_sum += float(nll.double().sum())
        n_tok += labels.numel()
        n_correct += int(hit.sum())
        confs.append(conf.flatten().cpu())
        hits.append(hit.flatten().cpu())
    mean_nll = nll_sum / n_tok
    extra = {}
    if calibrator is not None:
        extra = {"calibrator": calibrator.name, "uncalibrated": {
            "perplexity": math.exp(raw_nll_sum / n_tok), "nll": raw_nll_sum / n_tok,
            "ece": expected_calibration_error(torch.cat(raw_confs), torch.cat(hits), n_bins=n_bins)}}
    return {
        "perplexity": math.exp(mean_nll),
        "nll": mean_nll,
        "tokens": n_tok,
        "windows": int(len(windows)),
        "seq_len": int(windows.shape[1]),
        "top1_accuracy": n_correct / n_tok,
        "ece": expected_calibration_error(torch.cat(confs), torch.cat(hits), n_bins=n_bins),
        "window": f"non-overlapping windows of {windows.shape[1]} tokens, each scored alone",
        "seconds": round(time.perf_counter() - t0, 3),
        **extra,
    }


def evaluate_text(model, tokenizer, text: str, *, seq_len: int = 512, max_windows: int | None = None,
                  batch_size: int = 1, device=None, progress: bool = True, calibrator=None) -> dict:
    windows = window_token_ids(tokenizer, text, seq_len, max_windows)
    return evaluate_windows(model, windows, batch_size=batch_size, device=device, progress=progress,
                            calibrator=calibrator)
