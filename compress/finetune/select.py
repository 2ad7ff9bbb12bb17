"""S2FT selection: the config, the model's coupled structures, and which units train.

A *unit* is what S2FT selects and moves as a whole:

* attention: one KV head group. With grouped-query attention a KV head (``head_dim``
  rows of k_proj/v_proj) serves ``num_heads // num_kv_heads`` query heads, so the
  unit is that KV head together with its query heads (their q_proj rows and o_proj
  columns). Moving whole groups is the only head permutation that keeps every
  query head attached to its KV head, so the model's function is unchanged. The
  trainable slices of a selected group are its v_proj rows and/or the o_proj
  columns of all its query heads. (Plain multi-head attention is the case
  group size 1.)
* FFN: one intermediate channel: a gate_proj row, an up_proj row and a
  down_proj column (gate and up rows move together; gate is trainable only if
  asked for).

Strategies: ``random`` draws units uniformly from one pool over all layers (the
paper's default), so layers get different counts, some none. The score-based
ones (``weight``, ``activation``, ``gradient``) take the top units *per layer*
(the same count in every layer), because scores of different layers are not on
one scale (the residual stream grows with depth).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from compress.errors import CompressError
from compress.finetune.config import S2FTConfig, check_ratio  # noqa: F401  (check_ratio: importable here too)
from compress.runner import LAYOUTS

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Block:
    """One decoder block's coupled linears and its attention shape."""

    index: int
    prefix: str  # fqn of the block, e.g. "model.layers.3"
    linears: dict[str, nn.Module]  # "q_proj", ..., "down_proj" -> the module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def fqn(self, name: str) -> str:
        part = "self_attn" if name in ATTENTION_MODULES else "mlp"
        return f"{self.prefix}.{part}.{name}"


