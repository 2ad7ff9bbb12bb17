"""compress: a compression and calibration toolkit for language models."""

__version__ = "0.1.0"
