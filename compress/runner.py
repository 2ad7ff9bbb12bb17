"""The layer-wise calibration runner shared by every data-driven algorithm.

It captures the inputs of the first decoder block and the keyword arguments of every block
(each block's forward is swapped for a stub that records them and passes the hidden states
on, so no block computes; gemma's sliding and global layers get different masks and rotary
tables), then walks the blocks in order. For each block it runs the true-sequential subsets
(q,k,v -> o -> gate,up -> down, inferred from the model: ``compress.layout``): accumulators
are attached to the subset's modules, the block runs on all cached inputs, the algorithm
solves those modules, and the next subset sees the already-solved outputs. Finally the block
is replayed to produce the inputs of the next one. Activations live on the offload device
(CPU); only the block at work is on the compute device, so a model larger than the GPU still
goes through. A model streamed from its checkpoint (``compress.stream``) has a block source:
the runner asks it for each block and hands the finished block back to be written and freed.

Under torchrun (``compress.distributed``) each rank runs its share of the batches, the statistics are
added over ranks after each subset's forward, and a subset's solves are split across ranks.

Mixtures of experts (``compress.moe``): each expert's statistics come from the tokens routed
to it; an expert with fewer than its list's ``min_tokens`` gets a second pass that feeds it
every token (for statistics only); the tokens each expert received are reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from compress import moe
from compress.accumulators import HessianAccumulator  # GPTQ's statistic; importable from here as before
from compress.distributed import merge_expert_counts, one_unit, reduce_statistics, shard_batches, solve_units
# BlockLayout and LAYOUTS (the overrides) live in compress.layout; importable from here as before.
from compress.layout import (LAYOUTS, BlockLayout, block_linears, find_block_list, pin_layout, pinned_layout,
                             trace_subsets)
from compress.errors import CompressError

__all__ = ["LAYOUTS", "BlockLayout", "block_layout", "capture_block_inputs", "run_layerwise", "HessianAccumulator"]

# A streamed model (compress.stream) carries its block source under this attribute: an object with
# ``begin_pass()``, ``acquire(i, device) -> block``, ``done(i, block, reports, experts)`` (final: write
# it, with its per-module reports and its expert lists' tokens per expert), ``release(i, block)`` (free
# it, written or not), and for resuming ``finished(i)`` / ``reports(i)`` / ``experts(i)``.
BLOCK_SOURCE = "_compress_block_source"
_TRACE_TOKENS = 16  # the dummy sequence whose forward through block 0 gives the layout


def block_layout(model: nn.Module) -> BlockLayout:
    """The model's decoder blocks and true-sequential subsets: an override if one is pinned or
    registered, else inferred (``compress.layout``) from one traced forward of block 0 on a dummy
    sequence, and pinned on the model so that it is traced once."""
    layout = pinned_layout(model)
    if layout is not None:
        return layout
    path = find_block_list(model)
    blocks = model.get_submodule(path)
    ids = (torch.arange(_TRACE_TOKENS) % model.get_input_embeddings().num_embeddings)[None]
    source = model.__dict__.get(BLOCK_SOURCE)
    first = next(blocks[0].parameters(), None)
    if source is not None:  # streamed: where the embedding is (the compute device), not a block read to the host
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    else:
        device = "cpu" if first is None or first.is_meta else first.device
    sample = capture_block_inputs(model, [ids], device=device, offload=device, layout=BlockLayout(path, ()))[0]
    block, home = _acquire_block(model, blocks, 0, device)
    try:
        with moe.observing(block):  # every expert sees the tokens, so every expert is placed
            subsets = trace_subsets(block, sample.hidden, sample.kwargs)
    finally:
        _release_block(model, blocks, 0, block, home)
    layout = BlockLayout(path, subsets, inferred=True)
    pin_layout(model, layout)
    return layout


class StopForward(Exception):
    """Raised by the capture hook: block 0's inputs are all we need from the full model."""


class Accumulator(Protocol):
    def add_batch(self, inp: torch.Tensor, out: torch.Tensor) -> None: ...


@dataclass
class BlockInput:
    hidden: torch.Tensor  # on the offload device
    kwargs: dict[str, Any]  # attention mask, position ids / embeddings... on the offload device
    # every block's kwargs for this batch (shared objects stay shared); None: block 0's serve all
    per_block: list[dict[str, Any]] | None = None

    def at_block(self, i: int) -> "BlockInput":
        """The same hidden states with block ``i``'s keyword arguments."""
        return self if self.per_block is None else BlockInput(self.hidden, self.per_block[i], self.per_block)


