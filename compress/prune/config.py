"""Typed configs of the structured-pruning steps, and their registration.

``nirvana``, ``taylor``, ``wanda`` and ``magnitude`` share every field and one step
(``steps.prune_structured``); the config's *type* says which per-weight score to take. Plain
pydantic: the recipe schema is built from these without importing torch. Pruning changes the
weights' shapes, so any quantized levels, kept float weights or calibrator from an earlier step
would describe a model that no longer exists: prune first.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from compress.algorithms import register_algorithm
from compress.config import StepConfig
from compress.deferred import Deferred
from compress.state import Fact


class StructuredPruneConfig(StepConfig):
    """What the four pruning methods share; ``targets``/``ignore`` choose the blocks (a block is
    pruned when any of its linears matches)."""

    sparsity: float = Field(0.2, ge=0, le=0.9, description="fraction of attention+MLP parameters removed")
    gamma: float = Field(3.0, gt=0, description="fraction of MLP channels pruned / fraction of KV groups pruned")
    allocation: Literal["adaptive", "uniform"] = "adaptive"
    min_groups: int = Field(1, ge=1, description="KV groups every block keeps")
    channel_multiple: int = Field(8, ge=1, description="kept MLP channels are a multiple of this")


class NirvanaConfig(StructuredPruneConfig):
    """|∂f/∂W ⊙ W| with NIRVANA's NTK-motivated objective f (Ai et al. 2025)."""

    algorithm: Literal["nirvana"] = "nirvana"


class TaylorConfig(StructuredPruneConfig):
    """|∂L/∂W ⊙ W| with L the LM loss (first-order Taylor, as in LLM-Pruner)."""

    algorithm: Literal["taylor"] = "taylor"


class WandaConfig(StructuredPruneConfig):
    """Wanda-sp: |W| · ‖X_j‖ on the input columns of o_proj and down_proj."""

    algorithm: Literal["wanda"] = "wanda"


class MagnitudeConfig(StructuredPruneConfig):
    """|W| (data-free)."""

    algorithm: Literal["magnitude"] = "magnitude"


PruneConfig = NirvanaConfig  # the name nirvana's config had when it was also the others' base

_STEP = Deferred("compress.prune.steps", "prune_structured")
# Pruning scores weights element by element (|W|, |∂L/∂W ⊙ W|): in a rotated basis those mean nothing
# of the model's own structure, so it goes before ``rotate`` (a rotation after it is exact on the
# pruned shapes: the residual width is never pruned).
_PRUNING = dict(step=_STEP, invalidates={Fact.QUANTIZED, Fact.FLOAT_WEIGHTS, Fact.CALIBRATOR, Fact.DRAFTER_HEADS,
                                         Fact.ROTATED},
                doc="Score KV groups and MLP channels, allocate the budget, and remove the losers for real.")
register_algorithm("nirvana", NirvanaConfig, requires_calibration=True, **_PRUNING)
register_algorithm("taylor", TaylorConfig, requires_calibration=True, **_PRUNING)
register_algorithm("wanda", WandaConfig, requires_calibration=True, **_PRUNING)
register_algorithm("magnitude", MagnitudeConfig, requires_calibration=False, **_PRUNING)
