"""The algorithm registry: a name, a typed config class and an ``apply`` function.

``apply(model, config, ctx) -> dict`` mutates the model in place and returns a
JSON-able report. Algorithms that need calibration data say so, and the
pipeline builds the calibration set only when some step needs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from compress.config import StepConfig


@dataclass(frozen=True)
class Algorithm:
    name: str
    config: type[StepConfig]
    apply: Callable[..., dict]
    requires_calibration: bool
    uses_float_weights: bool = False  # reads ctx.artifacts["float_weight"] left by earlier steps
    doc: str = ""


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, config: type[StepConfig], *, requires_calibration: bool,
                       uses_float_weights: bool = False):
    def deco(fn):
        if name in ALGORITHMS:
            raise ValueError(f"algorithm {name!r} registered twice")
        ALGORITHMS[name] = Algorithm(name, config, fn, requires_calibration, uses_float_weights,
                                     (fn.__doc__ or "").strip())
        return fn
    return deco


@dataclass
class StepContext:
    """What a step may use besides the model: the data, the device, shared state."""

    tokenizer: Any
    device: Any
    calibration: Any = None  # a CalibrationSet, when some step requires one
    batch_size: int = 8
    progress: bool = True
    where: str = "step"  # YAML path of the step, for error messages
    artifacts: dict[str, Any] = field(default_factory=dict)  # e.g. quantization results for export
    # Set by the pipeline when a later step uses float weights: quantizing steps then keep
    # each module's pre-quantization weight in artifacts["float_weight"][fqn] (on the CPU).
    keep_float_weights: bool = False
