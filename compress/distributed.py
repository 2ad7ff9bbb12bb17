"""Several processes, one run: torchrun's ranks share the layer-wise runner's work (torch.distributed).

``torchrun --nproc-per-node N -m compress run RECIPE --out DIR`` starts N processes; each finds
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) and
``launch`` joins them in one process group: NCCL when the recipe's device is CUDA (rank ``r`` on
``cuda:LOCAL_RANK``), gloo on the CPU. Without that environment (or with one process) nothing here
does anything, and the run is the single-process one.

What the ranks split (hooks in ``compress.runner``):

- calibration: each rank captures and replays only its contiguous share of the calibration
  batches, so activation memory is 1/N per rank (``shard_batches``);
- statistics: after each subset's forward, every accumulator's sums (``compress.accumulators``) are
  gathered and added in rank order in float64 (``reduce_statistics``), so every rank holds the
  statistics of all the batches; the float32 Hessian a solver sees is the one-process one;
- solves: a subset's independent solves (a stacked q,k,v group, one expert) go to ranks by
  estimated cost (rows × columns², to the rank with the least work so far); the owner solves, then
  broadcasts the modules' parameters, the report and the run state the solve wrote for them
  (quantized levels, kept float weights) (``solve_units``). Only solves marked with ``shared`` are
  split: a solve that keeps other results of its own (``gptq_mixed``'s probe keeps its candidates)
  runs on every rank, with the same inputs and so the same result;
- MoE routed-token counts are added over ranks for the report (``merge_expert_counts``).

Rank 0 alone evaluates (baseline, verify) and writes the export (atomically, ``compress.export``);
the other ranks wait for it at a barrier (``wait_for_main``). A streamed run (``compress.stream``)
likewise: rank 0 alone writes the work folder (blocks, shards, manifest), each block before a
``barrier``, and the other ranks read rank 0's manifest (the ranks must share the filesystem).

Faults: a rank that raises leaves the group (``launch`` destroys it on the way out); the others
fail in their next collective — at once on gloo (the peer's sockets close), and under torchrun at
once on NCCL too (torchrun stops the remaining ranks) — and at the latest when a collective waits
longer than ``timeout_s`` (``COMPRESS_DIST_TIMEOUT_S``, default 1800 s). The barriers at which the
others wait for rank 0 alone have their own timeout (``COMPRESS_DIST_WAIT_S``, default 4 h): rank 0's
evaluation may be long. Nothing is written before the end, and the export is atomic, so a failed run
leaves no folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from compress.errors import CompressError
from compress.runtime import resolve_device

__all__ = ["Session", "barrier", "current", "gather_json", "is_main", "launch", "merge_expert_counts", "one_unit",
           "rank_device", "reduce_statistics", "shard_batches", "shared", "solve_units", "union_alias", "wait_for_main"]

ENV_TIMEOUT = "COMPRESS_DIST_TIMEOUT_S"
ENV_WAIT = "COMPRESS_DIST_WAIT_S"
DEFAULT_TIMEOUT_S = 1800.0  # gloo's own default; NCCL's is 600
DEFAULT_WAIT_S = 4 * 3600.0
_CHUNK_BYTES = 64 * 2**20  # per rank and gather: bounds the extra memory of adding N ranks' sums


@dataclass
class Session:
    """This process's place in the run: its rank among ``world``, the collectives' backend and device."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device  # where tensors go for a collective: cuda:LOCAL_RANK on NCCL, the CPU on gloo
    timeout_s: float
    wait_s: float
    control: Any = None  # a gloo group with the longer timeout, for waiting on rank 0 alone
    loads: list[float] = field(default_factory=list)  # solve cost given to each rank so far

    def describe(self) -> dict:
        return {"world_size": self.world, "backend": self.backend, "timeout_s": self.timeout_s}


_SESSION: Session | None = None  # mirrors torch.distributed's own process-wide default group


def current() -> Session | None:
    return _SESSION


