"""What steps leave for later steps and for the export, and the facts a step declares about it.

``RunState`` replaces a string-keyed dict: each field is one kind of result, named by a ``Fact``.
An algorithm declares which facts it *produces*, *needs* (from an earlier step) and *invalidates*
(a step that changes the weights makes an earlier calibrator, or earlier packed levels, describe a
model that no longer exists). ``compress.plan`` checks a recipe's order against these declarations
before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Fact(str, Enum):
    """One kind of step result; the value is its ``RunState`` field."""

    QUANTIZED = "quant"  # packed levels, scales and zeros of each quantized linear (what gptq exports pack)
    FLOAT_WEIGHTS = "float_weight"  # each quantized linear's weight before quantization (refinement steps)
    ADAPTER = "adapters"  # fine-tuning adapters the export ships beside the model
    CALIBRATOR = "calibrator"  # the confidence calibrator the export ships
    DRAFTER_HEADS = "self_spec"  # a self-spec drafter's exit heads, trained on the model as it was
    ROTATED = "rotation"  # the residual stream rotated (compress.rotate): weights in another basis

    @property
    def what(self) -> str:
        return _WHAT[self]

    @property
    def per_module(self) -> bool:
        """Produced and needed module by module (a step's targets), not for the model as a whole."""
        return self in (Fact.QUANTIZED, Fact.FLOAT_WEIGHTS)

    @property
    def one_per_recipe(self) -> bool:
        """An export ships one: a second producer would replace the first one's result."""
        return self is Fact.CALIBRATOR


_WHAT = {Fact.QUANTIZED: "quantized weights", Fact.FLOAT_WEIGHTS: "the float weights kept by a quantizing step",
         Fact.ADAPTER: "a fine-tuning adapter", Fact.CALIBRATOR: "a calibrator",
         Fact.DRAFTER_HEADS: "drafter exit heads", Fact.ROTATED: "a rotated residual stream"}


@dataclass
class RunState:
    """The results of the steps run so far (the model itself is changed in place)."""

    # fqn -> compress.quantize.solvers.QuantResult with the levels, scales and zeros (weight=None)
    quant: dict[str, Any] = field(default_factory=dict)
    # fqn -> the weight before quantization, on the CPU; kept only when a later step needs it
    float_weight: dict[str, Any] = field(default_factory=dict)
    # export subfolder -> an adapter with .save(folder) (compress.finetune.steps.AdapterSnapshot)
    adapters: dict[str, Any] = field(default_factory=dict)
    # compress.formats.calibrator.LMCalibrator, or None
    calibrator: Any = None
    # compress.draft.selfspec.step.SelfSpecResult (heads, manifest, calibrator), or None
    self_spec: Any = None
    # what the rotate step did (compress.rotate.step: the matrix kind, the seed, untying), or None
    rotation: Any = None

    def has(self, fact: Fact) -> bool:
        return bool(getattr(self, fact.value))
