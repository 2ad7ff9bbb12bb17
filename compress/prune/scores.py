"""Unit saliency: per-weight scores aggregated into KV-group and channel scores.

Every method gives each weight of a block's linears a non-negative score; a KV group
scores the sum over its q/k/v rows and its o_proj columns, a channel the sum over its
gate and up rows and its down_proj column (NIRVANA's aggregation, shared by the baselines
so that only the per-weight rule differs):

- ``nirvana``: |∂f/∂W ⊙ W| with f = mean over (batch, vocab) of the max over positions of
  the logits — the NTK-motivated objective of NIRVANA (Ai et al. 2025), not the LM loss.
- ``taylor``: |∂L/∂W ⊙ W| with L the LM loss (first-order Taylor, as in LLM-Pruner).
- ``wanda``: Wanda-sp (An et al. 2024, FLAP's baseline): |W| · ‖X_j‖ on the input columns of
  o_proj and down_proj only (X_j: that input feature over the calibration tokens), summed per
  unit. Scoring the q/k/v/gate/up rows too would weigh every row by the residual stream's
  few massive features, which says little about the unit.
- ``magnitude``: |W| (data-free).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress.prune.units import BlockParts

# one [out, in] score matrix per linear of a block, keyed q, k, v, o, gate, up, down
BlockScores = dict[str, torch.Tensor]
# per block: (score per KV group, score per MLP channel), float64 on the CPU
UnitScores = list[tuple[torch.Tensor, torch.Tensor]]
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def unit_scores(p: BlockParts, s: BlockScores) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per KV group [kv_groups], score per channel [channels]) from per-weight scores."""
    g, hd = p.group_size, p.head_dim
    q_rows = s["q"].sum(1).view(p.kv_groups, g * hd).sum(1)
    kv_rows = (s["k"].sum(1) + s["v"].sum(1)).view(p.kv_groups, hd).sum(1)
    o_cols = s["o"].sum(0).view(p.kv_groups, g * hd).sum(1)
    channel = s["gate"].sum(1) + s["up"].sum(1) + s["down"].sum(0)
    return (q_rows + kv_rows + o_cols).double().cpu(), channel.double().cpu()


def nirvana_objective(logits: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, vocab) of the max over sequence positions of the logits."""
    return logits.float().amax(dim=1).mean()


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _linears(p: BlockParts) -> dict[str, nn.Linear]:
    return {k: getattr(p, k) for k in LINEARS}


def magnitude_scores(parts: list[BlockParts]) -> UnitScores:
    return [unit_scores(p, {k: m.weight.detach().abs().float() for k, m in _linears(p).items()}) for p in parts]


def gradient_scores(model: nn.Module, parts: list[BlockParts], batches: Iterable[torch.Tensor],
                    objective: str, *, device, progress: bool = True) -> UnitScores:
    """|g ⊙ W| with g the gradient of ``objective`` ("nirvana" or "lm") over all batches.

    The objective is a mean over samples, so each batch's gradient is weighted by its share
    of the samples and summed: micro-batches give the same gradient as one big batch.
    """
    batches = list(batches)
    n_total = sum(b.shape[0] for b in batches)
    weights = [m.weight for p in parts for m in _linears(p).values()]
    saved = [(q, q.requires_grad) for q in model.parameters()]
    for q, _ in saved:
        q.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    try:
        for ids in tqdm(batches, desc=f"{objective} gradients", unit="batch", disable=not progress):
            ids = ids.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            f = nirvana_objective(logits) if objective == "nirvana" else lm_loss(logits, ids)
            (f * (ids.shape[0] / n_total)).backward()
        return [unit_scores(p, {k: (m.weight.grad.float() * m.weight.detach().float()).abs()
                                for k, m in _linears(p).items()}) for p in parts]
    finally:
        for w in weights:
            w.grad = None
        for q, flag in saved:
            q.requires_grad_(flag)


@torch.no_grad()
def input_norms(model: nn.Module, parts: list[BlockParts], batches: Iterable[torch.Tensor], *, device,
                linears: tuple[str, ...] = LINEARS, progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """‖X_j‖₂ over every calibration token, per input feature, for ``linears`` of each block."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def hook_for(key) -> Callable:
        def hook(_mod, args):
            x = args[0].detach().float().flatten(0, -2)
            sums[key] = sums.get(key, 0) + x.pow(2).sum(0)
        return hook

    for i, p in enumerate(parts):
        for k in linears:
            hooks.append(getattr(p, k).register_forward_pre_hook(hook_for((i, k))))
    try:
        for ids in tqdm(list(batches), desc="input norms", unit="batch", disable=not progress):
            model(input_ids=ids.to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [{k: sums[(i, k)].sqrt() for k in linears} for i in range(len(parts))]


WANDA_LINEARS = ("o", "down")  # Wanda-sp scores the input columns of the output projections


def wanda_scores(parts: list[BlockParts], norms: list[dict[str, torch.Tensor]]) -> UnitScores:
    out = []
    for i, p in enumerate(parts):
        s = {k: torch.zeros(1, 1, device=m.weight.device).expand_as(m.weight) for k, m in _linears(p).items()}
        for k in WANDA_LINEARS:
            w = getattr(p, k).weight.detach()
            s[k] = w.abs().float() * norms[i][k][None, :].to(w.device)
        out.append(unit_scores(p, s))
    return out
