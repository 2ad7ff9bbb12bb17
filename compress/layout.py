"""Where a model's decoder blocks are, and the true-sequential subsets inside each one — found from
the model itself, not from a table of architectures.

Blocks: the ``nn.ModuleList`` whose children are all of one class, hold ``nn.Linear`` layers and
carry the most parameters (``model.layers`` for every decoder this toolkit has met). Counting
parameters works on the meta device, so a model's skeleton is enough.

Subsets: one forward of one block with autograd on. Each linear's output is tagged; walking back
from each linear's input through the autograd graph gives the linears it depends on. A linear's
*level* is 0 when it depends on none, else one more than the highest level it depends on; a subset
is every linear of one level, in order of first use. Linears of one level never feed each other,
so solving them together and feeding the next level their solved outputs is GPTQ's
true-sequential order: q,k,v -> o -> gate,up -> down on llama-like blocks (where each subset is
also exactly "the linears that read the same tensor"), qkv_proj -> o_proj -> gate_up_proj ->
down_proj on Phi-3, and on a mixture of experts every expert's gate,up (and a shared expert's) in
one subset, every down in the next.

Overrides, for exotic cases: ``LAYOUTS[model_type] = BlockLayout(...)`` (code), or a recipe's
``model.layout`` (``pin_layout``); either replaces the inference entirely.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from compress.errors import CompressError


@dataclass(frozen=True)
class BlockLayout:
    blocks: str  # fqn of the ModuleList of decoder blocks
    subsets: tuple[tuple[str, ...], ...]  # true-sequential subsets, names relative to a block
    # traced from block 0: a block with other linears (a dense layer among MoE ones) is traced too;
    # a layout given by hand is taken as it is (linears it does not name are solved last)
    inferred: bool = False


# model_type -> layout, for architectures whose structure inference gets wrong (none known today).
LAYOUTS: dict[str, BlockLayout] = {}

_PINNED = "_compress_block_layout"  # attribute of a model holding its layout (inferred or given)


def pin_layout(model: nn.Module, layout: BlockLayout | None) -> None:
    """Fix ``model``'s layout (a recipe's override, or an inferred one to reuse); None forgets it."""
    if layout is None:
        model.__dict__.pop(_PINNED, None)
    else:
        model.__dict__[_PINNED] = layout


def pinned_layout(model: nn.Module) -> BlockLayout | None:
    """The layout fixed for ``model``: pinned on it, else registered for its model type."""
    found = model.__dict__.get(_PINNED)
    if found is None:
        found = LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", None))
    return found


def model_type_of(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def find_block_list(model: nn.Module) -> str:
    """The fqn of the decoder blocks' ModuleList (see the module docstring)."""
    pinned = pinned_layout(model)
    if pinned is not None:
        return pinned.blocks
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or not name:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name)
    if best is None:
        raise CompressError(
            f"found no decoder blocks in this {model_type_of(model)} model ({type(model).__name__}): no ModuleList "
            f"of identical blocks that hold nn.Linear layers; give the layout by hand (a recipe's model.layout: "
            f"{{blocks: ..., subsets: [[...], ...]}}, or compress.layout.LAYOUTS)")
    return best[1]


def block_linears(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def trace_subsets(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[tuple[str, ...], ...]:
    """The true-sequential subsets of ``block`` from one forward on ``hidden`` (see the module
    docstring). Linears the forward never calls are left out (the runner solves them last)."""
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    order: list[str] = []
    producer: dict[Any, str] = {}  # autograd node of a linear's output -> that linear
    reads: dict[str, list[Any]] = {}  # linear -> autograd nodes of its inputs (at call time)

    def hook(name):
        def record(_module, args, output):
            if name not in reads:
                order.append(name)
                reads[name] = []
            x = args[0] if args else None
            reads[name].append(getattr(x, "grad_fn", None))
            if getattr(output, "grad_fn", None) is not None:
                producer[output.grad_fn] = name
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.enable_grad():
            block(hidden.detach().clone().requires_grad_(True), **kwargs)
    finally:
        for h in handles:
            h.remove()
    level: dict[str, int] = {}
    for name in order:  # producers are called before their consumers, so their level is known
        deps = set()
        for node in reads[name]:
            deps |= _upstream_linears(node, producer)
        deps.discard(name)
        level[name] = 1 + max(level[d] for d in deps) if deps else 0
    depth = max(level.values(), default=-1) + 1
    return tuple(tuple(n for n in order if level[n] == k) for k in range(depth))


def _upstream_linears(node, producer: dict) -> set[str]:
    """The linears whose outputs ``node`` (an autograd node) is computed from, nearest first: the
    walk stops at a linear's output, whose own inputs are that linear's business."""
    found: set[str] = set()
    stack, seen = [node], set()
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if fn in producer:
            found.add(producer[fn])
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found