def activation_home(setting: str, device, calibration, model: nn.Module) -> torch.device:
    """Where the calibration activations between blocks live. ``host``: CPU RAM (the runner's default);
    ``device``: the compute device; ``auto``: the device when it is an accelerator and one block's inputs
    plus outputs (2 x tokens x hidden) fit in a quarter of its free memory, else the host. On an H200 the
    8B shape's 128 x 2048 tokens take 4 GiB there instead of in host RAM."""
    device = torch.device(device)
    if setting not in ("auto", "host", "device"):
        raise CompressError(f"calibration.activations must be auto, host or device, got {setting!r}")
    if setting == "host" or device.type == "cpu":
        return torch.device("cpu")
    if setting == "device":
        return device
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if calibration is None or device.type != "cuda" or hidden is None:  # nothing to size them by: the host
        return torch.device("cpu")
    elem = next(model.parameters()).element_size()
    need = 2 * calibration.input_ids.numel() * hidden * elem
    free, _total = torch.cuda.mem_get_info(device)
    return device if need <= free // 4 else torch.device("cpu")


def _to(obj: Any, device: torch.device | str, memo: dict | None = None) -> Any:
    """``obj`` with its tensors on ``device``; with ``memo`` (id -> (original, moved)) a tensor met
    twice is moved once and stays one object."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # holding the original keeps its id from reuse
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _block_output(out: Any) -> torch.Tensor:
    # transformers 5 decoder layers return the hidden states; older ones a tuple.
    return out[0] if isinstance(out, (tuple, list)) else out


def _move_except(module: nn.Module, skip: nn.Module, device: torch.device | str) -> None:
    """Move every parameter and buffer of ``module`` to ``device``, except ``skip``'s subtree and
    tensors on the meta device (a streamed model's output head: nothing before block 0 reads it)."""
    for child in module.children():
        if child is skip:
            continue
        if any(m is skip for m in child.modules()):
            _move_except(child, skip, device)
        else:
            child._apply(lambda t: t if t.is_meta else t.to(device))  # what .to() does, meta left alone
    for key, p in module._parameters.items():
        if p is not None and not p.is_meta:
            module._parameters[key] = nn.Parameter(p.data.to(device), requires_grad=p.requires_grad)
    for key, b in module._buffers.items():
        if b is not None and not b.is_meta:
            module._buffers[key] = b.to(device)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: Iterable[torch.Tensor], *,
                         device: torch.device | str, offload: torch.device | str = "cpu",
                         layout: BlockLayout | None = None) -> list[BlockInput]:
    """Run the model through its blocks' stubs for each batch: what block 0 receives, and the
    keyword arguments of every block (``BlockInput.per_block`` when some block's differ)."""
    blocks = model.get_submodule(layout.blocks if layout is not None else find_block_list(model))
    home = next(p for p in model.parameters() if not p.is_meta).device
    _move_except(model, blocks, device)
    captured: list[BlockInput] = []
    seen: list = []  # this batch: (hidden, kwargs of each block so far)

    def stub(i):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            seen.append({k: v for k, v in kwargs.items()
                         if k not in ("past_key_values", "past_key_value", "hidden_states")} | {"use_cache": False})
            if i == 0:
                seen.insert(0, hidden)
            if i == len(blocks) - 1:
                raise StopForward  # the head would only cost time (and is not there when streaming)
            return hidden  # transformers 5 blocks return the hidden states
        return forward

    for i, block in enumerate(blocks):
        block.forward = stub(i)  # an instance attribute: nn.Module.__call__ finds it first
    try:
        for ids in batches:
            seen.clear()
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
            hidden, per_block = seen[0], seen[1:]
            memo: dict = {}
            moved = [_to(kw, offload, memo) for kw in per_block]
            same = all(kw.keys() == per_block[0].keys() and all(kw[k] is per_block[0][k] for k in kw)
                       for kw in per_block)
            captured.append(BlockInput(hidden.to(offload), moved[0], None if same else moved))
    finally:
        for block in blocks:
            del block.forward
        _move_except(model, blocks, home)
    return captured


def run_blocks(blocks: nn.ModuleList, inputs: list[BlockInput], *, device, offload="cpu",
               start: int = 0, progress: bool = False) -> list[BlockInput]:
    """Replay blocks[start:] on cached inputs, one block on ``device`` at a time."""
    for i in tqdm(range(start, len(blocks)), desc="replay", disable=not progress):
        inputs = _replay(blocks[i], [x.at_block(i) for x in inputs], device=device, offload=offload)
    return inputs


