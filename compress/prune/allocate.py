"""How many units each block loses: γ-tied attention/MLP budgets, global or uniform ranking.

The parameter budget is ``sparsity × (attention + MLP parameters)``. The attention fraction
``a`` and the MLP fraction ``γ·a`` split it: a·A + γ·a·M = s·(A + M) (NIRVANA §4). In
``adaptive`` mode the KV groups of all layers are ranked together, as are the channels, so
each layer loses what its scores say; in ``uniform`` mode every layer loses the same number.
Every block keeps at least ``min_groups`` KV groups, and a multiple of ``channel_multiple``
channels (at least one multiple), so the shrunk matrices stay friendly to matmul kernels.
The MLP takes whatever budget the rounding of whole KV groups leaves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compress.errors import CompressError
from compress.prune.shrink import Keep


@dataclass(frozen=True)
class Allocation:
    keeps: list[Keep]
    target_attention_fraction: float  # a, before rounding to whole units
    target_mlp_fraction: float  # γ·a (or what the budget leaves), before rounding


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, ascending (stable for ties: lower index wins)."""
    order = torch.sort(-scores, stable=True).indices[:k]
    return order.sort().values


def _round_channels(kept: int, total: int, multiple: int) -> int:
    if kept >= total:
        return total
    return min(total, max(multiple, multiple * round(kept / multiple)))


def allocate(scores: list[tuple[torch.Tensor, torch.Tensor]], *, sparsity: float, gamma: float,
             mode: Literal["adaptive", "uniform"], group_params: int, channel_params: int,
             min_groups: int = 1, channel_multiple: int = 8) -> Allocation:
    if not 0 <= sparsity <= 0.9:
        raise CompressError(f"sparsity must be in [0, 0.9], got {sparsity}")
    if gamma <= 0:
        raise CompressError(f"gamma must be > 0, got {gamma}")
    groups = [g.numel() for g, _ in scores]
    channels = [c.numel() for _, c in scores]
    attn_total, mlp_total = sum(groups) * group_params, sum(channels) * channel_params
    budget = sparsity * (attn_total + mlp_total)
    a = budget / (attn_total + gamma * mlp_total)
    if gamma * a > 1:  # the MLP cannot lose more than everything: attention takes the rest
        a = (budget - mlp_total) / attn_total
    a = min(max(a, 0.0), 1.0)

    # attention: whole KV groups
    if mode == "uniform":
        cut = [min(round(a * n), n - min_groups) for n in groups]
    elif mode == "adaptive":
        cut = _global_cut([g for g, _ in scores], round(a * sum(groups)), [n - min_groups for n in groups])
    else:
        raise CompressError(f"allocation must be 'adaptive' or 'uniform', got {mode!r}")
    kept_groups = [n - c for n, c in zip(groups, cut)]

    # MLP: whatever the budget leaves after the whole groups
    left = max(budget - sum(cut) * group_params, 0.0)
    m = min(left / mlp_total, 1.0) if mlp_total else 0.0
    limits = [n - min(n, channel_multiple) for n in channels]
    if mode == "uniform":
        ccut = [min(round(m * n), lim) for n, lim in zip(channels, limits)]
    else:
        ccut = _global_cut([c for _, c in scores], round(left / channel_params), limits)
    kept_channels = [n if c == 0 else _round_channels(n - c, n, channel_multiple)
                     for n, c in zip(channels, ccut)]

    keeps = [Keep(_top(g, kg), _top(c, kc)) for (g, c), kg, kc in zip(scores, kept_groups, kept_channels)]
    return Allocation(keeps, a, m)


def _global_cut(per_layer: list[torch.Tensor], n_cut: int, limits: list[int]) -> list[int]:
    """How many units each layer loses when the ``n_cut`` lowest-scoring units of all layers go,
    skipping any unit whose layer is already at its limit."""
    layer = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(per_layer)])
    values = torch.cat(per_layer)
    cut = [0] * len(per_layer)
    remaining = n_cut
    for j in torch.sort(values, stable=True).indices.tolist():
        if remaining <= 0:
            break
        i = int(layer[j])
        if cut[i] < limits[i]:
            cut[i] += 1
            remaining -= 1
    return cut
