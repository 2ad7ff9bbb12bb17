"""The layer-wise calibration runner shared by every data-driven algorithm.

It captures the inputs of the first decoder block (a forward pre-hook raises
``StopForward``, so nothing past block 0 runs), then walks the blocks in order.
For each block it runs the true-sequential subsets (q,k,v -> o -> gate,up ->
down): accumulators are attached to the subset's modules, the block runs on all
cached inputs, the algorithm solves those modules, and the next subset sees the
already-solved outputs. Finally the block is replayed to produce the inputs of
the next one. Activations live on the offload device (CPU); only the block at
work is on the compute device, so a model larger than the GPU still goes through.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compress.errors import CompressError


@dataclass(frozen=True)
class BlockLayout:
    blocks: str  # fqn of the ModuleList of decoder blocks
    subsets: tuple[tuple[str, ...], ...]  # true-sequential subsets, names relative to a block


_LLAMA_LIKE = BlockLayout(
    blocks="model.layers",
    subsets=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
             ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
)
LAYOUTS: dict[str, BlockLayout] = {"llama": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "mistral": _LLAMA_LIKE}


def block_layout(model: nn.Module) -> BlockLayout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in LAYOUTS:
        return LAYOUTS[model_type]
    raise CompressError(
        f"no block layout for model type {model_type!r} ({type(model).__name__}); "
        f"supported: {', '.join(LAYOUTS)}. Add a BlockLayout to compress.runner.LAYOUTS.")


class StopForward(Exception):
    """Raised by the capture hook: block 0's inputs are all we need from the full model."""


class Accumulator(Protocol):
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None: ...


class HessianAccumulator:
    """Running mean of H = 2·X·Xᵀ over every token seen by a linear layer (GPTQ's statistic)."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        self.H *= self.count / (self.count + n)
        self.count += n
        x = x * math.sqrt(2.0 / self.count)
        self.H += x.T @ x


@dataclass
class BlockInput:
    hidden: torch.Tensor  # on the offload device
    kwargs: dict[str, Any]  # attention mask, position ids / embeddings... on the offload device


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5 decoder layers return the hidden states; older ones a tuple.
    return out[0] if isinstance(out, (tuple, list)) else out


def _move_except(module: nn.Module, skip: nn.Module, device: torch.device | str) -> None:
    """Move every parameter and buffer of ``module`` to ``device``, except ``skip``'s subtree."""
    for child in module.children():
        if child is skip:
            continue
        if any(m is skip for m in child.modules()):
            _move_except(child, skip, device)
        else:
            child.to(device)
    for key, p in module._parameters.items():
        if p is not None:
            module._parameters[key] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
    for key, b in module._buffers.items():
        if b is not None:
            module._buffers[key] = b.to(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Iterable[torch.Tensor], *,
                         device: torch.device | str, offload: torch.device | str = "cpu",
                         layout: BlockLayout | None = None) -> list[BlockInput]:
    """Run the model up to block 0 for each batch and keep what block 0 receives."""
    layout = layout or block_layout(model)
    blocks = model.get_submodule(layout.blocks)
    home = next(model.parameters()).device
    _move_except(model, blocks, device)
    captured: list[BlockInput] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "hidden_states")}
        kwargs["use_cache"] = False
        captured.append(BlockInput(hidden.to(offload), _to(kwargs, offload)))
        raise StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        _move_except(model, blocks, home)
    return captured


def run_blocks(blocks: nn.ModuleList, inputs: list[BlockInput], *, device, offload="cpu",
               start: int = 0, progress: bool = False) -> list[BlockInput]:
    """Replay blocks[start:] on cached inputs, one block on ``device`` at a time."""
    for i in tqdm(range(start, len(blocks)), desc="replay", disable=not progress):
        inputs = _replay(blocks[i], inputs, device=device, offload=offload)
    return inputs


@torch.no_grad()
def _replay(block: nn.Module, inputs: list[BlockInput], *, device, offload) -> list[BlockInput]:
    home = next(block.parameters()).device
    block.to(device)
    try:
        return [BlockInput(_block_output(block(x.hidden.to(device), **_to(x.kwargs, device))).to(offload), x.kwargs)
                for x in inputs]
    finally:
        block.to(home)


@dataclass
class LayerwiseResult:
    reports: dict[str, Any]  # per-module reports returned by ``solve``
    final: list[BlockInput]  # outputs of the last block (before the final norm)


