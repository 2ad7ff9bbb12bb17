"""Calibration metrics on top-label confidences.

ECE (Naeini et al. 2015; Guo et al. 2017): split [0, 1] into equal-width bins,
ECE = Σ_b |B_b|/N · |acc(B_b) − conf(B_b)|. Bins are right-closed, with 0 in
the first bin, as in Guo et al.'s reference code.
"""
from __future__ import annotations

import torch


def _bin_stats(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int):
    confidence = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    correct = torch.as_tensor(correct, dtype=torch.float64).flatten()
    if confidence.numel() != correct.numel():
        raise ValueError(f"confidence has {confidence.numel()} values but correct has {correct.numel()}")
    if confidence.numel() == 0:
        raise ValueError("no predictions to score")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
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
    count, conf_sum, acc_sum = _bin_stats(confidence, correct, n_bins)
    full = count > 0
    return float(((conf_sum[full] - acc_sum[full]).abs() / count[full]).max())
