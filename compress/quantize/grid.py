"""The uniform quantization grid of weight-only quantization (GPTQ / RTN).

A grid is, per output row (and per group of input columns), a ``scale`` and an
integer ``zero`` point; a weight ``w`` is stored as the level
``q = clamp(round(w / scale) + zero, 0, maxq)`` and read back as
``scale * (q - zero)``, with ``maxq = 2**bits - 1``.

Everything here is pure tensor maths: no module walking, no I/O, and every
tensor is created on the device of its input.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ALLOWED_BITS = (2, 3, 4, 8)
ALLOWED_GROUP_SIZES = (-1, 32, 64, 128)
GRIDS = ("minmax", "mse")
# The MSE grid's clipping search: ranges shrunk by 1, 1 - 1/MSE_STEPS, ... down to 1 - MSE_MAX_SHRINK
# of the min/max range. Shrink 1 is the min/max grid itself, so the search never does worse than it.
MSE_STEPS = 64
MSE_MAX_SHRINK = 0.75

__all__ = [
    "ALLOWED_BITS",
    "ALLOWED_GROUP_SIZES",
    "QuantSpec",
    "dequantize",
    "fit_grid",
    "quantize",
]


@dataclass(frozen=True)
class QuantSpec:
    """What grid to quantize to.

    bits: 2, 3, 4 or 8.
    group_size: input columns that share one (scale, zero) per output row; -1 means
        one group spanning the whole row. The last group of a row may be partial
        (e.g. 576 inputs with group_size 128 = 4 full groups + one of 64).
    sym: symmetric grid (zero fixed at the integer midpoint 2**(bits-1)) instead of
        an asymmetric min/max grid.
    grid: "minmax" spans each group's range; "mse" searches a shrunk range (clipping) per
        row and keeps the one with the least squared rounding error (:func:`fit_grid`).
    """

    bits: int
    group_size: int = 128
    sym: bool = False
    grid: str = "minmax"

    def __post_init__(self) -> None:
        # bool is an int subclass: reject True/False explicitly.
        if isinstance(self.bits, bool) or self.bits not in ALLOWED_BITS:
            raise ValueError(f"QuantSpec.bits={self.bits!r} is not supported; allowed: {list(ALLOWED_BITS)}")
        if isinstance(self.group_size, bool) or self.group_size not in ALLOWED_GROUP_SIZES:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size!r} is not supported; "
                f"allowed: {list(ALLOWED_GROUP_SIZES)} (-1 = one group per row)"
            )
        if not isinstance(self.sym, bool):
            raise ValueError(f"QuantSpec.sym={self.sym!r} must be a bool")
        if self.grid not in GRIDS:
            raise ValueError(f"QuantSpec.grid={self.grid!r} is not supported; allowed: {list(GRIDS)}")

    @property
    def maxq(self) -> int:
        """The largest level, 2**bits - 1."""
        return (1 << self.bits) - 1

    def group_size_for(self, in_features: int) -> int:
        """The effective group size for a layer with ``in_features`` inputs."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        """ceil(in_features / group_size); the last group may be partial."""
        gs = self.group_size_for(in_features)
        return -(-in_features // gs)


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-row tensor [rows] against ``like`` [rows, ...]."""
    while t.dim() < like.dim():
        t = t.unsqueeze(-1)
    return t


MIN_ASYM_ZERO = 1  # smallest asymmetric zero point; see fit_grid


