"""Recipe step ``recalibrate`` and the language-model uses of ``calibration/``.

    - {algorithm: recalibrate, method: temperature, target: tokens}       # ships T in generation_config
    - {algorithm: recalibrate, method: hcal, target: topics, max_examples: 200}

The step fits a calibrator on a held-out split (``validation`` by default; ``test`` is refused:
verify scores it) of the model *as it is at that point of the recipe*, so put it after the
compressing steps. It stores an ``LMCalibrator`` in ``ctx.artifacts["calibrator"]``; verify
scores through it, the export writes it to ``calibrator/`` and ``load_model`` attaches it.

Targets
- ``tokens``: next-token confidence over non-overlapping windows of ``corpus``/``split``.
  ``temperature`` is fitted on the full-vocabulary logits (exact temperature scaling) of at most
  ``max_logit_mb`` MB of them (default 256 MB: 1,365 tokens of SmolLM2's 49,152-word vocabulary,
  sampled evenly over all windows; L-BFGS keeps ~3 copies, so the fit peaks near 1 GB). It
  rescales the whole distribution: NLL and perplexity change, the argmax does not. Every other
  method is fitted in the top-label binary form on all tokens: score logit(max p), label "the
  argmax was right"; it maps the top-1 confidence only, so ECE changes and NLL / perplexity do
  not (no calibrated full distribution is defined).
- ``topics``: the five BBC label-word scores (``compress.tasks.topic_label_logits``) of
  ``max_examples`` articles; any method applies to the [N, 5] logits.

Other uses (functions below): a logistic head on ``minilm-l6`` mean-pooled embeddings
(``embedding_topic_logits``), and a drafter's confidence against acceptance
(``fit_drafter_calibrator``, usable as ``speculative_generate(..., calibrator=...)``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from compress.algorithms import StepContext, register_algorithm
from compress.config import StepConfig
from compress.errors import CompressError
from compress.runtime import on_device
from compress.formats.calibrator import (CALIBRATOR_DIR, USE_FILE, LMCalibrator, attached_calibrator,  # noqa: F401
                                         load_lm_calibrator)

ARTIFACT_KEY = "calibrator"
FIT_SPLITS = ("train", "validation")


# -- (a) next-token confidence ---------------------------------------------------------------------

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
    from tqdm.auto import tqdm
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
    from calibration import confidence_score, make_calibrator
    cal = make_calibrator(method, **(options or {}))
    if method == "temperature":
        if events.logits is None:
            raise CompressError("temperature on tokens needs full logits: collect them with keep_logits > 0")
        cal.fit(events.logits, events.labels)
        return LMCalibrator(cal, "tokens", "logits", fitted_on or {})
    cal.fit(confidence_score(events.confidence), events.correct.long())
    return LMCalibrator(cal, "tokens", "top_label", fitted_on or {})


# -- (d) drafter confidence against acceptance -----------------------------------------------------

def fit_drafter_calibrator(confidence, accepted=None, *, method: str = "platt", options: dict | None = None,
                           fitted_on: dict | None = None) -> LMCalibrator:
    """Fit on (drafter max-prob, draft accepted) events; the result is a callable conf -> calibrated conf
    for ``speculative_generate(..., calibrator=...)`` / ``draft_eval(..., calibrator=...)``.

    ``confidence`` may also be a ``draft_eval`` result dict carrying per-position ``events``
    ({"confidence": [...], "accepted": [...]}); ``accepted`` is then ignored. Use events from prompts
    other than the ones the calibrated drafter is evaluated on. Monotone methods (platt, temperature,
    isotonic, hcal) keep the order of confidences, so a stopping threshold keeps its meaning.
    """
    from calibration import confidence_score, make_calibrator
    if isinstance(confidence, dict):
        events = confidence.get("events")
        if not events:
            raise CompressError("this draft_eval result has no per-position 'events' (confidence, accepted); "
                                "pass the two arrays instead")
        confidence, accepted = events["confidence"], events["accepted"]
    if accepted is None:
        raise CompressError("fit_drafter_calibrator needs the acceptance of each confidence (accepted=...)")
    conf = torch.as_tensor(confidence, dtype=torch.float64)
    acc = torch.as_tensor(accepted).long()
    cal = make_calibrator(method, **(options or {})).fit(confidence_score(conf), acc)
    return LMCalibrator(cal, "drafter", "top_label", fitted_on or {"events": int(conf.numel())})


def drafter_events(target, drafter, sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """(drafter confidence, greedy acceptance) at every position of the given token sequences, from
    ``compress.draft.agreement.score_positions`` (teacher-forced, one pass of each model)."""
    from compress.draft.agreement import _sequences, score_positions
    confs, accs = [], []
    for seq in _sequences(sequences):
        if seq.numel() < 2:
            raise CompressError("scoring a sequence needs at least 2 tokens")
        s = score_positions(target, drafter, seq, 1)
        confs.append(s["confidence"].cpu())
        accs.append(s["agree"].cpu())
    return torch.cat(confs), torch.cat(accs)


# -- (c) a logistic head on sentence embeddings ----------------------------------------------------

@torch.no_grad()
def mean_pooled_embeddings(encoder, tokenizer, texts: list[str], *, batch_size: int = 16, max_length: int = 256,
                           device=None) -> torch.Tensor:
    """[N, H] float32 (CPU) attention-masked mean of the encoder's last hidden states."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = encoder(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1)).cpu())
    return torch.cat(out)


