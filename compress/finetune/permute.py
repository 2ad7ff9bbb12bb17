"""Co-permutation: move the selected units to the front of their coupled matrices.

An *order* lists, for each new position, the original unit index there:
``order = selected + the rest`` (both ascending), so the selected units become
the leading slice. Permuting the producer's output rows and the consumer's
input columns by the same order leaves the block's function unchanged:

* FFN channels: gate_proj and up_proj rows, down_proj columns.
* KV head groups: k_proj and v_proj rows per KV head, and q_proj rows / o_proj
  columns of the group's query heads, so query head ``h`` still reads KV head
  ``h // group_size`` (transformers' ``repeat_kv`` layout). Rotary embeddings and
  per-head-dim norms act on each head alike, so they do not see the move.

Permuting by ``inverse(order)`` undoes it exactly (it only moves values).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compress.finetune.select import Block, Selection


def selected_first(selected: list[int], size: int) -> list[int]:
    chosen = set(selected)
    return list(selected) + [i for i in range(size) if i not in chosen]


def inverse(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for new, old in enumerate(order):
        inv[old] = new
    return inv


def expand(order: list[int], width: int) -> torch.Tensor:
    """Unit order -> index order of the ``width`` consecutive rows/columns of each unit."""
    units = torch.as_tensor(order, dtype=torch.long)
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


def kv_head_indices(order: list[int], block: Block) -> tuple[torch.Tensor, torch.Tensor]:
    """(k/v row order, q row = o column order) for a KV-head order."""
    query_heads = expand(order, block.group_size)
    return expand(order, block.head_dim), expand(query_heads.tolist(), block.head_dim)


@torch.no_grad()
def _take_rows(linear: nn.Linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight.copy_(linear.weight.index_select(0, index))
    if linear.bias is not None:
        linear.bias.copy_(linear.bias.index_select(0, index))


@torch.no_grad()
def _take_cols(linear: nn.Linear, index: torch.Tensor) -> None:
    index = index.to(linear.weight.device)
    linear.weight.copy_(linear.weight.index_select(1, index))


def permute_block(block: Block, kv_order: list[int] | None, channel_order: list[int] | None) -> None:
    """Reorder one block's coupled linears in place (``None``: leave that kind as it is)."""
    lin = block.linears
    if kv_order is not None:
        kv_rows, q_rows = kv_head_indices(kv_order, block)
        _take_rows(lin["q_proj"], q_rows)
        _take_rows(lin["k_proj"], kv_rows)
        _take_rows(lin["v_proj"], kv_rows)
        _take_cols(lin["o_proj"], q_rows)
    if channel_order is not None:
        channels = torch.as_tensor(channel_order, dtype=torch.long)
        _take_rows(lin["gate_proj"], channels)
        _take_rows(lin["up_proj"], channels)
        _take_cols(lin["down_proj"], channels)


Orders = list[list[int] | None]  # per block; None: that kind is not moved in the block


def orders_for(selection: Selection, blocks: list[Block]) -> tuple[Orders, Orders]:
    """Per block (kv order, channel order); ``None`` where nothing was selected (no move needed)."""
    kv = [selected_first(sel, b.num_kv_heads) if sel else None for sel, b in zip(selection.attention, blocks)]
    ch = [selected_first(sel, b.intermediate) if sel else None for sel, b in zip(selection.mlp, blocks)]
    return kv, ch


def apply_orders(blocks: list[Block], kv_orders, channel_orders, *, undo: bool = False) -> None:
    """Permute every block by its orders (``undo``: by their inverses, restoring the original)."""
    for b, kv, ch in zip(blocks, kv_orders, channel_orders):
        if undo:
            kv = inverse(kv) if kv is not None else None
            ch = inverse(ch) if ch is not None else None
        permute_block(b, kv, ch)