def _acquire_block(model: nn.Module, blocks: nn.ModuleList, i: int, device) -> tuple[nn.Module, Any]:
    """Block ``i`` on ``device`` and where it was: moved there, or read by the model's block source."""
    source = model.__dict__.get(BLOCK_SOURCE)
    if source is not None:
        return source.acquire(i, device), None
    block = blocks[i]
    home = next(block.parameters()).device
    block.to(device)
    return block, home


def _release_block(model: nn.Module, blocks: nn.ModuleList, i: int, block: nn.Module, home) -> None:
    source = model.__dict__.get(BLOCK_SOURCE)
    if source is not None:
        source.release(i, block)
    else:
        block.to(home)


@torch.no_grad()
def _replay(block: nn.Module, inputs: list[BlockInput], *, device, offload) -> list[BlockInput]:
    home = next(block.parameters()).device
    block.to(device)
    try:
        return [BlockInput(_block_output(block(x.hidden.to(device), **_to(x.kwargs, device))).to(offload), x.kwargs,
                       x.per_block) for x in inputs]
    finally:
        block.to(home)


@dataclass
class LayerwiseResult:
    reports: dict[str, Any]  # per-module reports returned by ``solve``
    final: list[BlockInput]  # outputs of the last block (before the final norm)
    # per expert list (fqn): routed tokens per expert, and the experts whose statistics came from all
    # tokens (too few routed ones, or routing "all"); empty for a dense model
    experts: dict[str, Any] = field(default_factory=dict)


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
    twin: Any = None,
) -> LayerwiseResult:
    """Walk the blocks, accumulate statistics of ``modules`` per subset, solve, replay.

    ``modules`` (fqn -> module) are the targets; modules of a block that are not
    in a declared subset are solved in one extra subset at the end, so no target
    is silently skipped. ``share_inputs``: accumulators depend only on the input
    (not the output), so modules fed the same tensor (q,k,v; gate,up) share one
    accumulator instead of repeating the same X·Xᵀ. ``solve_group`` (with
    ``share_inputs``): called once per set of modules that shared an accumulator,
    ``{fqn: module}`` in block order, returning ``{fqn: report}`` — one solve for
    q,k,v stacked instead of three (``solve`` is then unused). ``twin`` (``compress.twin.FloatTwin``):
    runs the float block beside this one, so accumulators can pair float and quantized inputs.
    """
    if solve is None and (solve_group is None or not share_inputs):
        raise TypeError("run_layerwise needs `solve`, or `solve_group` with share_inputs=True")
    solver = solve_group if solve_group is not None and share_inputs else solve  # split across ranks if `shared`
    device = torch.device(device)
    layout = block_layout(model)
    blocks = model.get_submodule(layout.blocks)
    inputs = capture_block_inputs(model, shard_batches(batches), device=device, offload=offload, layout=layout)
    if not inputs:
        raise CompressError("the calibration set is empty: no batch reached the first block")
    outside = [n for n in modules if not n.startswith(layout.blocks + ".")]
    if outside:
        raise CompressError(f"layer-wise algorithms work on decoder blocks; these targets lie outside "
                            f"{layout.blocks}: {outside[:5]} (add them to `ignore`)")
    reports: dict[str, Any] = {}
    experts: dict[str, Any] = {}
    traced: dict[frozenset, tuple] = {}  # a block's linears -> its subsets, for blocks unlike block 0
    source = model.__dict__.get(BLOCK_SOURCE)
    if source is not None:
        source.begin_pass()
    for i in tqdm(range(len(blocks)), desc=desc, unit="block", disable=not progress):
        inputs = [x.at_block(i) for x in inputs]
        prefix = f"{layout.blocks}.{i}."
        if source is not None and source.finished(i):  # written before an interruption: replayed, not solved
            reports.update(source.reports(i))
            experts.update(source.experts(i))
            if not source.finished(len(blocks) - 1):  # a later block still needs this one's outputs
                inputs = _replay(source.acquire(i, device), inputs, device=device, offload=offload)
                source.release(i, blocks[i])
            continue
        mine = {n[len(prefix):]: m for n, m in modules.items() if n.startswith(prefix)}
        block, home = _acquire_block(model, blocks, i, device)
        try:
            if twin is not None:
                twin.begin(block, inputs)
            block_subsets = _subsets_of(layout, block, inputs[0], device, traced)
            declared = [s for subset in block_subsets for s in subset]
            subsets = [tuple(s for s in subset if s in mine) for subset in block_subsets]
            rest = tuple(s for s in mine if s not in declared)
            subsets = [s for s in subsets + [rest] if s]
            expert_of = moe.expert_of(block)
            starved: dict[str, set[int]] = {}
            for subset in subsets:
                accs = {s: make_accumulator(prefix + s, mine[s], device) for s in subset}
                owner: list = []  # this forward's (input tensor, module that accumulated it)
                alias: dict[str, str] = {}
                fired: set[str] = set()  # subset modules seen in this forward
                hooks = [mine[s].register_forward_hook(
                    _accumulate(s, accs, owner, alias, share_inputs, fired, len(subset))) for s in subset]
                try:
                    with torch.no_grad():
                        for j, x in enumerate(inputs):
                            if twin is not None:  # the float block on the same batch, first
                                twin.feed(j, [mine[s] for s in subset], device)
                            try:
                                block(x.hidden.to(device), **_to(x.kwargs, device))
                            except StopForward:  # every module of the subset has its input: skip the rest
                                pass
                            owner.clear()
                            fired.clear()
                finally:
                    for h in hooks:
                        h.remove()
                reduce_statistics(accs, alias)  # under torchrun: the statistics of every rank's batches
                if expert_of:  # a mixture of experts: experts short of tokens take every token's statistics
                    _refill_starved(block, inputs, [s for s in subset if s in expert_of], expert_of, mine, accs,
                                    alias, make_accumulator, prefix, share_inputs, device, starved)
                moe.check_fed(subset, accs, alias, prefix)
                if solve_group is not None and share_inputs:
                    groups: dict[str, dict[str, nn.Module]] = {}
                    for s in subset:
                        groups.setdefault(alias.get(s, s), {})[prefix + s] = mine[s]
                    units = [(members, partial(solve_group, members, accs[root])) for root, members in groups.items()]
                else:
                    units = [({prefix + s: mine[s]},
                              partial(one_unit, solve, prefix + s, mine[s], accs[alias.get(s, s)])) for s in subset]
                reports.update(solve_units(units, solver))
            with moe.counting(block) as routed:
                inputs = _replay(block, inputs, device=device, offload=offload)
            if twin is not None:
                twin.end(device, offload)
            # Merged over the ranks block by block: a streamed run keeps each block's final counts (resume).
            mine_experts = merge_expert_counts(moe.expert_report(block, prefix, routed, starved))
            experts.update(mine_experts)
            if source is not None:  # final: the source writes it (and its reports) before it is freed
                source.done(i, block, {n: r for n, r in reports.items() if n.startswith(prefix)}, mine_experts)
        finally:
            _release_block(model, blocks, i, block, home)
    return LayerwiseResult(reports, inputs, experts)


