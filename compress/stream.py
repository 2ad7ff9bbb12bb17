"""Streaming: a model too large for memory compressed one decoder block at a time, resumably.

The model is a skeleton (``compress.checkpoint``: meta parameters; a mixture of experts split into
per-expert linears, ``compress.moe``, read through ``compress.checkpoint_names``); a ``StreamSource`` hangs on it
(``compress.runner.BLOCK_SOURCE``) and the layer-wise runner asks it for each block
(``acquire``: read into the skeleton's own block, in place, on the compute device), hands it back
when final (``done``) and lets it go (``release``: back to meta). Host memory holds one block, the
calibration activations and the quantization results of one block: those of the other blocks are
on disk (``SpilledDict``), read back when a later step asks for them.

Each layer-wise walk over the blocks is one *pass* (a recipe's steps make one each; ``gptq_mixed``
two: its probe, then its solve). In the work folder (beside the output, ``.<out>.stream``):

- ``blocks/NNNNN.safetensors``: block N as the latest pass left it — its parameters in the model's
  dtype and the results the steps keep per module (quantized levels, kept float weights). The next
  pass reads the block from there (the first from the source checkpoint).
- ``export/model-…-of-….safetensors``: the last pass writes each finished block packed (GPTQ v1,
  ``compress.stream_export``) as it goes.
- ``manifest.json`` (written atomically after every block): the run's fingerprint, for each block
  the last pass that finished it, the per-module reports, a mixture of experts' tokens per expert
  (the report of a block a resumed run skips), the export shards written.

An interrupted run, started again with the same recipe and output, finds the manifest: passes that
finished are skipped, and the unfinished one restarts at its first block not yet written (the
finished blocks before it are replayed to rebuild the calibration activations, not solved again).
``resume: false`` writes no ``blocks/`` file in the last pass (the packed shard only): half the
disk, and an interrupted run starts over.

Under torchrun (``compress.distributed``) every rank reads the block at work from the source (or
from ``blocks/``) and keeps the same manifest in memory, but rank 0 alone writes the work folder:
it opens (or starts) the manifest while the others wait, and they then read its manifest (the
ranks must share the filesystem); each finished block ends at a ``barrier``, so that no rank reads a
block file before rank 0 has written it, and a rank that failed stops the others there. A restart
resumes at rank 0's first unwritten block on every rank.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import save_file

from compress.checkpoint import Checkpoint, materialise, to_meta
from compress.distributed import barrier, gather_json, is_main
from compress.errors import CompressError
from compress.fs import write_atomic
from compress.fs import write_json_atomic
from compress.quantize.grid import QuantSpec
from compress.quantize.solvers import QuantResult

MANIFEST = "manifest.json"


def work_dir_for(out_dir: str | Path) -> Path:
    out = Path(out_dir).resolve()
    return out.parent / f".{out.name}.stream"


def _encode(obj: Any) -> Any:
    """JSON keeps only string keys; the probe reports of gptq_mixed are keyed by bit width."""
    if isinstance(obj, dict):
        if any(not isinstance(k, str) for k in obj):
            return {"__int_keys__": [[int(k), _encode(v)] for k, v in obj.items()]}
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__int_keys__"}:
            return {k: _decode(v) for k, v in obj["__int_keys__"]}
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


class SpilledDict(MutableMapping):
    """A ``RunState`` field (fqn -> result) whose entries of finished blocks live on disk: ``spill``
    writes a block's entries into its file and drops them from memory; reading one reads it back."""

    def __init__(self, kind: str, load: Callable[[str, str], Any]):
        self.kind, self._load = kind, load
        self._mem: dict[str, Any] = {}
        self._disk: set[str] = set()  # names stored in their block's file

    def __getitem__(self, name):
        if name in self._mem:
            return self._mem[name]
        if name in self._disk:
            return self._load(self.kind, name)
        raise KeyError(name)

    def __setitem__(self, name, value):
        self._mem[name] = value
        self._disk.discard(name)

    def __delitem__(self, name):
        if name not in self._mem and name not in self._disk:
            raise KeyError(name)
        self._mem.pop(name, None)
        self._disk.discard(name)

    def __iter__(self):
        return iter(list(self._mem) + sorted(self._disk - set(self._mem)))

    def __len__(self):
        return len(set(self._mem) | self._disk)

    def take(self, prefix: str) -> dict[str, Any]:
        """The block's entries (read back where spilled), removed from memory and marked on disk."""
        names = [n for n in self if n.startswith(prefix)]
        out = {n: self[n] for n in names}
        for n in names:
            self._mem.pop(n, None)
            self._disk.add(n)
        return out