def run_layerwise(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    modules: dict[str, nn.Module],
    make_accumulator: Callable[[str, nn.Module, torch.device], Accumulator],
    solve: Callable[[str, nn.Module, Accumulator], Any] | None = None,
    device: torch.device | str = "cpu",
    offload: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "layer-wise",
    share_inputs: bool = False,
    solve_group: Callable[[dict[str, nn.Module], Accumulator], dict[str, Any]] | None = None,
) -> LayerwiseResult:
    """Walk the blocks, accumulate statistics of ``modules`` per subset, solve, replay.

    ``modules`` (fqn -> module) are the targets; modules of a block that are not
    in a declared subset are solved in one extra subset at the end, so no target
    is silently skipped. ``share_inputs``: accumulators depend only on the input
    (not the output), so modules fed the same tensor (q,k,v; gate,up) share one
    accumulator instead of repeating the same X·Xᵀ. ``solve_group`` (with
    ``share_inputs``): called once per set of modules that shared an accumulator,
    ``{fqn: module}`` in block order, returning ``{fqn: report}`` — one solve for
    q,k,v stacked instead of three (``solve`` is then unused).
    """
    if solve is None and (solve_group is None or not share_inputs):
        raise TypeError("run_layerwise needs `solve`, or `solve_group` with share_inputs=True")
    device = torch.device(device)
    layout = block_layout(model)
    blocks = model.get_submodule(layout.blocks)
    inputs = capture_block_inputs(model, batches, device=device, offload=offload, layout=layout)
    if not inputs:
        raise CompressError("the calibration set is empty: no batch reached the first block")
    outside = [n for n in modules if not n.startswith(layout.blocks + ".")]
    if outside:
        raise CompressError(f"layer-wise algorithms work on decoder blocks; these targets lie outside "
                            f"{layout.blocks}: {outside[:5]} (add them to `ignore`)")
    reports: dict[str, Any] = {}
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
        block = blocks[i]
        prefix = f"{layout.blocks}.{i}."
        mine = {n[len(prefix):]: m for n, m in modules.items() if n.startswith(prefix)}
        declared = [s for subset in layout.subsets for s in subset]
        subsets = [tuple(s for s in subset if s in mine) for subset in layout.subsets]
        rest = tuple(s for s in mine if s not in declared)
        subsets = [s for s in subsets + [rest] if s]
        home = next(block.parameters()).device
        block.to(device)
        try:
            for subset in subsets:
                accs = {s: make_accumulator(prefix + s, mine[s], device) for s in subset}
                owner: list = []  # this forward's (input tensor, module that accumulated it)
                alias: dict[str, str] = {}
                fired: set[str] = set()  # subset modules seen in this forward
                hooks = [mine[s].register_forward_hook(
                    _accumulate(s, accs, owner, alias, share_inputs, fired, len(subset))) for s in subset]
                try:
                    with torch.no_grad():
                        for x in inputs:
                            try:
                                block(x.hidden.to(device), **_to(x.kwargs, device))
                            except StopForward:  # every module of the subset has its input: skip the rest
                                pass
                            owner.clear()
                            fired.clear()
                finally:
                    for h in hooks:
                        h.remove()
                if solve_group is not None and share_inputs:
                    groups: dict[str, dict[str, nn.Module]] = {}
                    for s in subset:
                        groups.setdefault(alias.get(s, s), {})[prefix + s] = mine[s]
                    for root, members in groups.items():
                        reports.update(solve_group(members, accs[root]))
                else:
                    for s in subset:
                        acc = accs[alias.get(s, s)]
                        reports[prefix + s] = solve(prefix + s, mine[s], acc)
            inputs = _replay(block, inputs, device=device, offload=offload)
        finally:
            block.to(home)
    return LayerwiseResult(reports, inputs)


def _accumulate(name: str, accs: dict, owner: list, alias: dict, share: bool, fired: set, total: int):
    def hook(_module, args, output):
        x = args[0]
        # Identity, not data_ptr: a freed tensor's memory can be reused by another.
        first = next((n for t, n in owner if t is x), None) if share else None
        if first is not None and first != name:
            alias[name] = first  # the same input was already accumulated by ``first``
        else:
            if share:
                owner.append((x, name))
            accs[name].add_batch(x.detach(), output.detach())
        fired.add(name)
        if len(fired) == total:
            # The rest of the block feeds nothing this subset needs (q,k,v need only the first
            # norm; o the attention): stopping here saves up to a block forward per subset.
            raise StopForward
    return hook
