"""Calibration metrics.

Top-label metrics take (confidence, correct): the probability of the predicted
class and whether that prediction was right. Class-wise and proper-scoring
metrics take (probs [N, C], labels [N]).

- ECE (Naeini et al. 2015; Guo et al. 2017): split [0, 1] into equal-width
  bins, ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|. Bins are right-closed, with
  0 in the first bin, as in Guo et al.'s reference code.
- MCE: the largest |acc − conf| over non-empty bins.
- ACE (Nixon et al. 2019, "Measuring Calibration in Deep Learning"), top-label
  form: the same sum over ``n_bins`` equal-mass bins (the predictions sorted by
  confidence and cut into near-equal counts) instead of equal-width ones.
- Class-wise ECE (Kull et al. 2019): the mean over classes k of the ECE of the
  events (p_k, y == k), equal-width bins.
- Brier score (Brier 1950), multi-class form: mean_i Σ_k (p_ik − 1[y_i = k])²
  (in [0, 2]; not divided by C).
- NLL: mean −log p_{i, y_i}, with p clamped below at ``eps`` so that a hard 0
  from a binning calibrator gives a large finite value, not inf.
- AUROC of confidence against correctness: how well the confidence ranks right
  above wrong predictions (scikit-learn's roc_auc_score); undefined when every
  prediction is right or every one is wrong.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from calibration.checks import CalibrationError, as_tensor, check_confidence, check_probs


def _bin_stats(confidence, correct, n_bins: int):
    confidence, correct = check_confidence(confidence, correct)
    if n_bins < 1:
        raise CalibrationError(f"n_bins must be >= 1, got {n_bins}")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=confidence.device)
    idx = torch.bucketize(confidence.clamp(0, 1), edges[1:-1], right=False)  # right-closed bins
    count = torch.bincount(idx, minlength=n_bins).double()
    conf_sum = torch.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    return count, conf_sum, acc_sum


def expected_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """Top-label ECE with ``n_bins`` equal-width bins (default 15)."""
    count, conf_sum, acc_sum = _bin_stats(confidence, correct, n_bins)
    return float((conf_sum - acc_sum).abs().sum() / count.sum())


def maximum_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """The largest |accuracy − confidence| over the non-empty equal-width bins."""
    count, conf_sum, acc_sum = _bin_stats(confidence, correct, n_bins)
    full = count > 0
    return float(((conf_sum[full] - acc_sum[full]).abs() / count[full]).max())


def adaptive_calibration_error(confidence, correct, n_bins: int = 15) -> float:
    """Top-label ECE over ``n_bins`` equal-mass bins (sorted by confidence, cut into near-equal counts)."""
    confidence, correct = check_confidence(confidence, correct)
    if n_bins < 1:
        raise CalibrationError(f"n_bins must be >= 1, got {n_bins}")
    order = confidence.argsort(stable=True)
    gap = 0.0
    for chunk in torch.tensor_split(order, min(n_bins, order.numel())):
        gap += float((confidence[chunk].sum() - correct[chunk].sum()).abs())
    return gap / confidence.numel()


def top_label(probs) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, predicted class) of [N, C] probabilities."""
    p = as_tensor(probs, "probs")
    if p.dim() == 1:
        p = torch.stack([1 - p, p], dim=1)
    conf, pred = p.max(dim=1)
    return conf, pred