def _quant_tensors(name: str, res: QuantResult) -> tuple[dict[str, torch.Tensor], dict]:
    t = {f"quant::{name}::{k}": getattr(res, k).cpu().contiguous() for k in ("qweight", "scales", "zeros", "g_idx")}
    meta = {"bits": res.spec.bits, "group_size": res.spec.group_size, "sym": res.spec.sym, "error": res.error}
    return t, meta


class StreamSource:
    """The block source of a streamed model (see the module docstring)."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, work: Path, *, dtype: torch.dtype,
                 fingerprint: str, total_passes: int, resume: bool, write_shard: Callable | None):
        self.model, self.checkpoint, self.work, self.dtype = model, checkpoint, work, dtype
        self.total_passes, self.keep_blocks, self.write_shard = total_passes, resume, write_shard
        self.layout = block_layout_path(model)
        self.n_blocks = len(model.get_submodule(self.layout))
        self.pass_index = -1
        # Seconds spent reading blocks (``acquire``: the checkpoint's tensors onto the device) and writing them
        # (``done``: the export shard and, when kept, the block's file), summed over the run: where a streamed
        # run's time goes besides the algorithm. The device is synchronised at their edges so that the GPU work
        # queued before them is not counted in them.
        self.seconds = {"read": 0.0, "write": 0.0}
        self.writer = is_main()  # under torchrun: rank 0 alone writes the work folder
        ranks = gather_json(fingerprint)
        if ranks is not None and len(set(ranks)) > 1:
            raise CompressError(f"the ranks run different recipes, models or calibration sets "
                                f"(fingerprints {ranks}): start every rank with the same command")
        # Without the blocks of the last pass an interrupted last pass cannot be replayed: start over.
        if self.writer:
            self.manifest = self._open_manifest(fingerprint if resume else None)
        barrier()  # the other ranks read the manifest rank 0 has just opened or started
        if not self.writer:
            self.manifest = self._read_manifest(fingerprint if resume else None)
        self.quant = SpilledDict("quant", self._load_state)
        self.float_weight = SpilledDict("float_weight", self._load_state)
        for kind, d in (("quant", self.quant), ("float_weight", self.float_weight)):
            d._disk.update(self.manifest["state"].get(kind, []))

    # -------------------------------------------------------------- manifest and files
    def _open_manifest(self, fingerprint: str | None) -> dict:
        path = self.work / MANIFEST
        if path.is_file():
            manifest = json.loads(path.read_text())
            if fingerprint is not None and manifest.get("fingerprint") == fingerprint:
                return manifest
        if self.work.exists():
            shutil.rmtree(self.work)  # another recipe or model (or no resume): nothing there is ours to resume
        (self.work / "blocks").mkdir(parents=True, exist_ok=True)
        (self.work / "export").mkdir(parents=True, exist_ok=True)
        manifest = {"fingerprint": fingerprint, "blocks": self.n_blocks, "finished": [-1] * self.n_blocks,
                    "reports": {}, "experts": {}, "shards": {}, "state": {}}
        write_json_atomic(path, manifest)
        return manifest

    def _read_manifest(self, fingerprint: str | None) -> dict:
        path = self.work / MANIFEST
        manifest = json.loads(path.read_text()) if path.is_file() else None
        if manifest is None or manifest.get("fingerprint") != fingerprint:
            raise CompressError(f"{path}: rank 0's manifest is not there (or not this run's): the ranks of a "
                                "streamed run must share the filesystem of the output folder")
        return manifest

    def _save_manifest(self) -> None:
        write_json_atomic(self.work / MANIFEST, self.manifest)

    def _block_file(self, i: int) -> Path:
        return self.work / "blocks" / f"{i:05d}.safetensors"

    @property
    def resumed(self) -> bool:
        return any(p >= 0 for p in self.manifest["finished"])

    def _load_state(self, kind: str, name: str):
        i = int(name[len(self.layout) + 1:].split(".", 1)[0])
        f = Checkpoint.of_file(self._block_file(i))
        if kind == "float_weight":
            return f.get(f"float_weight::{name}")
        meta = json.loads(f.metadata()["quant"])[name]
        t = {k: f.get(f"quant::{name}::{k}") for k in ("qweight", "scales", "zeros", "g_idx")}
        return QuantResult(weight=None, spec=QuantSpec(meta["bits"], meta["group_size"], meta["sym"]),
                           error=meta["error"], **t)

    # -------------------------------------------------------------- the runner's protocol
    def begin_pass(self) -> None:
        self.pass_index += 1

    @property
    def last_pass(self) -> bool:
        return self.pass_index == self.total_passes - 1

    def finished(self, i: int) -> bool:
        return self.manifest["finished"][i] >= self.pass_index

    def reports(self, i: int) -> dict:
        return _decode(self.manifest["reports"].get(str(self.pass_index), {}).get(str(i), {}))

    def experts(self, i: int) -> dict:
        """A mixture of experts: block ``i``'s tokens per expert in this pass, as ``done`` recorded them."""
        return self.manifest.get("experts", {}).get(str(self.pass_index), {}).get(str(i), {})

    def acquire(self, i: int, device) -> nn.Module:
        t0 = _synced_clock(device)
        block = self.model.get_submodule(self.layout)[i]
        source = self.checkpoint if self.manifest["finished"][i] < 0 else Checkpoint.of_file(self._block_file(i))
        materialise(block, source, f"{self.layout}.{i}.", self.dtype, device, missing_bias_zero=True)
        getattr(source, "close", lambda: None)()  # unmap what the block's read touched (Checkpoint.close)
        self.seconds["read"] += _synced_clock(device) - t0
        return block

    def release(self, i: int, block: nn.Module) -> None:
        to_meta(block)

    def done(self, i: int, block: nn.Module, reports: dict | None = None, experts: dict | None = None) -> None:
        """Block ``i`` is final for this pass: write it (and its packed shard in the last pass).
        ``reports``: its per-module reports; ``experts``: its expert lists' report (tokens per expert,
        every rank's), kept in the manifest so that a resumed run reports the blocks it skips."""
        t0 = _synced_clock(next(block.parameters(), torch.empty(0)).device)
        prefix = f"{self.layout}.{i}."
        quant, floats = self.quant.take(prefix), self.float_weight.take(prefix)
        if self.last_pass and self.write_shard is not None and self.writer:
            self.manifest["shards"][str(i)] = self.write_shard(i, block, quant)
        if not self.writer:
            pass  # rank 0 writes (every rank holds the same block and results)
        elif not self.last_pass or self.keep_blocks:
            tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
            meta = {}
            for name, res in quant.items():
                t, meta[name] = _quant_tensors(name, res)
                tensors.update(t)
            tensors.update({f"float_weight::{n}": w.contiguous() for n, w in floats.items()})
            # atomic: a crash leaves the old version or the new one
            write_atomic(self._block_file(i),
                         lambda tmp: save_file(tensors, str(tmp), metadata={"quant": json.dumps(meta)}))
        else:
            self._block_file(i).unlink(missing_ok=True)
        if self.last_pass and not self.keep_blocks:
            for n in quant:  # the shard holds them now; nothing reads them in this run again
                self.quant._disk.discard(n)
        state = self.manifest["state"]
        state["quant"] = sorted(self.quant._disk)
        state["float_weight"] = sorted(self.float_weight._disk)
        self.manifest["reports"].setdefault(str(self.pass_index), {})[str(i)] = _encode(reports or {})
        if experts:
            self.manifest.setdefault("experts", {}).setdefault(str(self.pass_index), {})[str(i)] = experts
        self.manifest["finished"][i] = self.pass_index
        if self.writer:
            self._save_manifest()
        self.seconds["write"] += time.perf_counter() - t0
        barrier()  # block i is on disk before any rank reads it (next pass), or goes on past a failed rank


def _synced_clock(device) -> float:
    """perf_counter() once the device's queued work has finished (CUDA), so a span timed between two
    calls holds only the work issued inside it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def block_layout_path(model: nn.Module) -> str:
    from compress.layout import find_block_list, pinned_layout

    pinned = pinned_layout(model)
    return pinned.blocks if pinned is not None else find_block_list(model)


def fingerprint(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]
