"""GPTQ's column loop for one block as a single Triton kernel (CUDA), where Triton is installed.

Within a block the rows of W are independent: row r's column i is rounded on its grid and its
error updates only row r's later columns. So each program takes a few rows, keeps their block of
columns in registers and walks the columns in order: one launch per block instead of the dozen
tiny kernels per column of :func:`compress.quantize.column_loop.column_loop` (which a CUDA graph
replays, but each still costs a few microseconds: ~25 us a column, 0.67 s of an 8B block on an
H200, ``bench/results/scale/``).

The arithmetic is the eager loop's, operation by operation, with IEEE division, round-half-to-even
and no fused multiply-adds (``enable_fp_fusion=False``), so the levels and errors are meant to be
the same bits. That is checked, not assumed: the first block a process runs here is also run
through the recorded loop, and a difference turns the kernel off for the process with a warning
(``tests/test_quant_solvers.py`` compares them on CPU, in Triton's interpreter, and on a GPU).

Only grids fitted before the block's first column are supported (every fit at column 0, or none:
group size a multiple of the block, or static groups); other blocks take the recorded loop.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

try:  # an optional accelerator: torch's CUDA wheels bring Triton, CPU-only installs do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["available", "kernel_column_loop", "state"]

# Process-wide: "unchecked" until the first block compared the kernel with the recorded loop, then
# "on", or "off" with the reason (a difference or an error).
state = {"status": "unchecked", "why": None}


def available(device: torch.device) -> bool:
    """Triton is importable, the kernel was not turned off, and the block lives on a CUDA device (or
    Triton's interpreter runs it on the CPU: ``TRITON_INTERPRET=1``, for the tests)."""
    if triton is None or state["status"] == "off":
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _round_half_even(x):
        f = tl.floor(x)
        d = x - f  # exact: f is x's integer part
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))

    @triton.jit
    def _columns(W, U, S, Z, L, E, R, B, stride_w, stride_u, maxq,
                 BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_B)
        rmask = rows < R
        cmask = cols < B
        w = tl.load(W + rows[:, None] * stride_w + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        for i in range(B):
            wi = tl.sum(tl.where(cols[None, :] == i, w, 0.0), axis=1)  # column i: one term, an exact sum
            at = rows * stride_w + i
            si = tl.load(S + at, mask=rmask, other=1.0)
            zi = tl.load(Z + at, mask=rmask, other=0.0)
            q = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(wi, si)) + zi, 0.0), maxq)
            err = tl.div_rn(wi - si * (q - zi), tl.load(U + i * stride_u + i))
            tl.store(L + at, q, mask=rmask)
            tl.store(E + at, err, mask=rmask)
            # U is upper triangular: the columns before i get err * 0 and are never read again.
            u = tl.load(U + i * stride_u + cols, mask=cmask, other=0.0)
            w = w - err[:, None] * u[None, :]


def kernel_column_loop(W1: Tensor, U1: Tensor, S1: Tensor, Z1: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """(levels, scaled errors) of one block, as :func:`compress.quantize.column_loop.column_loop` computes
    them with no fit inside the block (S1, Z1 hold every column's grid). Inputs float32 [rows, b], U1 [b, b]."""
    W1, U1, S1, Z1 = (t.float().contiguous() for t in (W1, U1, S1, Z1))
    rows, b = W1.shape
    L1, E1 = torch.empty_like(W1), torch.empty_like(W1)
    block_b = triton.next_power_of_2(b)
    block_r = max(1, min(16, 4096 // block_b))  # a tile of rows x the block's columns, in registers
    _columns[(triton.cdiv(rows, block_r),)](
        W1, U1, S1, Z1, L1, E1, rows, b, W1.stride(0), U1.stride(0), float(maxq),
        BLOCK_R=block_r, BLOCK_B=block_b, enable_fp_fusion=False)
    return L1, E1


def turn_off(why: str) -> None:
    state.update(status="off", why=why)
    warnings.warn(f"GPTQ: the Triton column kernel is off for this process ({why}); "
                  "the recorded column loop runs instead", RuntimeWarning, stacklevel=3)
