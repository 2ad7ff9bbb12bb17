"""Physical removal: the pruned rows and columns leave the matrices, and the config says so.

A model whose blocks all keep the same sizes gets a standard config (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``; ``head_dim`` pinned) that any transformers
install loads. Per-layer sizes cannot be said in a llama/qwen2 config: those go into
``config.pruned_layers`` (one dict per block), which ``apply_pruned_layers`` reads back
(``compress.formats.pruned`` loads such a checkpoint).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError
from compress.prune.units import BlockParts, block_parts, decoder_blocks, layer_dims

PRUNED_LAYERS_KEY = "pruned_layers"


@dataclass(frozen=True)
class Keep:
    """Indices kept in one block, ascending."""

    groups: torch.Tensor  # KV groups
    channels: torch.Tensor  # MLP intermediate channels


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = linear.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if linear.bias is not None:
        b = linear.bias.data
        new.bias.data.copy_(b.index_select(0, rows.to(b.device)) if rows is not None else b)
    return new


@torch.no_grad()
def remove_units(model: nn.Module, keeps: list[Keep]) -> None:
    """Shrink every block to its kept KV groups and channels, in place, and update the config."""
    parts = block_parts(model)
    if len(keeps) != len(parts):
        raise CompressError(f"{len(keeps)} keep lists for {len(parts)} decoder blocks")
    blocks = decoder_blocks(model)
    for p, keep in zip(parts, keeps):
        if keep.groups.numel() < 1 or keep.channels.numel() < 1:
            raise CompressError(f"model.layers.{p.index}: pruning must keep at least one KV group and one channel")
        q_rows, kv_rows = p.group_rows(keep.groups)
        attn, mlp = blocks[p.index].self_attn, blocks[p.index].mlp
        attn.q_proj, attn.k_proj = _sliced(p.q, rows=q_rows), _sliced(p.k, rows=kv_rows)
        attn.v_proj, attn.o_proj = _sliced(p.v, rows=kv_rows), _sliced(p.o, cols=q_rows)
        mlp.gate_proj, mlp.up_proj = _sliced(p.gate, rows=keep.channels), _sliced(p.up, rows=keep.channels)
        mlp.down_proj = _sliced(p.down, cols=keep.channels)
        _sync_attention_attrs(attn, p, keep.groups.numel())
    record_dims(model.config, layer_dims(model))


def _sync_attention_attrs(attn: nn.Module, p: BlockParts, groups: int) -> None:
    # Some transformers versions cache head counts on the module; the forward reshapes with -1.
    for name, value in (("num_heads", groups * p.group_size), ("num_key_value_heads", groups)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def record_dims(config, dims: list[dict]) -> None:
    """Write per-layer sizes into ``config``: standard fields when uniform, else ``pruned_layers``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.head_dim = head_dim  # fewer heads must not change the head size derived from hidden_size
    if all(d == dims[0] for d in dims):
        for key, value in dims[0].items():
            setattr(config, key, value)
        if hasattr(config, PRUNED_LAYERS_KEY):
            delattr(config, PRUNED_LAYERS_KEY)
    else:
        setattr(config, PRUNED_LAYERS_KEY, dims)


def apply_pruned_layers(model: nn.Module) -> nn.Module:
    """Resize a freshly built model's blocks to ``config.pruned_layers`` (weights to be loaded after)."""
    dims = getattr(model.config, PRUNED_LAYERS_KEY, None)
    if not dims:
        return model
    parts = block_parts(model)
    if len(dims) != len(parts):
        raise CompressError(f"config.{PRUNED_LAYERS_KEY} lists {len(dims)} layers but the model has {len(parts)}")
    keeps = []
    for p, d in zip(parts, dims):
        if d["num_attention_heads"] != d["num_key_value_heads"] * p.group_size:
            raise CompressError(f"config.{PRUNED_LAYERS_KEY}[{p.index}]: {d['num_attention_heads']} query heads "
                                f"is not {p.group_size} per KV head x {d['num_key_value_heads']}")
        keeps.append(Keep(torch.arange(d["num_key_value_heads"]), torch.arange(d["intermediate_size"])))
    remove_units(model, keeps)
    return model
