"""A drafter's confidence against acceptance: fit a calibrator on (drafter top-1 probability,
draft token accepted) events, usable as ``speculative_generate(..., calibrator=...)``.

The self-drafter's recipe step fits one on held-out acceptance (compress/draft/selfspec/step.py);
``draft-bench --confidence-threshold`` applies the one a drafter export ships.
"""
from __future__ import annotations

import torch

from calibration import confidence_score, make_calibrator
from compress.draft.agreement import _sequences, score_positions
from compress.errors import CompressError
from compress.formats.calibrator import LMCalibrator


def fit_drafter_calibrator(confidence, accepted=None, *, method: str = "platt", options: dict | None = None,
                           fitted_on: dict | None = None) -> LMCalibrator:
    """Fit on (drafter max-prob, draft accepted) events; the result is a callable conf -> calibrated conf
    for ``speculative_generate(..., calibrator=...)`` / ``draft_eval(..., calibrator=...)``.

    ``confidence`` may also be a ``draft_eval`` result dict carrying per-position ``events``
    ({"confidence": [...], "accepted": [...]}); ``accepted`` is then ignored. Use events from prompts
    other than the ones the calibrated drafter is evaluated on. Monotone methods (platt, temperature,
    isotonic, hcal) keep the order of confidences, so a stopping threshold keeps its meaning.
    """
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
    confs, accs = [], []
    for seq in _sequences(sequences):
        if seq.numel() < 2:
            raise CompressError("scoring a sequence needs at least 2 tokens")
        s = score_positions(target, drafter, seq, 1)
        confs.append(s["confidence"].cpu())
        accs.append(s["agree"].cpu())
    return torch.cat(confs), torch.cat(accs)