def is_main() -> bool:
    """Rank 0, or a run without torch.distributed: the process that evaluates, logs and exports."""
    return _SESSION is None or _SESSION.rank == 0


@contextmanager
def launch(device: str | torch.device = "auto", *, timeout_s: float | None = None,
           wait_s: float | None = None) -> Iterator[Session | None]:
    """Join torchrun's process group for the length of a run; ``None`` without torchrun (one process)."""
    global _SESSION
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        yield None
        return
    if _SESSION is not None or dist.is_initialized():
        raise CompressError("torch.distributed is already initialized in this process; "
                            "compress.distributed.launch starts the group itself")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CompressError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the run with torchrun")
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    dev = resolve_device(device)
    timeout = float(timeout_s if timeout_s is not None else os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    wait = float(wait_s if wait_s is not None else os.environ.get(ENV_WAIT, DEFAULT_WAIT_S))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", rank=rank, world_size=world, timeout=timedelta(seconds=timeout),
                                device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        control = dist.new_group(backend="gloo", timeout=timedelta(seconds=wait))
        _SESSION = Session(rank, world, local, dist.get_backend(), dev, timeout, wait, control, [0.0] * world)
        yield _SESSION
    finally:
        _SESSION = None
        dist.destroy_process_group()  # a rank that raised leaves at once: its peers fail rather than wait


def rank_device(device: torch.device) -> torch.device:
    """The compute device of this rank: ``cuda:LOCAL_RANK`` under NCCL, else ``device`` itself."""
    s = _SESSION
    return s.device if s is not None and device.type == "cuda" else device


def wait_for_main() -> None:
    """The other ranks wait here while rank 0 works alone (evaluation, export); on the control
    group's longer timeout. Without a session: nothing."""
    if _SESSION is not None:
        dist.barrier(group=_SESSION.control)


def barrier() -> None:
    """Every rank waits for the others, on the collectives' timeout (a rank that died or hangs fails
    it): where rank 0 has just written a file the others read next. Without a session: nothing."""
    if _SESSION is not None:
        dist.barrier()


def gather_json(obj: Any) -> list | None:
    """Every rank's ``obj`` (JSON), in rank order, on every rank; ``None`` without a session."""
    s = _SESSION
    if s is None:
        return None
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8).to(s.device)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=s.device)
    sizes = [torch.empty_like(n) for _ in range(s.world)]
    dist.all_gather(sizes, n)
    buf = torch.zeros(max(int(k) for k in sizes), dtype=torch.uint8, device=s.device)
    buf[:data.numel()] = data
    got = [torch.empty_like(buf) for _ in range(s.world)]
    dist.all_gather(got, buf)
    return [json.loads(g[:int(k)].cpu().numpy().tobytes().decode()) for g, k in zip(got, sizes)]


# ----------------------------------------------------------------------------- calibration data


def shard_batches(batches: Iterable) -> Iterable:
    """This rank's contiguous share of the calibration batches (the first ranks take one more when
    they do not divide evenly); all of them without a session."""
    s = _SESSION
    if s is None:
        return batches
    batches = list(batches)
    if len(batches) < s.world:
        raise CompressError(f"the calibration set has {len(batches)} batches for {s.world} ranks: every rank needs "
                            f"at least one (lower calibration.batch_size or raise calibration.num_samples)")
    per, extra = divmod(len(batches), s.world)
    start = s.rank * per + min(s.rank, extra)
    return batches[start:start + per + (s.rank < extra)]