def embedding_topic_logits(encoder, tokenizer, train, evaluate: dict, *, C: float = 1.0, max_iter: int = 1000,
                           batch_size: int = 16, max_length: int = 256, device=None) -> dict:
    """A scikit-learn LogisticRegression on mean-pooled embeddings of ``train`` (TopicExamples);
    returns {name: (logits [N, C] float32, labels [N])} for every list in ``evaluate`` (the decision
    function: softmax of it is the head's predict_proba). Fit calibrators on one of them
    (e.g. validation) and score on another (test)."""
    from sklearn.linear_model import LogisticRegression

    def embed(examples):
        return mean_pooled_embeddings(encoder, tokenizer, [e.text for e in examples], batch_size=batch_size,
                                      max_length=max_length, device=device)

    y = [e.label for e in train]
    if len(set(y)) < 2:
        raise CompressError("the logistic head needs training examples of at least 2 classes")
    head = LogisticRegression(C=C, max_iter=max_iter).fit(embed(train).numpy(), y)
    n_classes = max(max(y), *(e.label for ex in evaluate.values() for e in ex)) + 1
    out = {}
    for name, examples in evaluate.items():
        scores = torch.from_numpy(head.decision_function(embed(examples).numpy())).float()
        if scores.dim() == 1:  # two classes: sklearn gives the class-1 margin
            scores = torch.stack([torch.zeros_like(scores), scores], 1)
        logits = torch.full((len(examples), n_classes), -1e4)  # classes the head never saw: ~0 probability
        logits[:, torch.as_tensor(head.classes_)] = scores
        out[name] = (logits, torch.tensor([e.label for e in examples]))
    return out


# -- the recipe step -------------------------------------------------------------------------------

