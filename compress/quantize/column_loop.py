"""GPTQ's inner column loop, run eagerly or replayed from a recorded CUDA graph.

:func:`quantize_block` rounds one block of columns in order and spreads each column's error
over the block's later columns (the maths is :func:`column_loop`). On CUDA the loop is a few
thousand tiny kernels, so it is launch-bound: each block shape's loop is recorded once as a CUDA
graph and replayed (``_GRAPHS``, a process-wide cache that :func:`free_graphs` empties when a
quantizing step finishes). A failed capture warns and runs the same loop eagerly.

Where Triton is installed, a block whose grids are all fitted before its first column runs as one
Triton kernel instead (``column_kernel.py``), checked against the recorded loop on the first block.

The outer driver (blocks, Cholesky factor, lazy updates between blocks) is
:func:`compress.quantize.solvers.gptq_solve`.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from .grid import QuantSpec, fit_grid

__all__ = ["column_loop", "free_graphs", "quantize_block", "use_graphs"]


def fit_columns(W1: Tensor, S1: Tensor, Z1: Tensor, start: int, end: int, spec: QuantSpec) -> None:
    """Fit the grid of columns start..end on W1's current values into S1 and Z1 (every column of the group
    gets the row's scale and zero), in place."""
    s, z = fit_grid(W1[:, start:end], spec)
    S1[:, start:end] = s.unsqueeze(1)
    Z1[:, start:end] = z.float().unsqueeze(1)


def column_loop(W1: Tensor, U1: Tensor, S1: Tensor, Z1: Tensor, L1: Tensor, Err1: Tensor,
                fits: tuple[tuple[int, int], ...], spec: QuantSpec) -> None:
    """Quantize the columns of one block in order, in place.

    W1 [out, b] the block's weights (updated as columns are rounded), U1 [b, b] its part of the
    upper Cholesky factor of H⁻¹, S1/Z1 [out, b] each column's scale and (float) zero, L1 the
    levels and Err1 the scaled errors out. ``fits``: (start, end) column ranges whose grid is
    fitted on the current weights when ``start`` is reached. Tensor ops only, no host syncs: the
    same code runs eagerly and inside a CUDA graph.
    """
    maxq = spec.maxq
    starts = dict(fits)
    for i in range(W1.shape[1]):
        end = starts.get(i)
        if end is not None:
            fit_columns(W1, S1, Z1, i, end, spec)
        w, s, z = W1[:, i], S1[:, i], Z1[:, i]
        q = torch.clamp(torch.round(w / s) + z, 0, maxq)
        L1[:, i] = q
        err = (w - s * (q - z)) / U1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        Err1[:, i] = err


class _ColumnGraph:
    """One block shape's column loop recorded as a CUDA graph: a few thousand tiny kernels
    replayed without Python between them (the loop is launch-bound on GPUs)."""

    def __init__(self, out_f: int, width: int, fits, spec: QuantSpec, device: torch.device):
        self.fits, self.spec = fits, spec
        self.bufs = [torch.zeros(out_f, width, device=device) for _ in range(5)]  # W1 S1 Z1 L1 Err1
        self.U1 = torch.eye(width, device=device)
        self.bufs[1].fill_(1.0)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # warm-up off the capture, as CUDA graphs require
            self._body()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=_graph_pool(device)):
            self._body()

    def _body(self) -> None:
        W1, S1, Z1, L1, Err1 = self.bufs
        column_loop(W1, self.U1, S1, Z1, L1, Err1, self.fits, self.spec)

    def run(self, W1, U1, S1, Z1):
        for buf, src in zip(self.bufs, (W1, S1, Z1)):
            buf.copy_(src)
        self.U1.copy_(U1)
        self.graph.replay()
        _, S, Z, L, E = self.bufs
        return L.clone(), E.clone(), S.clone(), Z.clone()