def _blocks_path(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return LAYOUTS[model_type].blocks if model_type in LAYOUTS else "model.layers"


def decoder_blocks(model: nn.Module) -> list[Block]:
    """The model's decoder blocks with the linears S2FT couples; clear errors otherwise."""
    cfg = getattr(model, "config", None)
    path = _blocks_path(model)
    try:
        blocks = model.get_submodule(path)
    except AttributeError:
        raise CompressError(
            f"S2FT: {type(model).__name__} has no decoder blocks at {path!r}; S2FT supports "
            f"llama-like models (self_attn.q/k/v/o_proj and mlp.gate/up/down_proj)") from None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise CompressError(f"S2FT: {path!r} of {type(model).__name__} is not a non-empty list of blocks")
    num_heads = getattr(cfg, "num_attention_heads", None)
    if not num_heads:
        raise CompressError(f"S2FT: the model config has no num_attention_heads ({type(model).__name__})")
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
    if num_heads % num_kv:
        raise CompressError(f"S2FT: num_attention_heads {num_heads} is not a multiple of "
                            f"num_key_value_heads {num_kv}")
    # A structurally pruned model keeps per-layer sizes in config.pruned_layers (compress.prune.shrink).
    per_layer = getattr(cfg, "pruned_layers", None) or []
    if per_layer and len(per_layer) != len(blocks):
        raise CompressError(f"S2FT: config.pruned_layers lists {len(per_layer)} layers, the model has {len(blocks)}")
    out = []
    for i, block in enumerate(blocks):
        prefix = f"{path}.{i}"
        if per_layer:
            num_heads = per_layer[i]["num_attention_heads"]
            num_kv = per_layer[i]["num_key_value_heads"]
        linears = {}
        for part, names in (("self_attn", ATTENTION_MODULES), ("mlp", MLP_MODULES)):
            for name in names:
                fqn = f"{prefix}.{part}.{name}"
                try:
                    module = block.get_submodule(f"{part}.{name}")
                except AttributeError:
                    raise CompressError(
                        f"S2FT: the model has no {fqn} ({type(model).__name__}); S2FT needs "
                        f"self_attn.{{{','.join(ATTENTION_MODULES)}}} and mlp.{{{','.join(MLP_MODULES)}}} "
                        f"in every block") from None
                if type(module) is not nn.Linear:
                    raise CompressError(
                        f"S2FT: {fqn} is a {type(module).__name__}, not a plain nn.Linear"
                        + (" (S2FT is already applied: remove it first)"
                           if type(module).__name__ == "S2FTLinear" else ""))
                linears[name] = module
        _check_extra_parameters(block, prefix)
        b = Block(i, prefix, linears, num_heads, num_kv, head_dim, linears["up_proj"].out_features)
        _check_shapes(b)
        out.append(b)
    return out


def _check_extra_parameters(block: nn.Module, prefix: str) -> None:
    # A per-head or per-channel parameter we do not permute (e.g. attention sinks)
    # would silently change the function; per-head-dim norms (q_norm/k_norm) are shared.
    for part, names in (("self_attn", ATTENTION_MODULES), ("mlp", MLP_MODULES)):
        sub = block.get_submodule(part)
        for pname, _ in sub.named_parameters():
            owner = pname.split(".")[0]
            if owner not in names and "norm" not in owner:
                raise CompressError(f"S2FT: {prefix}.{part}.{pname} is a parameter S2FT's head/channel "
                                    f"permutation does not handle")


def _check_shapes(b: Block) -> None:
    h, kv, d, inter = b.num_heads, b.num_kv_heads, b.head_dim, b.intermediate
    expect = {"q_proj": (h * d, None), "k_proj": (kv * d, None), "v_proj": (kv * d, None),
              "o_proj": (None, h * d), "gate_proj": (inter, None), "up_proj": (inter, None),
              "down_proj": (None, inter)}
    for name, (rows, cols) in expect.items():
        w = b.linears[name].weight
        if (rows is not None and w.shape[0] != rows) or (cols is not None and w.shape[1] != cols):
            raise CompressError(
                f"S2FT: {b.fqn(name)} has weight shape {tuple(w.shape)}, expected "
                f"{rows if rows is not None else '*'} x {cols if cols is not None else '*'} from "
                f"{h} heads / {kv} KV heads of dim {d}, intermediate {inter}")


@dataclass
class Selection:
    """Selected units per block, as sorted original indices."""

    attention: list[list[int]] = field(default_factory=list)  # KV heads per block
    mlp: list[list[int]] = field(default_factory=list)  # FFN channels per block

    def to_json(self) -> dict:
        return {"attention_kv_heads": self.attention, "mlp_channels": self.mlp}

    @classmethod
    def from_json(cls, data: dict, blocks: list[Block]) -> "Selection":
        try:
            sel = cls([list(map(int, x)) for x in data["attention_kv_heads"]],
                      [list(map(int, x)) for x in data["mlp_channels"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise CompressError(f"S2FT adapter: malformed selection ({exc!r})") from None
        sel.validate(blocks)
        return sel

    def validate(self, blocks: list[Block]) -> None:
        for kind, per_block, size in (("attention", self.attention, lambda b: b.num_kv_heads),
                                      ("mlp", self.mlp, lambda b: b.intermediate)):
            if len(per_block) != len(blocks):
                raise CompressError(f"S2FT: {kind} selection covers {len(per_block)} blocks, "
                                    f"the model has {len(blocks)}")
            for b, idx in zip(blocks, per_block):
                n = size(b)
                if sorted(set(idx)) != list(idx) or (idx and not 0 <= idx[0] <= idx[-1] < n):
                    raise CompressError(f"S2FT: {kind} selection of block {b.index} must be sorted distinct "
                                        f"indices in [0, {n}), got {idx[:8]}{'...' if len(idx) > 8 else ''}")


def unit_count(ratio: float, pool: int, name: str, unit: str) -> int:
    """Units a ratio selects from a pool: round to nearest; a ratio > 0 selecting none is an error."""
    if ratio == 0:
        return 0
    k = min(pool, math.floor(ratio * pool + 0.5))
    if k == 0:
        raise CompressError(f"S2FT: {name}={ratio} selects no {unit} out of {pool}; "
                            f"use at least {1 / pool:.3g} (or 0 to skip)")
    return k


def select_units(model: nn.Module, blocks: list[Block], config: S2FTConfig,
                 batches: Iterable[Any] | None = None) -> Selection:
    """Run the configured strategy; ``batches`` (input-id tensors or dicts of model inputs)
    are needed by ``activation`` and ``gradient``."""
    kinds = (("attention", config.attention_ratio, "attention_ratio", "KV head groups"),
             ("mlp", config.mlp_ratio, "mlp_ratio", "FFN channels"))
    if config.strategy == "random":
        gen = torch.Generator().manual_seed(config.seed)
        chosen = {}
        for kind, ratio, name, unit in kinds:
            per_block = [b.num_kv_heads if kind == "attention" else b.intermediate for b in blocks]
            pool = sum(per_block)
            k = unit_count(ratio, pool, name, f"{unit} (pool over all {len(blocks)} layers)")
            picks = torch.randperm(pool, generator=gen)[:k].tolist()
            starts = [sum(per_block[:i]) for i in range(len(blocks))]
            chosen[kind] = [sorted(p - s for p in picks if s <= p < s + n)
                            for s, n in zip(starts, per_block)]
        return Selection(chosen["attention"], chosen["mlp"])
    scores = unit_scores(model, blocks, config.strategy, batches)
    chosen = {}
    for kind, ratio, name, unit in kinds:
        per_block = []
        for b in blocks:
            n = b.num_kv_heads if kind == "attention" else b.intermediate
            k = unit_count(ratio, n, name, f"{unit} per layer")
            per_block.append(sorted(torch.topk(scores[kind][b.index], k).indices.tolist()) if k else [])
        chosen[kind] = per_block
    return Selection(chosen["attention"], chosen["mlp"])


def _group_norm(col_sq: torch.Tensor, b: Block) -> torch.Tensor:
    """Per-column squared norms of o_proj's input [num_heads*head_dim] -> norm per KV group."""
    return col_sq.reshape(b.num_kv_heads, -1).sum(dim=1).sqrt()


def unit_scores(model: nn.Module, blocks: list[Block], strategy: str,
                batches: Iterable[Any] | None) -> dict[str, list[torch.Tensor]]:
    """Importance per unit: {"attention": [per block: [num_kv_heads]], "mlp": [[intermediate]]}.

    weight: column norms of o_proj / down_proj; activation: norms of their input
    channels over the batches; gradient: column norms of their accumulated weight
    gradient (causal-LM loss on the batches). Higher is more important.
    """
    if strategy == "weight":
        col_sq = {b.index: {n: b.linears[n].weight.detach().float().pow(2).sum(dim=0)
                            for n in ("o_proj", "down_proj")} for b in blocks}
    elif strategy in ("activation", "gradient"):
        col_sq = _data_column_norms(model, blocks, strategy, batches)
    else:
        raise CompressError(f"S2FT: unknown selection strategy {strategy!r}; "
                            f"known: random, weight, activation, gradient")
    return {"attention": [_group_norm(col_sq[b.index]["o_proj"], b).cpu() for b in blocks],
            "mlp": [col_sq[b.index]["down_proj"].sqrt().cpu() for b in blocks]}


def _batch_inputs(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch.to(device)}
    if isinstance(batch, dict) and "input_ids" in batch:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise CompressError(f"S2FT: calibration batches must be input-id tensors or dicts with input_ids, "
                        f"got {type(batch).__name__}")


def _data_column_norms(model: nn.Module, blocks: list[Block], strategy: str,
                       batches: Iterable[Any] | None) -> dict[int, dict[str, torch.Tensor]]:
    if batches is None:
        raise CompressError(f"S2FT: strategy {strategy!r} needs calibration batches; none were given")
    device = next(model.parameters()).device
    targets = {(b.index, n): b.linears[n] for b in blocks for n in ("o_proj", "down_proj")}
    sums = {key: torch.zeros(m.in_features, dtype=torch.float32, device=m.weight.device)
            for key, m in targets.items()}
    seen = 0
    if strategy == "activation":
        def make_hook(key):
            def hook(_module, args):
                x = args[0].detach()
                sums[key] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(dim=0)
            return hook

        handles = [m.register_forward_pre_hook(make_hook(key)) for key, m in targets.items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    model(**_batch_inputs(batch, device), use_cache=False)
                    seen += 1
        finally:
            for h in handles:
                h.remove()
    else:
        # Gradients only for o_proj/down_proj weights; everything else stays as it was.
        was = {p: p.requires_grad for p in model.parameters()}
        grads = {key: None for key in targets}
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for m in targets.values():
                m.weight.requires_grad_(True)
                m.weight.grad = None
            with torch.enable_grad():
                for batch in batches:
                    inputs = _batch_inputs(batch, device)
                    inputs.setdefault("labels", inputs["input_ids"])
                    model(**inputs, use_cache=False).loss.backward()
                    seen += 1
            for key, m in targets.items():
                grads[key] = m.weight.grad
                if grads[key] is not None:
                    sums[key] = grads[key].float().pow(2).sum(dim=0)
        finally:
            for m in targets.values():
                m.weight.grad = None
            for p, flag in was.items():
                p.requires_grad_(flag)
    if seen == 0:
        raise CompressError(f"S2FT: strategy {strategy!r} needs calibration batches; the iterable was empty")
    return {b.index: {n: sums[(b.index, n)] for n in ("o_proj", "down_proj")} for b in blocks}
