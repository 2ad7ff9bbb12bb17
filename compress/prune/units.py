"""The prunable units of a decoder block and the per-layer sizes that describe a pruned model.

An attention unit is one KV group: its K and V head, the ``g`` query heads that read them
and the o_proj input columns those query heads write. An MLP unit is one intermediate
channel: a gate_proj row, an up_proj row and a down_proj column. Removing whole KV groups
keeps ``num_attention_heads / num_key_value_heads`` fixed, so the attention code of llama
and qwen2 runs unchanged on blocks of different widths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError

# Module names relative to a decoder block (llama, qwen2 and mistral share them).
ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SUPPORTED = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class BlockParts:
    index: int
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    head_dim: int
    group_size: int  # query heads per KV head

    @property
    def kv_groups(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def channels(self) -> int:
        return self.up.out_features

    def group_rows(self, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_proj rows / o_proj columns, k_proj/v_proj rows) belonging to ``groups``."""
        hd, g = self.head_dim, self.group_size
        offs = torch.arange(hd)
        kv = (groups[:, None] * hd + offs).flatten()
        heads = (groups[:, None] * g + torch.arange(g)).flatten()
        q = (heads[:, None] * hd + offs).flatten()
        return q, kv


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise CompressError(f"structured pruning cannot map model type {model_type!r} "
                            f"({type(model).__name__}); supported: {', '.join(SUPPORTED)}")
    blocks = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(blocks, nn.ModuleList):
        raise CompressError(f"{type(model).__name__} has no model.layers ModuleList to prune")
    return blocks


def block_parts(model: nn.Module) -> list[BlockParts]:
    """Every decoder block's linears, checked against the shapes pruning relies on."""
    blocks = decoder_blocks(model)  # first: names the model type it cannot map
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group_size = config.num_attention_heads // config.num_key_value_heads
    parts = []
    for i, block in enumerate(blocks):
        mods = {}
        for name in ATTN + MLP:
            m = block.get_submodule(name) if _has(block, name) else None
            if not isinstance(m, nn.Linear):
                raise CompressError(f"structured pruning cannot map model.layers.{i}.{name}: "
                                    f"expected an nn.Linear, found {type(m).__name__ if m is not None else 'nothing'}")
            mods[name.split(".")[-1].removesuffix("_proj")] = m
        p = BlockParts(i, **mods, head_dim=head_dim, group_size=group_size)
        if p.q.out_features != p.kv_groups * group_size * head_dim or p.o.in_features != p.q.out_features:
            raise CompressError(f"model.layers.{i}.self_attn: q_proj has {p.q.out_features} outputs, which is not "
                                f"{p.kv_groups} KV groups x {group_size} heads x {head_dim}")
        if p.gate.out_features != p.channels or p.down.in_features != p.channels:
            raise CompressError(f"model.layers.{i}.mlp: gate/up/down disagree on the intermediate size")
        parts.append(p)
    return parts


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
        return True
    except AttributeError:
        return False


def group_params(p: BlockParts) -> int:
    """Parameters one KV group holds (weights and biases)."""
    hd, g, h = p.head_dim, p.group_size, p.q.in_features
    n = (2 * g + 2) * hd * h
    n += sum(hd * (g if m is p.q else 1) for m in (p.q, p.k, p.v) if m.bias is not None)
    return n


def channel_params(p: BlockParts) -> int:
    h = p.up.in_features
    return 3 * h + sum(1 for m in (p.gate, p.up) if m.bias is not None)


def block_params(p: BlockParts) -> int:
    return sum(t.numel() for m in (p.q, p.k, p.v, p.o, p.gate, p.up, p.down) for t in m.parameters())


def layer_dims(model: nn.Module) -> list[dict]:
    """Per-layer head counts and intermediate size, as a pruned config records them."""
    return [{"num_attention_heads": p.kv_groups * p.group_size, "num_key_value_heads": p.kv_groups,
             "intermediate_size": p.channels} for p in block_parts(model)]
