"""The ``recalibrate`` step: fit the recipe's calibrator on a held-out split of the model as it is at
that point of the recipe (``target: tokens`` on next-token events, ``target: topics`` on the BBC
label scores) and leave it for verify and the export.
"""
from __future__ import annotations

import time

import torch

from calibration import calibration_report, expected_calibration_error, make_calibrator
from compress.algorithms import StepContext
from compress.data import corpus_text
from compress.errors import CompressError
from compress.evaluate import window_token_ids
from compress.formats.calibrator import LMCalibrator
from compress.recalibrate.config import RecalibrateConfig
from compress.recalibrate.events import fit_token_calibrator, logit_rows_within, token_events, topic_events
from compress.runtime import on_device

def apply_recalibrate(model: torch.nn.Module, cfg: RecalibrateConfig, ctx: StepContext) -> dict:
    """Fit a confidence calibrator (next-token or BBC-topic) on a held-out split; verify applies it,
    the export ships it."""
    if ctx.state.calibrator is not None:
        raise CompressError(f"{ctx.where}: an earlier recalibrate step already fitted a calibrator; a recipe ships "
                            f"one (put a single recalibrate step after the compressing steps)")
    t0 = time.perf_counter()
    with on_device(model, ctx.device):
        if cfg.target == "tokens":
            lm_cal, fit_report = _fit_tokens(model, cfg, ctx)
        else:
            lm_cal, fit_report = _fit_topics(model, cfg, ctx)
    ctx.state.calibrator = lm_cal
    return {**lm_cal.describe(), "fit_split": fit_report, "fit_seconds": round(time.perf_counter() - t0, 3)}


def _fit_tokens(model, cfg: RecalibrateConfig, ctx: StepContext) -> tuple[LMCalibrator, dict]:
    windows = window_token_ids(ctx.tokenizer, corpus_text(cfg.corpus, cfg.split), cfg.seq_len, cfg.max_windows)
    vocab = model.get_output_embeddings().weight.shape[0]
    keep = logit_rows_within(vocab, cfg.max_logit_mb) if cfg.method == "temperature" else 0
    events = token_events(model, windows, batch_size=cfg.batch_size, device=ctx.device, keep_logits=keep,
                          seed=cfg.seed, progress=ctx.progress)
    fitted_on = {"corpus": cfg.corpus, "split": cfg.split, "windows": int(windows.shape[0]),
                 "seq_len": cfg.seq_len, "tokens": int(events.confidence.numel())}
    if keep:
        fitted_on["logit_rows"] = int(events.labels.numel())
    lm_cal = fit_token_calibrator(cfg.method, events, options=cfg.options, fitted_on=fitted_on)
    # In-sample ECE on the fitting split (the held-out number is verify's).
    if lm_cal.form == "logits":
        conf_after = lm_cal.calibrator.transform(events.logits).max(-1).values
        conf_before, hit = events.logits.softmax(-1).max(-1).values, events.logits.argmax(-1) == events.labels
    else:
        conf_before, hit = events.confidence, events.correct
        conf_after = lm_cal.confidence(events.confidence)
    return lm_cal, {"ece_before": expected_calibration_error(conf_before, hit),
                    "ece_after": expected_calibration_error(conf_after, hit), "in_sample": True}


def _fit_topics(model, cfg: RecalibrateConfig, ctx: StepContext) -> tuple[LMCalibrator, dict]:
    logits, labels, n = topic_events(model, ctx.tokenizer, cfg.split, max_examples=cfg.max_examples,
                                     max_chars=cfg.max_chars, seed=cfg.seed, device=ctx.device, progress=ctx.progress)
    cal = make_calibrator(cfg.method, **cfg.options).fit(logits, labels)
    lm_cal = LMCalibrator(cal, "topics", "logits", {"corpus": "bbc", "split": cfg.split,
                                                    "examples": n, "max_chars": cfg.max_chars})
    before, after = calibration_report(logits.softmax(-1), labels), calibration_report(cal.transform(logits), labels)
    return lm_cal, {"ece_before": before["ece"], "ece_after": after["ece"], "accuracy_before": before["accuracy"],
                    "accuracy_after": after["accuracy"], "in_sample": True}
