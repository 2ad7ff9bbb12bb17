"""Input checks shared by the calibrators and the metrics: one error type, messages that name the value.

``CalibrationError`` is a ``ValueError`` (what callers of a numeric library expect). This
package stands alone: it imports nothing of ``compress`` (whose CLI counts a CalibrationError
as a user error, like its own).
"""
from __future__ import annotations

import torch


class CalibrationError(ValueError):
    """Bad input to a calibrator or a metric; the message names the offending value."""


def as_tensor(x, name: str) -> torch.Tensor:
    """A tensor view of a torch tensor or a numpy array / list (torch tensors keep their device)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CalibrationError(f"{name} must be a tensor or an array, got {type(x).__name__}: {exc}") from exc


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    """[N, C] floating logits, C >= 2; a 1-D input is a binary score s (the logit of class 1) → [N, 2] = [0, s]."""
    z = as_tensor(logits, name)
    if not z.is_floating_point():
        z = z.float()
    if z.dim() == 1:
        z = torch.stack([torch.zeros_like(z), z], dim=1)
    if z.dim() != 2:
        raise CalibrationError(f"{name} must be [N, C] (or a 1-D binary score), got shape {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise CalibrationError(f"{name} is empty: no examples to calibrate")
    if z.shape[1] < 2:
        raise CalibrationError(f"{name} has {z.shape[1]} class column(s); calibration needs at least 2")
    bad = ~torch.isfinite(z)
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise CalibrationError(f"{name} has {int(bad.sum())} non-finite value(s) (NaN or inf), the first at "
                               f"index {first} = {z[first].item()}; clean or clamp them before calibrating")
    return z


def check_labels(labels, n: int, n_classes: int, name: str = "labels") -> torch.Tensor:
    """[N] integer class ids in [0, n_classes)."""
    y = as_tensor(labels, name)
    if y.dim() != 1:
        raise CalibrationError(f"{name} must be 1-D class ids, got shape {tuple(y.shape)}")
    if y.numel() != n:
        raise CalibrationError(f"logits have {n} rows but {name} has {y.numel()} entries; they must match")
    if y.dtype == torch.bool:
        y = y.long()
    elif y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise CalibrationError(f"{name} must be integer class ids, got non-integer values "
                                   f"(e.g. {y[(y != y.round()) | ~torch.isfinite(y)][0].item()})")
        y = y.long()
    else:
        y = y.long()
    out = (y < 0) | (y >= n_classes)
    if bool(out.any()):
        i = int(out.nonzero()[0])
        raise CalibrationError(f"{name}[{i}] = {int(y[i])} is out of range: class ids must be in [0, {n_classes}) "
                               f"for {n_classes} logit columns ({int(out.sum())} out of range in all)")
    return y


def check_fit_inputs(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated (logits [N, C], labels [N] on the logits' device); the labels must hold at least two classes."""
    z = check_logits(logits)
    y = check_labels(labels, z.shape[0], z.shape[1]).to(z.device)
    first = y[0]
    if bool((y == first).all()):
        raise CalibrationError(f"the calibration split has a single class (every label is {int(first)}, "
                               f"{y.numel()} examples): a calibrator cannot be fitted on it; use a larger or "
                               f"shuffled calibration split")
    return z, y


def check_confidence(confidence, correct) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float64 (confidence, correct) on the confidence's device, equal lengths, non-empty."""
    c = as_tensor(confidence, "confidence").to(torch.float64).flatten()
    h = as_tensor(correct, "correct").to(device=c.device, dtype=torch.float64).flatten()
    if c.numel() != h.numel():
        raise CalibrationError(f"confidence has {c.numel()} values but correct has {h.numel()}")
    if c.numel() == 0:
        raise CalibrationError("no predictions to score")
    if not bool(torch.isfinite(c).all()):
        raise CalibrationError(f"confidence has {int((~torch.isfinite(c)).sum())} non-finite value(s) (NaN or inf)")
    return c, h


def check_probs(probs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C] float64 probabilities (rows need not be exactly normalised) and [N] labels in range."""
    p = as_tensor(probs, "probs").to(torch.float64)
    if p.dim() == 1:  # binary: the probability of class 1
        p = torch.stack([1 - p, p], dim=1)
    if p.dim() != 2 or p.shape[0] == 0:
        raise CalibrationError(f"probs must be a non-empty [N, C] array, got shape {tuple(p.shape)}")
    if not bool(torch.isfinite(p).all()):
        raise CalibrationError(f"probs has {int((~torch.isfinite(p)).sum())} non-finite value(s) (NaN or inf)")
    y = check_labels(labels, p.shape[0], p.shape[1]).to(p.device)
    return p, y
