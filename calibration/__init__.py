"""Post-hoc confidence calibration: calibrators (fit on logits, transform to probabilities), metrics, diagrams.

    from calibration import make_calibrator, load_calibrator, calibration_report
    cal = make_calibrator("temperature").fit(logits, labels)
    report = calibration_report(cal.transform(test_logits), test_labels)

See calibration/README.md for the methods and the papers they come from.
"""
from calibration.base import (CALIBRATORS, Calibrator, confidence_score, load_calibrator, make_calibrator,
                              register_calibrator)
from calibration.binning import HistogramBinning, IsotonicCalibration
from calibration.checks import CalibrationError
from calibration.diagram import reliability_diagram
from calibration.hcal import HCalibration
from calibration.metrics import (ConfidenceInterval, adaptive_calibration_error, bootstrap_ci, brier_score,
                                 calibration_report, classwise_ece, confidence_auroc, expected_calibration_error,
                                 maximum_calibration_error, negative_log_likelihood, top_label)
from calibration.scaling import MatrixScaling, PlattScaling, TemperatureScaling, VectorScaling

__all__ = [
    "CALIBRATORS", "Calibrator", "CalibrationError", "ConfidenceInterval", "HCalibration", "HistogramBinning",
    "IsotonicCalibration", "MatrixScaling", "PlattScaling", "TemperatureScaling", "VectorScaling",
    "adaptive_calibration_error", "bootstrap_ci", "brier_score", "calibration_report", "classwise_ece", "confidence_score",
    "confidence_auroc", "expected_calibration_error", "load_calibrator", "make_calibrator",
    "maximum_calibration_error", "negative_log_likelihood", "register_calibrator", "reliability_diagram",
    "top_label",
]
