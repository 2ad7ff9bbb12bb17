"""Recipe steps for structured pruning: ``nirvana`` and the baselines on the same units.

``nirvana``, ``taylor``, ``wanda`` and ``magnitude`` differ only in the per-weight score
(scores.py); units, allocation (allocate.py) and physical removal (shrink.py) are shared.
Scores are taken once on the dense model, then every block shrinks in place.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compress.algorithms import StepContext, register_algorithm
from compress.config import StepConfig
from compress.errors import CompressError
from compress.prune import scores as S
from compress.prune.allocate import allocate
from compress.prune.shrink import remove_units
from compress.prune.units import block_params, block_parts, channel_params, group_params
from compress.runtime import on_device


class PruneConfig(StepConfig):
    algorithm: Literal["nirvana"] = "nirvana"
    sparsity: float = Field(0.2, ge=0, le=0.9, description="fraction of attention+MLP parameters removed")
    gamma: float = Field(3.0, gt=0, description="fraction of MLP channels pruned / fraction of KV groups pruned")
    allocation: Literal["adaptive", "uniform"] = "adaptive"
    min_groups: int = Field(1, ge=1, description="KV groups every block keeps")
    channel_multiple: int = Field(8, ge=1, description="kept MLP channels are a multiple of this")
    # targets/ignore choose the blocks: a block is pruned when any of its linears matches


class TaylorConfig(PruneConfig):
    algorithm: Literal["taylor"] = "taylor"  # type: ignore[assignment]


class WandaConfig(PruneConfig):
    algorithm: Literal["wanda"] = "wanda"  # type: ignore[assignment]


class MagnitudeConfig(PruneConfig):
    algorithm: Literal["magnitude"] = "magnitude"  # type: ignore[assignment]


def _unit_scores(model, parts, cfg: PruneConfig, ctx: StepContext):
    if cfg.algorithm == "magnitude":
        return S.magnitude_scores(parts)
    batches = list(ctx.calibration.batches(ctx.batch_size))
    if cfg.algorithm == "wanda":
        norms = S.input_norms(model, parts, batches, device=ctx.device, linears=S.WANDA_LINEARS,
                              progress=ctx.progress)
        return S.wanda_scores(parts, norms)
    objective = "nirvana" if cfg.algorithm == "nirvana" else "lm"
    return S.gradient_scores(model, parts, batches, objective, device=ctx.device, progress=ctx.progress)


def prune_structured(model: torch.nn.Module, cfg: PruneConfig, ctx: StepContext) -> dict:
    """Score KV groups and MLP channels, allocate the budget, and remove the losers for real."""
    from compress.prune.shrink import Keep
    from compress.targets import match_modules

    if ctx.artifacts.get("quant"):
        raise CompressError(f"{ctx.where}: pruning after quantization would orphan the packed weights; "
                            f"put the pruning stage before the quantization stage")
    parts = block_parts(model)  # first: an unmappable architecture is the clearer error
    matched = match_modules(model, cfg.targets, cfg.ignore, where=ctx.where)
    chosen = [p for p in parts if any(n.startswith(f"model.layers.{p.index}.") for n in matched)]
    if not chosen:
        raise CompressError(f"{ctx.where}: targets {cfg.targets} select no decoder block")
    before = sum(block_params(p) for p in parts)
    with on_device(model, ctx.device):
        scores = _unit_scores(model, chosen, cfg, ctx)
    alloc = allocate(scores, sparsity=cfg.sparsity, gamma=cfg.gamma, mode=cfg.allocation,
                     group_params=group_params(chosen[0]), channel_params=channel_params(chosen[0]),
                     min_groups=cfg.min_groups, channel_multiple=cfg.channel_multiple)
    # blocks outside the targets keep everything
    keeps = {p.index: k for p, k in zip(chosen, alloc.keeps)}
    full = [keeps.get(p.index, Keep(torch.arange(p.kv_groups), torch.arange(p.channels))) for p in parts]
    remove_units(model, full)
    after_parts = block_parts(model)
    after = sum(block_params(p) for p in after_parts)
    layers = [{"layer": p.index, "kv_groups": p.kv_groups, "kv_groups_before": b.kv_groups,
               "channels": p.channels, "channels_before": b.channels} for p, b in zip(after_parts, parts)]
    return {"sparsity_target": cfg.sparsity, "sparsity": round(1 - after / before, 6),
            "block_params_before": before, "block_params_after": after,
            "attention_fraction_target": round(alloc.target_attention_fraction, 6),
            "mlp_fraction_target": round(alloc.target_mlp_fraction, 6),
            "kv_groups_pruned": sum(b.kv_groups - p.kv_groups for p, b in zip(after_parts, parts)),
            "channels_pruned": sum(b.channels - p.channels for p, b in zip(after_parts, parts)),
            "layers": layers}


register_algorithm("nirvana", PruneConfig, requires_calibration=True)(prune_structured)
register_algorithm("taylor", TaylorConfig, requires_calibration=True)(prune_structured)
register_algorithm("wanda", WandaConfig, requires_calibration=True)(prune_structured)
register_algorithm("magnitude", MagnitudeConfig, requires_calibration=False)(prune_structured)