def _subsets_of(layout: BlockLayout, block: nn.Module, sample: BlockInput, device, traced: dict) -> tuple:
    """The layout's subsets, or, for an inferred layout and a block with linears block 0 lacks (a
    dense layer among sparse ones), this block's own, traced once per set of linears."""
    names = frozenset(block_linears(block))
    if not layout.inferred or names <= {s for subset in layout.subsets for s in subset}:
        return layout.subsets
    if names not in traced:
        with moe.observing(block):
            traced[names] = trace_subsets(block, sample.hidden.to(device), _to(sample.kwargs, device))
    return traced[names]


def _refill_starved(block, inputs, names, expert_of, mine, accs, alias, make_accumulator, prefix, share, device,
                    starved: dict[str, set[int]]) -> None:
    """Experts of this subset whose statistics saw fewer than their list's ``min_tokens`` routed
    tokens: one more pass in which they (alone) see every token, replacing their accumulators."""
    lists = dict(moe.expert_lists(block))
    short: dict[str, set[int]] = {}
    for s in names:
        lst, e = expert_of[s]
        count = getattr(accs[alias.get(s, s)], "count", None)
        if lists[lst].routing == "routed" and count is not None and count < lists[lst].min_tokens:
            short.setdefault(lst, set()).add(e)
    again = [s for s in names if expert_of[s][1] in short.get(expert_of[s][0], ())]
    if not again:
        return
    fresh = {s: make_accumulator(prefix + s, mine[s], device) for s in again}
    owner: list = []
    new_alias: dict[str, str] = {}
    fired: set[str] = set()
    hooks = [mine[s].register_forward_hook(_accumulate(s, fresh, owner, new_alias, share, fired, len(again)))
             for s in again]
    try:
        with torch.no_grad(), moe.observing(block, {k: frozenset(v) for k, v in short.items()}):
            for x in inputs:
                try:
                    block(x.hidden.to(device), **_to(x.kwargs, device))
                except StopForward:
                    pass
                owner.clear()
                fired.clear()
    finally:
        for h in hooks:
            h.remove()
    reduce_statistics(fresh, new_alias)
    for s in again:
        accs[s] = fresh[s]
        alias.pop(s, None)
    alias.update(new_alias)
    for lst, es in short.items():
        starved.setdefault(lst, set()).update(es)


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
