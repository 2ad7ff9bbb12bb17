"""Recipe steps for structured pruning: ``nirvana`` and the baselines on the same units.

``nirvana``, ``taylor``, ``wanda`` and ``magnitude`` differ only in the per-weight score
(scores.py), chosen by the config's type (``UNIT_SCORES``); units, allocation (allocate.py) and
physical removal (shrink.py) are shared. The configs and their registration: config.py.
Scores are taken once on the dense model, then every block shrinks in place.
"""
from __future__ import annotations

import torch

from compress.algorithms import StepContext
from compress.errors import CompressError
from compress.prune import scores as S
from compress.prune.allocate import allocate
from compress.prune.config import MagnitudeConfig, NirvanaConfig, StructuredPruneConfig, TaylorConfig, WandaConfig
from compress.prune.shrink import Keep, remove_units
from compress.prune.units import block_params, block_parts, channel_params, group_params
from compress.runtime import on_device
from compress.targets import match_modules


def _magnitude(model, parts, cfg, ctx):
    return S.magnitude_scores(parts)


def _wanda(model, parts, cfg, ctx):
    norms = S.input_norms(model, parts, _batches(ctx), device=ctx.device, linears=S.WANDA_LINEARS,
                          progress=ctx.progress)
    return S.wanda_scores(parts, norms)


def _nirvana(model, parts, cfg, ctx):
    return S.gradient_scores(model, parts, _batches(ctx), "nirvana", device=ctx.device, progress=ctx.progress)


def _taylor(model, parts, cfg, ctx):
    return S.gradient_scores(model, parts, _batches(ctx), "lm", device=ctx.device, progress=ctx.progress)


def _batches(ctx: StepContext) -> list:
    return list(ctx.calibration.batches(ctx.batch_size))


# The per-weight score of each method, by config type (the only thing in which they differ).
UNIT_SCORES = {NirvanaConfig: _nirvana, TaylorConfig: _taylor, WandaConfig: _wanda, MagnitudeConfig: _magnitude}


def prune_structured(model: torch.nn.Module, cfg: StructuredPruneConfig, ctx: StepContext) -> dict:
    """Score KV groups and MLP channels, allocate the budget, and remove the losers for real."""
    if ctx.state.quant:
        raise CompressError(f"{ctx.where}: pruning after quantization would orphan the packed weights; "
                            f"put the pruning stage before the quantization stage")
    parts = block_parts(model)  # first: an unmappable architecture is the clearer error
    matched = match_modules(model, cfg.targets, cfg.ignore, where=ctx.where)
    chosen = [p for p in parts if any(n.startswith(f"model.layers.{p.index}.") for n in matched)]
    if not chosen:
        raise CompressError(f"{ctx.where}: targets {cfg.targets} select no decoder block")
    before = sum(block_params(p) for p in parts)
    with on_device(model, ctx.device):
        scores = UNIT_SCORES[type(cfg)](model, chosen, cfg, ctx)
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