_GRAPHS: dict[tuple, _ColumnGraph] = {}
_POOLS: dict[int, object] = {}
_GRAPHS_BROKEN: list[str] = []  # why CUDA graphs were given up in this process, if they were
_MAX_GRAPHS = 32


def _graph_pool(device: torch.device):
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _POOLS:
        _POOLS[key] = torch.cuda.graph_pool_handle()
    return _POOLS[key]


def free_graphs() -> None:
    """Drop the recorded column-loop graphs and their buffers (kept between calls so every layer of
    a model reuses a few captures); quantization steps call this when they finish."""
    _GRAPHS.clear()
    _POOLS.clear()


def use_graphs(graphs: bool | None, device: torch.device) -> bool:
    if device.type != "cuda" or graphs is False:
        return False
    return not _GRAPHS_BROKEN or graphs is True


def quantize_block(W1: Tensor, U1: Tensor, S1: Tensor, Z1: Tensor, fits, spec: QuantSpec,
                   graphs: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the column loop on one block: (levels, errors, scales, zeros) per column."""
    if (graphs or os.environ.get("TRITON_INTERPRET") == "1") and all(start == 0 for start, _ in fits):
        from . import column_kernel  # here, not at the top: imports Triton, which CPU runs never use
        done = _kernel_block(W1, U1, S1, Z1, fits, spec, graphs) if column_kernel.available(W1.device) else None
        if done is not None:
            return done
    return _loop_block(W1, U1, S1, Z1, fits, spec, graphs)


def _kernel_block(W1, U1, S1, Z1, fits, spec: QuantSpec, graphs: bool):
    """The block through the Triton kernel (``column_kernel``), its grids fitted first (at column 0
    nothing has moved yet, so this is the fit the loop makes there); None when the kernel failed or, on
    the process's first block, differed from the loop (both turn it off). The kernel reads W1 and writes
    new tensors, so the loop can still run on the same inputs."""
    from . import column_kernel
    S, Z = S1.clone(), Z1.clone()
    for start, end in fits:
        fit_columns(W1, S, Z, start, end, spec)
    try:
        L, E = column_kernel.kernel_column_loop(W1, U1, S, Z, spec.maxq)
    except Exception as exc:  # noqa: BLE001 - Triton's compile and launch errors have many types; the loop serves
        column_kernel.turn_off(f"{type(exc).__name__}: {exc}")
        return None
    if column_kernel.state["status"] == "unchecked":
        ref = _loop_block(W1.clone(), U1, S1.clone(), Z1.clone(), fits, spec, graphs)
        same = all(torch.equal(a, b) for a, b in zip((L, E, S, Z), ref))
        if not same:
            column_kernel.turn_off("its levels or errors differ from the recorded loop's on the first block")
            return None
        column_kernel.state["status"] = "on"
    return L, E, S, Z


def _loop_block(W1: Tensor, U1: Tensor, S1: Tensor, Z1: Tensor, fits, spec: QuantSpec,
                graphs: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if graphs:
        key = (W1.device, *W1.shape, fits, spec)
        try:
            if key not in _GRAPHS:
                if len(_GRAPHS) >= _MAX_GRAPHS:
                    _GRAPHS.clear()
                _GRAPHS[key] = _ColumnGraph(W1.shape[0], W1.shape[1], fits, spec, W1.device)
            return _GRAPHS[key].run(W1, U1, S1, Z1)
        except RuntimeError as exc:  # capture unsupported here: the eager loop gives the same result
            _GRAPHS.pop(key, None)
            _GRAPHS_BROKEN.append(str(exc))
            warnings.warn(f"GPTQ: CUDA-graph column loop unavailable ({exc}); running it eagerly",
                          RuntimeWarning, stacklevel=3)
    L1, Err1 = torch.empty_like(W1), torch.empty_like(W1)
    column_loop(W1, U1, S1, Z1, L1, Err1, fits, spec)
    return L1, Err1, S1, Z1