class RecalibrateConfig(StepConfig):
    """``targets`` / ``ignore`` (inherited) are not used: the step changes no module."""

    algorithm: Literal["recalibrate"] = "recalibrate"
    method: str = "temperature"
    options: dict[str, Any] = Field(default_factory=dict, description="the calibrator's own options")
    target: Literal["tokens", "topics"] = "tokens"
    corpus: str = "bbc"
    split: str = Field("validation", description="train or validation; never test (verify scores it)")
    seq_len: int = Field(512, ge=8, le=131_072, description="tokens: window length")
    max_windows: int | None = Field(16, ge=1, description="tokens: windows of the split (None: all)")
    max_logit_mb: float = Field(256, gt=0, le=65_536,
                                description="tokens + temperature: MB of full float32 logits kept for the fit")
    max_examples: int | None = Field(200, ge=1, description="topics: articles of the split (None: all)")
    max_chars: int = Field(600, ge=1, description="topics: article characters in the prompt")
    batch_size: int = Field(1, ge=1, le=4096)
    seed: int = 0

    @field_validator("split")
    @classmethod
    def _not_test(cls, v: str) -> str:
        if v in FIT_SPLITS:
            return v
        why = (" verify evaluates on the test split, and a calibrator fitted there would be graded on its own "
               "fitting data" if v in ("test", "all") else "")
        raise ValueError(f"recalibrate fits on split {v!r}, which is not allowed:{why}; use "
                         f"{' or '.join(FIT_SPLITS)}")

    @field_validator("corpus")
    @classmethod
    def _corpus_known(cls, v: str) -> str:
        from compress.data import list_corpora
        if v in list_corpora() or Path(v).expanduser().exists():
            return v
        raise ValueError(f"unknown corpus {v!r}; known: {', '.join(list_corpora())}, or a path to a .txt/.jsonl file")

    @model_validator(mode="after")
    def _method_and_target(self) -> "RecalibrateConfig":
        from calibration import CALIBRATORS, make_calibrator
        if self.method not in CALIBRATORS:
            raise ValueError(f"unknown calibrator {self.method!r}; allowed: {', '.join(sorted(CALIBRATORS))}")
        make_calibrator(self.method, **self.options)  # bad options fail at validation, not after the forwards
        if self.target == "topics" and self.corpus != "bbc":
            raise ValueError(f"target topics scores the BBC topic labels; corpus must be bbc, got {self.corpus!r}")
        if self.target == "topics" and self.method == "platt":
            raise ValueError("platt is binary; the topics target has 5 classes (use temperature, vector, matrix, "
                             "histogram, isotonic or hcal)")
        return self


@register_algorithm("recalibrate", RecalibrateConfig, requires_calibration=False)
def apply_recalibrate(model: torch.nn.Module, cfg: RecalibrateConfig, ctx: StepContext) -> dict:
    """Fit a confidence calibrator (next-token or BBC-topic) on a held-out split; verify applies it,
    the export ships it."""
    if ARTIFACT_KEY in ctx.artifacts:
        raise CompressError(f"{ctx.where}: an earlier recalibrate step already fitted a calibrator; a recipe ships "
                            f"one (put a single recalibrate step after the compressing steps)")
    t0 = time.perf_counter()
    with on_device(model, ctx.device):
        if cfg.target == "tokens":
            lm_cal, fit_report = _fit_tokens(model, cfg, ctx)
        else:
            lm_cal, fit_report = _fit_topics(model, cfg, ctx)
    ctx.artifacts[ARTIFACT_KEY] = lm_cal
    return {**lm_cal.describe(), "fit_split": fit_report, "fit_seconds": round(time.perf_counter() - t0, 3)}


def _fit_tokens(model, cfg: RecalibrateConfig, ctx: StepContext) -> tuple[LMCalibrator, dict]:
    from calibration import expected_calibration_error
    from compress.data import corpus_text
    from compress.evaluate import window_token_ids
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
    from calibration import calibration_report, make_calibrator
    from compress.tasks import bbc_topic_examples, topic_label_logits
    examples = bbc_topic_examples(cfg.split, max_examples=cfg.max_examples, max_chars=cfg.max_chars, seed=cfg.seed)
    logits, labels = topic_label_logits(model, ctx.tokenizer, examples, device=ctx.device, batch_size=8,
                                        progress=ctx.progress)
    cal = make_calibrator(cfg.method, **cfg.options).fit(logits, labels)
    lm_cal = LMCalibrator(cal, "topics", "logits", {"corpus": "bbc", "split": cfg.split,
                                                    "examples": len(examples), "max_chars": cfg.max_chars})
    before, after = calibration_report(logits.softmax(-1), labels), calibration_report(cal.transform(logits), labels)
    return lm_cal, {"ece_before": before["ece"], "ece_after": after["ece"], "accuracy_before": before["accuracy"],
                    "accuracy_after": after["accuracy"], "in_sample": True}