def _sum_in_rank_order(s: Session, t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` added in rank order (the same bits on every rank), in chunks that bound the
    extra memory to N × 64 MB."""
    flat = t.reshape(-1)
    out = torch.empty_like(flat)
    step = max(1, _CHUNK_BYTES // max(1, flat.element_size()))
    for lo in range(0, flat.numel(), step):
        part = flat[lo:lo + step].to(s.device).contiguous()
        parts = [torch.empty_like(part) for _ in range(s.world)]
        dist.all_gather(parts, part)
        total = parts[0]
        for p in parts[1:]:
            total += p
        out[lo:lo + step] = total.to(out.device)
    return out.view(t.shape)


def union_alias(parts: list[dict[str, str]]) -> dict[str, str]:
    """The ranks' alias maps (module -> the module whose accumulator took its input) as one. A module
    is aliased where it ran: an expert that no token reached on one rank has no alias there, and an
    empty accumulator; every rank must still reduce and solve the same set."""
    merged: dict[str, str] = {}
    for part in parts:
        for name, root in part.items():
            if merged.setdefault(name, root) != root:
                raise CompressError(f"{name} shared its input with {merged[name]} on one rank and with {root} on "
                                    f"another: the ranks' blocks differ")
    return merged


def reduce_statistics(accs: dict[str, Any], alias: dict[str, str]) -> None:
    """Replace each accumulator's sums with those of every rank, and ``alias`` (updated in place) with
    the union of every rank's; accumulators of aliased modules are left out (they took nothing)."""
    s = _SESSION
    if s is None:
        return
    alias.update(union_alias(gather_json(alias)))
    for name in sorted(n for n in accs if n not in alias):  # the same names, in the same order, on every rank
        acc = accs[name]
        if not hasattr(acc, "statistics"):
            raise CompressError(f"{type(acc).__name__} (for {name}) cannot be combined across processes: it has "
                                f"no statistics()/load_statistics(); run this step in one process")
        acc.load_statistics({k: _sum_in_rank_order(s, t) for k, t in acc.statistics().items()})


def merge_expert_counts(experts: dict[str, Any]) -> dict[str, Any]:
    """The runner's per-expert report with the routed tokens of every rank."""
    s = _SESSION
    if s is None:
        return experts
    for name in sorted(experts):
        report = experts[name]
        total = _sum_in_rank_order(s, torch.tensor(report["routed_tokens"], dtype=torch.int64)).tolist()
        report.update(routed_tokens=total, min_routed=min(total))
    return experts


# ----------------------------------------------------------------------------- solves


class Shared:
    """A solve whose results the other ranks may take from the rank that ran it: its report, the
    solved modules' parameters and buffers, and what it wrote into ``state`` (a ``RunState``:
    ``quant`` and ``float_weight``) for those modules. Calls ``fn`` unchanged."""

    def __init__(self, fn: Callable, state: Any = None, rebuild_quant: Callable | None = None):
        self.fn, self.state, self.rebuild_quant = fn, state, rebuild_quant

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def shared(fn: Callable, state: Any = None, rebuild_quant: Callable | None = None) -> Shared:
    """Mark ``fn`` (a runner ``solve`` or ``solve_group``) as safe to split across ranks: everything
    it changes is in its report, its modules and ``state``'s per-module entries. Its reports must be
    JSON (string keys): that is how they travel. ``rebuild_quant(tensors, spec, error)`` makes a
    ``state.quant`` record again on the receiving ranks (the quantizer's own type: this module
    knows none)."""
    return Shared(fn, state, rebuild_quant)


def _cost(members: dict[str, nn.Module]) -> float:
    cost = 0.0
    for m in members.values():
        w = getattr(m, "weight", None)
        if w is not None:
            cost += w.shape[0] * w.shape[1] ** 2 if w.dim() == 2 else w.numel()
    return cost


def solve_units(units: list[tuple[dict[str, nn.Module], Callable[[], dict]]], fn: Callable) -> dict[str, Any]:
    """Run a subset's solves: ``units`` are (modules, a call that solves them and returns their reports).

    One process, or ``fn`` not ``shared``: every call here, in order. Otherwise each unit goes to the
    rank with the least cost so far (largest units first), runs there, and its results are broadcast."""
    s = _SESSION
    if s is None or not isinstance(fn, Shared):
        reports: dict[str, Any] = {}
        for _, call in units:
            reports.update(call())
        return reports
    owners = [0] * len(units)
    for i in sorted(range(len(units)), key=lambda i: -_cost(units[i][0])):  # stable: ties in unit order
        owners[i] = min(range(s.world), key=lambda r: s.loads[r])
        s.loads[owners[i]] += _cost(units[i][0]) or 1.0
    done = {i: call() for i, (_, call) in enumerate(units) if owners[i] == s.rank}
    reports = {}
    for i, (members, _) in enumerate(units):
        reports.update(_share(s, owners[i], members, done.get(i), fn))
    return reports


def one_unit(solve: Callable, name: str, module: nn.Module, acc: Any) -> dict[str, Any]:
    """A runner ``solve`` of one module as a unit: ``{name: report}``."""
    return {name: solve(name, module, acc)}


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def _share(s: Session, owner: int, members: dict[str, nn.Module], report: dict | None, fn: Shared) -> dict:
    """Broadcast one solved unit from ``owner``: a JSON header, then every tensor's bytes in one buffer."""
    state = fn.state
    if s.rank == owner:
        tensors: list[tuple[str, torch.Tensor]] = []
        meta: dict[str, Any] = {"report": report, "quant": {}}
        for fqn, module in members.items():
            tensors += [(f"param/{fqn}/{n}", t.detach()) for n, t in _own_tensors(module)]
            q = state.quant.get(fqn) if state is not None else None
            if q is not None:
                meta["quant"][fqn] = {"spec": dataclasses.asdict(q.spec), "error": q.error}
                tensors += [(f"quant/{fqn}/{k}", getattr(q, k)) for k in ("weight", "qweight", "scales", "zeros",
                                                                          "g_idx") if getattr(q, k) is not None]
            if state is not None and fqn in state.float_weight:
                tensors.append((f"float/{fqn}", state.float_weight[fqn]))
        meta["tensors"] = [[k, list(t.shape), str(t.dtype).removeprefix("torch.")] for k, t in tensors]
        head = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
        body = (torch.cat([t.contiguous().reshape(-1).view(torch.uint8).to(s.device) for _, t in tensors])
                if tensors else torch.empty(0, dtype=torch.uint8, device=s.device))
        sizes = torch.tensor([head.numel(), body.numel()], dtype=torch.int64, device=s.device)
    else:
        sizes = torch.empty(2, dtype=torch.int64, device=s.device)
    dist.broadcast(sizes, src=owner)
    if s.rank != owner:
        head = torch.empty(int(sizes[0]), dtype=torch.uint8)
        body = torch.empty(int(sizes[1]), dtype=torch.uint8, device=s.device)
    head_dev = head.to(s.device)
    dist.broadcast(head_dev, src=owner)
    dist.broadcast(body, src=owner)
    meta = json.loads(head_dev.cpu().numpy().tobytes().decode())
    if s.rank != owner:
        _install(meta, body, members, state, fn.rebuild_quant)
    return meta["report"]


def _install(meta: dict, body: torch.Tensor, members: dict[str, nn.Module], state: Any,
             rebuild_quant: Callable | None) -> None:
    got, at = {}, 0
    for key, shape, dtype in meta["tensors"]:
        dt = getattr(torch, dtype)
        n = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dt).element_size()
        got[key] = body[at:at + n].clone().view(dt).reshape(shape)  # a fresh buffer: aligned for any dtype
        at += n
    for fqn, module in members.items():
        for n, t in _own_tensors(module):
            t.data.copy_(got[f"param/{fqn}/{n}"])
        if f"float/{fqn}" in got:
            state.float_weight[fqn] = got[f"float/{fqn}"].cpu().clone()
    if meta["quant"]:
        if rebuild_quant is None:
            raise CompressError("internal: a shared solve wrote quantized results but gave no rebuild_quant")
        for fqn, q in meta["quant"].items():
            part = {k: got[f"quant/{fqn}/{k}"].cpu().clone() if f"quant/{fqn}/{k}" in got else None
                    for k in ("weight", "qweight", "scales", "zeros", "g_idx")}
            state.quant[fqn] = rebuild_quant(part, q["spec"], q["error"])