@torch.no_grad()
def fit_grid(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Fit one grid per row of ``w`` [rows, cols] over the given columns.

    Returns ``(scale [rows] float32, zero [rows] int32)`` on ``w``'s device.

    Asymmetric: the row's range is widened to include 0 (as the GPTQ reference
    does, so that 0 is exactly representable and the zero point never needs
    clamping), then ``scale = (max - min) / maxq`` and
    ``zero = clamp(round(-min / scale), 1, maxq)`` (zero ≥ 1: the v1 layout
    cannot store 0; such rows get the grid [−s, (maxq−1)·s] instead).

    Symmetric: ``scale = 2 * absmax / maxq`` and ``zero = (maxq + 1) / 2``, the
    integer midpoint that GPTQ v1 layouts expect (8 for 4 bits).

    A row whose range is empty (all zeros) gets the range [-1, 1], so its scale is
    never 0 and quantize() never divides by zero.

    ``spec.grid == "mse"``: the range is then shrunk per row by the clipping search of
    :func:`_mse_search` (the same zero-point rules apply to every candidate).
    """
    if w.dim() == 1:
        w = w.unsqueeze(-1)
    if w.dim() != 2:
        raise ValueError(f"fit_grid expects a [rows, cols] tensor, got shape {tuple(w.shape)}")
    x = w.float()
    zero_t = torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)
    xmin = torch.minimum(x.min(dim=1).values, zero_t)
    xmax = torch.maximum(x.max(dim=1).values, zero_t)
    scale, zero = _grid_for_range(xmin, xmax, spec)
    if spec.grid == "mse":
        scale, zero = _mse_search(x, xmin, xmax, scale, zero, spec)
    return scale, zero


def _mse_search(x: Tensor, xmin: Tensor, xmax: Tensor, scale: Tensor, zero: Tensor,
                spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Per row, the shrunk range [p·min, p·max] whose grid rounds ``x`` with the least squared
    error (clipping the few outliers buys a finer step for the rest). Tensor ops only, no host
    sync: it runs inside GPTQ's column loop and its CUDA graphs too."""
    best = _sq_error(x, scale, zero, spec.maxq)
    for i in range(1, int(MSE_STEPS * MSE_MAX_SHRINK) + 1):
        p = 1.0 - i / MSE_STEPS
        s, z = _grid_for_range(p * xmin, p * xmax, spec)
        err = _sq_error(x, s, z, spec.maxq)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


def _sq_error(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    q = _quantize_float(x, scale, zero, maxq)
    return (dequantize(q, scale, zero) - x).pow(2).sum(dim=1)


def _grid_for_range(xmin: Tensor, xmax: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """(scale, zero) of the grid spanning [xmin, xmax] per row (xmin ≤ 0 ≤ xmax); see fit_grid."""
    maxq = spec.maxq
    if spec.sym:
        absmax = torch.maximum(xmin.abs(), xmax)
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        scale = 2.0 * absmax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2, dtype=torch.int32)
        return scale, zero
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
    xmax = torch.where(empty, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    # A range so small that it underflows (subnormal weights) must still give a
    # usable, non-zero scale.
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(scale > tiny, scale, torch.full_like(scale, tiny))
    zero = torch.round(-xmin / scale)
    # The GPTQ v1 layout stores zero − 1, and readers (gptqmodel's v1→v2 conversion
    # adds 1 across the packed word) corrupt a stored −1. Rows whose minimum is ≥ −scale/2
    # would get zero 0: give them zero 1 and a grid [−s, (maxq−1)·s] that still covers
    # [xmin, xmax] (−xmin < xmax / (2·maxq − 1) < s).
    low = zero < MIN_ASYM_ZERO
    scale = torch.where(low, torch.clamp(xmax / (maxq - MIN_ASYM_ZERO), min=tiny), scale)
    zero = torch.clamp(torch.where(low, torch.full_like(zero, MIN_ASYM_ZERO), zero), MIN_ASYM_ZERO, maxq)
    return scale, zero.to(torch.int32)


def _quantize_float(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Levels as float (exact small integers), for use inside solvers."""
    scale = _expand(scale, w)
    zero = _expand(zero, w)
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def quantize(w: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer levels ``clamp(round(w / scale) + zero, 0, maxq)`` (int32).

    ``scale``/``zero`` are per row ([rows]) and broadcast over the columns of
    ``w`` [rows, cols], or have ``w``'s shape.
    """
    return _quantize_float(w.float(), scale.float(), zero, maxq).to(torch.int32)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``scale * (q - zero)`` in float32 (broadcast like :func:`quantize`)."""
    q = q.to(torch.int32) if not q.is_floating_point() else q
    diff = q - _expand(zero, q)
    return _expand(scale.float(), q) * diff.float()
