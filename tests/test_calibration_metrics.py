"""Calibration metrics against hand-computed values, the bootstrap, the report and the diagram."""
import math

import numpy as np
import pytest
import torch

from calibration import (CalibrationError, adaptive_calibration_error, bootstrap_ci, brier_score,
                         calibration_report, classwise_ece, confidence_auroc, expected_calibration_error,
                         maximum_calibration_error, negative_log_likelihood, reliability_diagram)

CONF = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
HIT = torch.tensor([0, 0, 1, 0, 1, 1])
PROBS = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
LABELS = torch.tensor([0, 1])


def test_ece_and_mce_by_hand():
    # Two equal-width bins: (0, .5] holds conf sum 1.0 with 1 hit; (.5, 1] conf sum 1.7 with 2 hits.
    assert expected_calibration_error(CONF, HIT, n_bins=2) == pytest.approx(0.3 / 6)
    assert maximum_calibration_error(CONF, HIT, n_bins=2) == pytest.approx(0.3 / 2)
    # Right-closed bins: 0.5 belongs to the first of two bins.
    assert expected_calibration_error([0.5, 1.0], [1, 1], n_bins=2) == pytest.approx(0.25)
    assert expected_calibration_error(np.array([0.9, 0.9]), np.array([True, True])) == pytest.approx(0.1)


def test_ace_uses_equal_mass_bins():
    # Three bins of two: {.1,.2} 0 hits, {.3,.4} 1 hit, {.8,.9} 2 hits → gaps .3, .3, .3.
    assert adaptive_calibration_error(CONF, HIT, n_bins=3) == pytest.approx(0.9 / 6)
    # With more bins than predictions each prediction is its own bin: mean |conf - hit|.
    assert adaptive_calibration_error(CONF, HIT, n_bins=50) == pytest.approx(
        float((CONF - HIT).abs().mean()))


def test_classwise_ece_brier_nll_by_hand():
    # Class 0 events (.8, hit), (.3, miss); class 1 events (.2, miss), (.7, hit): each class ECE = .5 / 2.
    assert classwise_ece(PROBS, LABELS, n_bins=10) == pytest.approx(0.25)
    assert brier_score(PROBS, LABELS) == pytest.approx((0.04 + 0.04 + 0.09 + 0.09) / 2)
    assert negative_log_likelihood(PROBS, LABELS) == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    # A hard zero on the true class is clamped, not infinite.
    assert negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(-math.log(1e-12))
    # 1-D probabilities are the binary P(class 1).
    assert brier_score(torch.tensor([0.2, 0.7]), LABELS) == pytest.approx(brier_score(PROBS, LABELS))


def test_auroc_of_confidence_against_correctness():
    assert confidence_auroc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.75)
    assert confidence_auroc([0.9, 0.8, 0.2], [1, 1, 0]) == 1.0
    with pytest.raises(CalibrationError, match="undefined: 3 of 3 predictions are correct"):
        confidence_auroc([0.9, 0.8, 0.7], [1, 1, 1])


def test_bootstrap_interval_is_seeded_and_brackets_the_estimate():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(2000, generator=g)
    hit = (torch.rand(2000, generator=g) < conf).double()
    a = bootstrap_ci(expected_calibration_error, conf, hit, n=200, seed=1)
    assert a == bootstrap_ci(expected_calibration_error, conf, hit, n=200, seed=1)
    # ECE is biased upward on resamples, so its percentile interval may sit a little above the estimate.
    assert a.low < a.high and a.high - a.low < 0.05 and a.low - 0.01 <= a.estimate <= a.high
    auroc = bootstrap_ci(confidence_auroc, conf, hit, n=50, seed=1)
    assert auroc.low <= auroc.estimate <= auroc.high
    assert a.estimate == expected_calibration_error(conf, hit)
    with pytest.raises(CalibrationError, match="differ in length"):
        bootstrap_ci(expected_calibration_error, conf, hit[:10])


def test_report_has_every_metric_and_matches_them():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 4, generator=g) * 3
    labels = torch.randint(4, (500,), generator=g)
    p = logits.softmax(1)
    r = calibration_report(p, labels, bootstrap=50)
    conf, pred = p.max(1)
    assert r["ece"] == pytest.approx(expected_calibration_error(conf, pred == labels))
    assert r["nll"] == pytest.approx(negative_log_likelihood(p, labels))
    assert r["accuracy"] == pytest.approx(float((pred == labels).double().mean()))
    assert set(r) >= {"ece", "mce", "ace", "classwise_ece", "brier", "nll", "auroc", "ece_ci95", "nll_ci95"}
    assert r["ece_ci95"][0] < r["ece_ci95"][1] and r["nll_ci95"][0] <= r["nll"] <= r["nll_ci95"][1]
    # Every prediction right: AUROC is undefined and reported as None.
    assert calibration_report(torch.eye(3), torch.arange(3))["auroc"] is None


def test_bad_metric_input():
    with pytest.raises(ValueError, match="6 values but correct has 5"):
        expected_calibration_error(CONF, HIT[:5])
    with pytest.raises(CalibrationError, match="n_bins must be >= 1"):
        adaptive_calibration_error(CONF, HIT, n_bins=0)
    with pytest.raises(CalibrationError, match="non-finite"):
        expected_calibration_error(torch.tensor([0.5, float("nan")]), torch.tensor([1, 0]))
    with pytest.raises(CalibrationError, match=r"labels\[1\] = 2 is out of range"):
        brier_score(PROBS, torch.tensor([0, 2]))
    with pytest.raises(CalibrationError, match="no predictions"):
        expected_calibration_error(torch.tensor([]), torch.tensor([]))


def test_reliability_diagram_writes_a_png(tmp_path):
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(1000, generator=g)
    hit = torch.rand(1000, generator=g) < conf ** 2
    path = reliability_diagram(conf, hit, tmp_path / "sub" / "diagram.png", title="test")
    data = path.read_bytes()
    assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"