def classwise_ece(probs, labels, n_bins: int = 15) -> float:
    """Mean over classes of the equal-width ECE of the events (p_k, y == k)."""
    p, y = check_probs(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return sum(expected_calibration_error(p[:, k], onehot[:, k], n_bins) for k in range(p.shape[1])) / p.shape[1]


def brier_score(probs, labels) -> float:
    """Multi-class Brier score: mean over examples of Σ_k (p_k − 1[y = k])²."""
    p, y = check_probs(probs, labels)
    onehot = torch.nn.functional.one_hot(y, p.shape[1]).double()
    return float(((p - onehot) ** 2).sum(dim=1).mean())


def negative_log_likelihood(probs, labels, eps: float = 1e-12) -> float:
    """Mean −log p(true class), p clamped at ``eps`` (nats)."""
    p, y = check_probs(probs, labels)
    return float(-p.gather(1, y[:, None]).clamp_min(eps).log().mean())


def confidence_auroc(confidence, correct) -> float:
    """AUROC of confidence as a score for "this prediction is right"."""
    from sklearn.metrics import roc_auc_score  # scikit-learn is slow to import: this metric only

    c, h = check_confidence(confidence, correct)
    n_right = int(h.sum())
    if n_right in (0, h.numel()):
        raise CalibrationError(f"AUROC of confidence vs correctness is undefined: {n_right} of {h.numel()} "
                               f"predictions are correct (it needs both right and wrong ones)")
    return float(roc_auc_score(h.cpu().numpy(), c.cpu().numpy()))


class ConfidenceInterval(NamedTuple):
    estimate: float
    low: float
    high: float


def bootstrap_ci(metric_fn: Callable[..., float], *arrays, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> ConfidenceInterval:
    """Percentile bootstrap interval of ``metric_fn(*arrays)``, resampling examples (rows) jointly.

    Every array is indexed along its first dimension with the same resample; a
    resample on which the metric is undefined (e.g. AUROC with one outcome) is
    skipped. Binned ECE is biased upward on resamples (Kumar et al. 2019), so
    its percentile interval can sit slightly above the point estimate.
    """
    if n < 1:
        raise CalibrationError(f"bootstrap n must be >= 1, got {n}")
    if not 0 < level < 1:
        raise CalibrationError(f"level must be in (0, 1), got {level}")
    tensors = [as_tensor(a, "array") for a in arrays]
    if not tensors:
        raise CalibrationError("bootstrap_ci needs at least one array to resample")
    rows = tensors[0].shape[0]
    if any(t.shape[0] != rows for t in tensors):
        raise CalibrationError(f"bootstrap_ci arrays differ in length: {[t.shape[0] for t in tensors]}")
    estimate = float(metric_fn(*tensors))
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(n):
        idx = torch.randint(rows, (rows,), generator=gen)
        try:
            values.append(float(metric_fn(*(t[idx.to(t.device)] for t in tensors))))
        except CalibrationError:
            continue
    if not values:
        raise CalibrationError("the metric was undefined on every bootstrap resample")
    v = torch.tensor(values, dtype=torch.float64)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(v, q).tolist()
    return ConfidenceInterval(estimate, low, high)


def calibration_report(probs, labels, n_bins: int = 15, bootstrap: int = 0, seed: int = 0) -> dict:
    """Every metric of this module for [N, C] probabilities; ``bootstrap`` > 0 adds 95% intervals for ECE and NLL.

    ``auroc`` is None when every prediction is right or every one is wrong.
    """
    p, y = check_probs(probs, labels)
    conf, pred = top_label(p)
    correct = (pred == y).double()
    try:
        auroc = confidence_auroc(conf, correct)
    except CalibrationError:
        auroc = None
    report = {
        "n": p.shape[0], "n_classes": p.shape[1], "n_bins": n_bins,
        "accuracy": float(correct.mean()),
        "mean_confidence": float(conf.mean()),
        "ece": expected_calibration_error(conf, correct, n_bins),
        "mce": maximum_calibration_error(conf, correct, n_bins),
        "ace": adaptive_calibration_error(conf, correct, n_bins),
        "classwise_ece": classwise_ece(p, y, n_bins),
        "brier": brier_score(p, y),
        "nll": negative_log_likelihood(p, y),
        "auroc": auroc,
    }
    if bootstrap:
        ece = bootstrap_ci(lambda c, h: expected_calibration_error(c, h, n_bins), conf, correct, n=bootstrap,
                           seed=seed)
        nll = bootstrap_ci(negative_log_likelihood, p, y, n=bootstrap, seed=seed)
        report["ece_ci95"] = [ece.low, ece.high]
        report["nll_ci95"] = [nll.low, nll.high]
    if any(isinstance(v, float) and not math.isfinite(v) for v in report.values()):
        raise CalibrationError(f"a metric came out non-finite: {report}")
    return report
