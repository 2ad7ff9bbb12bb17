"""Rotations fused into the weights (QuaRot-style, offline only): the ``rotate`` recipe step.

Importing this package registers the step (``config.py``); its code (``step.py``, ``hadamard.py``)
is imported when it first runs.
"""
from compress.rotate import config  # noqa: F401  (registers the step)
