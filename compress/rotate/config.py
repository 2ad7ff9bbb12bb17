"""The ``rotate`` step's typed config and registration (plain pydantic: no torch here).

It rewrites every weight that reads or writes the residual stream, so anything fitted to the
weights as they were (quantized levels, kept float weights, an adapter, a calibrator, drafter
heads) would describe another basis: it goes before them. Pruning goes before it (prune/config.py).
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from compress.algorithms import register_algorithm
from compress.config import UntargetedStepConfig
from compress.deferred import Deferred
from compress.state import Fact


class RotateConfig(UntargetedStepConfig):
    algorithm: Literal["rotate"] = "rotate"
    kind: Literal["hadamard", "random"] = Field(
        "hadamard", description="hadamard: diag(random ±1)·H/√n where a Hadamard matrix of the hidden size is "
                                "built (else a random orthogonal one, said in the report); random: random orthogonal")
    seed: int = Field(0, ge=0, description="seed of the random signs / random orthogonal matrix")
    values: bool = Field(True, description="also rotate each attention head's values and o_proj's matching inputs "
                                           "(a Hadamard of the head size; exact, fused into v_proj and o_proj)")
    check: bool = Field(True, description="compare the logits on a short sequence before and after (report.max_rel_change)")
    untargeted_reason: ClassVar[str] = "it rotates every linear that reads or writes the residual stream"


register_algorithm("rotate", RotateConfig, step=Deferred("compress.rotate.step", "apply_rotate"),
                   requires_calibration=False, produces={Fact.ROTATED},
                   invalidates={Fact.QUANTIZED, Fact.FLOAT_WEIGHTS, Fact.ADAPTER, Fact.CALIBRATOR, Fact.DRAFTER_HEADS},
                   doc="Fold the RMSNorm weights into the linears and rotate the residual stream (and optionally "
                       "each head's values) by orthogonal matrices fused into the weights: the same function, "
                       "weights with fewer outliers for the quantizer that follows.")
