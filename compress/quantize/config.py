"""Typed configs of the quantization steps, and their registration.

Plain pydantic (the recipe schema is built from them without importing torch); each step's code
is named, not imported: ``steps.py`` (rtn, gptq), ``mixed_steps.py`` (gptq_mixed),
``refine_steps.py`` (adaquant, bias_correction). Every quantizing step leaves packed levels
(``QUANTIZED``) and, when a later step needs them, the float weights (``FLOAT_WEIGHTS``); every
step that moves a weight invalidates an earlier calibrator.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from compress.algorithms import register_algorithm
from compress.config import StepConfig
from compress.deferred import Deferred
from compress.state import Fact


Grid = Literal["minmax", "mse"]
_GRID_DOC = ("minmax: each group's grid spans its range; mse: per row, a clipped range chosen by a search that "
             "minimises the squared rounding error (never worse than minmax on the weights it is fitted to)")


class RTNConfig(StepConfig):
    algorithm: Literal["rtn"] = "rtn"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[-1, 32, 64, 128] = 128
    sym: bool = False
    grid: Grid = Field("minmax", description=_GRID_DOC)

    def spec(self):
        from compress.quantize.grid import QuantSpec  # grid.py imports torch; the recipe schema must not
        return QuantSpec(bits=self.bits, group_size=self.group_size, sym=self.sym, grid=self.grid)


class GPTQConfig(RTNConfig):
    algorithm: Literal["gptq"] = "gptq"  # type: ignore[assignment]
    damp: float = Field(0.01, gt=0, le=1, description="damping as a fraction of mean(diag H)")
    act_order: bool = False
    block_size: int = Field(128, ge=1, le=4096)
    asymmetric: bool = Field(
        False, description="GPTAQ (GPTQ v2, Li et al. 2025): fit each layer to the float model's output on the "
                           "float model's inputs, not to its own float output on the quantized model's inputs; "
                           "the runner also runs the float block (about twice the forwards)")
    asymmetric_alpha: float = Field(
        0.25, ge=0, le=1, description="how much of the asymmetric correction to apply (GPTQv2's alpha; 1: the full "
                                      "least-squares target, which over-fits the calibration windows)")


class GPTQMixedConfig(StepConfig):
    algorithm: Literal["gptq_mixed"] = "gptq_mixed"
    candidate_bits: list[Literal[2, 3, 4, 8]] = Field(default_factory=lambda: [3, 4, 8], min_length=1)
    target_bits: float = Field(4.0, description="average bits per weight (levels only), "
                                                "between min and max of candidate_bits")
    group_size: Literal[-1, 32, 64, 128] = 128
    sym: bool = False
    grid: Grid = Field("minmax", description=_GRID_DOC)
    damp: float = Field(0.01, gt=0, le=1, description="damping as a fraction of mean(diag H)")
    act_order: bool = False
    block_size: int = Field(128, ge=1, le=4096)
    sensitivity: Literal["layer_error", "loss"] = Field(
        "loss", description="loss: NLL increase on probe windows with one unit quantized (the paper's ΔL); "
                            "layer_error: GPTQ's trace((W-Ŵ)H(W-Ŵ)ᵀ), cheap, but its scale differs across layers")
    probe_samples: int = Field(4, ge=1, le=4096, description="calibration windows for the loss probe")
    tie_fused: bool = Field(
        True, description="give one width to the modules an inference engine fuses (q,k,v; gate,up), "
                          "as vLLM loads a fused layer with a single width")

    @field_validator("candidate_bits")
    @classmethod
    def _sorted_unique(cls, v: list[int]) -> list[int]:
        return sorted(set(v))

    @field_validator("target_bits")
    @classmethod
    def _within_candidates(cls, v: float, info: ValidationInfo) -> float:
        cands = info.data.get("candidate_bits")
        if cands and not min(cands) <= v <= max(cands):
            raise ValueError(f"target_bits={v:g} is outside the range of candidate_bits {cands}: the average "
                             f"bit width must lie in [{min(cands)}, {max(cands)}]")
        return v

    def spec(self, bits: int):
        from compress.quantize.grid import QuantSpec  # grid.py imports torch; the recipe schema must not
        return QuantSpec(bits=bits, group_size=self.group_size, sym=self.sym, grid=self.grid)


class AdaQuantConfig(StepConfig):
    algorithm: Literal["adaquant"] = "adaquant"
    steps: int = Field(200, ge=0, le=100_000, description="Adam steps per layer")
    lr_weight: float = Field(1e-3, ge=0, le=1, description="weights' rate, in grid steps (relative to the scale)")
    lr_scale: float = Field(1e-3, ge=0, le=1, description="scales' relative rate")
    lr_zero: float = Field(1e-3, ge=0, le=10, description="zero points' rate, in levels")
    optimize_zero: bool = Field(True, description="learn zero points (asymmetric grids only)")
    init: Literal["dequantized", "float"] = Field(
        "dequantized", description="start from the quantized weights (best after gptq) or the float ones (after rtn)")


class BiasCorrectionConfig(StepConfig):
    algorithm: Literal["bias_correction"] = "bias_correction"


# Whatever was fitted to the model as it was (a calibrator, a self-drafter's heads) no longer fits
# once a step changes the weights.
_FITTED_TO_THE_MODEL = {Fact.CALIBRATOR, Fact.DRAFTER_HEADS}
_QUANTIZING = dict(produces={Fact.QUANTIZED, Fact.FLOAT_WEIGHTS}, invalidates=_FITTED_TO_THE_MODEL)
register_algorithm("rtn", RTNConfig, step=Deferred("compress.quantize.steps", "apply_rtn"),
                   requires_calibration=False, **_QUANTIZING,
                   doc="Round-to-nearest weight quantization, per group of input columns (data-free baseline).")
register_algorithm("gptq", GPTQConfig, step=Deferred("compress.quantize.steps", "apply_gptq"),
                   requires_calibration=True, **_QUANTIZING,
                   doc="GPTQ (Frantar et al. 2022) through the shared layer-wise runner, true-sequential.")
register_algorithm("gptq_mixed", GPTQMixedConfig, step=Deferred("compress.quantize.mixed_steps", "apply_gptq_mixed"),
                   requires_calibration=True, **_QUANTIZING,
                   doc="GPTQ at a bit width per module, allocated by an integer program over measured sensitivities.")
register_algorithm("adaquant", AdaQuantConfig, step=Deferred("compress.quantize.refine_steps", "apply_adaquant"),
                   requires_calibration=True, needs={Fact.QUANTIZED, Fact.FLOAT_WEIGHTS}, produces={Fact.QUANTIZED},
                   invalidates=_FITTED_TO_THE_MODEL,
                   doc="AdaQuant (Hubara et al. 2020): per layer, Adam on weights, scales and zeros.")
register_algorithm("bias_correction", BiasCorrectionConfig,
                   step=Deferred("compress.quantize.refine_steps", "apply_bias_correction"),
                   requires_calibration=True, needs={Fact.FLOAT_WEIGHTS}, invalidates=_FITTED_TO_THE_MODEL,
                   doc="Bias correction: each quantized layer's mean output made the float layer's.")
