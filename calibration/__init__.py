"""Post-hoc confidence calibration: metrics (and, as they land, calibrators)."""
from calibration.metrics import expected_calibration_error, maximum_calibration_error

__all__ = ["expected_calibration_error", "maximum_calibration_error"]
