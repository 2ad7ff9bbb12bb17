"""Partial backprop: a linear whose only trainable part is a leading slice.

``S2FTLinear`` keeps the frozen weight W (requires_grad False, the same
Parameter the nn.Linear had) and a small trainable ``delta`` of the slice's
shape: the effective weight is W with ``W[:n] + delta`` (a row slice: output
rows, v/gate/up_proj) or ``W[:, :n] + delta`` (a column slice: input columns,
o/down_proj). Only ``delta`` is a trainable parameter, so the optimizer keeps
state for the slices alone.

The autograd function computes

* y = x Wᵀ + b, plus the slice's part: y[..., :n] += x Δᵀ (rows) or y += x[..., :n] Δᵀ (cols);
* grad_x = grad_y W_eff, as a plain linear would;
* grad_Δ = grad_y[..., :n]ᵀ x (rows, needs all of x) or grad_yᵀ x[..., :n] (cols).

For a column slice only a *copy* of x[..., :n] is saved for backward (a view
would keep all of x alive); nothing of x is saved when Δ needs no gradient.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Side = Literal["rows", "cols"]


class SliceLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, delta, rows: bool):
        n = delta.shape[0] if rows else delta.shape[1]
        d = delta.to(x.dtype)
        out = F.linear(x, weight, bias)
        if rows:
            out[..., :n] += F.linear(x, d)
        else:
            out += F.linear(x[..., :n], d)
        ctx.rows, ctx.n = rows, n
        ctx.delta_dtype, ctx.x_dtype = delta.dtype, x.dtype
        needs_delta_grad = ctx.needs_input_grad[3]
        if not needs_delta_grad:
            saved_x = None
        elif rows:
            saved_x = x
        elif n < x.shape[-1]:
            # clone, not contiguous(): a slice with size-1 leading dims counts as contiguous
            # and would come back as a view that keeps all of x alive.
            saved_x = x[..., :n].clone(memory_format=torch.contiguous_format)
        else:
            saved_x = x
        ctx.save_for_backward(saved_x, weight, delta)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        saved_x, weight, delta = ctx.saved_tensors
        rows, n = ctx.rows, ctx.n
        grad_x = grad_delta = None
        # Under autocast grad_out may come in another dtype than W / x; compute in grad_out's.
        dtype = grad_out.dtype
        if ctx.needs_input_grad[0]:
            d = delta.to(dtype)
            grad_x = grad_out.matmul(weight.to(dtype))
            if rows:
                grad_x += grad_out[..., :n].matmul(d)
            else:
                grad_x[..., :n] += grad_out.matmul(d)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            g = grad_out.reshape(-1, grad_out.shape[-1])
            x = saved_x.reshape(-1, saved_x.shape[-1]).to(dtype)
            grad_delta = (g[:, :n].t().matmul(x) if rows else g.t().matmul(x)).to(ctx.delta_dtype)
        return grad_x, None, None, grad_delta, None


class S2FTLinear(nn.Module):
    """Drop-in for an nn.Linear: frozen weight plus a trainable leading row or column slice."""

    def __init__(self, base: nn.Linear, side: Side, size: int, delta_dtype: torch.dtype | None = None):
        super().__init__()
        if side not in ("rows", "cols"):
            raise ValueError(f"side must be 'rows' or 'cols', got {side!r}")
        limit = base.out_features if side == "rows" else base.in_features
        if not 0 < size <= limit:
            raise ValueError(f"slice size {size} out of range (1..{limit})")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.side: Side = side
        self.size = size
        shape = (size, self.in_features) if side == "rows" else (self.out_features, size)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=delta_dtype or base.weight.dtype,
                                              device=base.weight.device))
        self.fused = False

    def weight_slice(self) -> torch.Tensor:
        """View of W's trainable slice."""
        return self.weight[: self.size] if self.side == "rows" else self.weight[:, : self.size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:  # Δ already sits in W
            return F.linear(x, self.weight, self.bias)
        return SliceLinearFunction.apply(x, self.weight, self.bias, self.delta, self.side == "rows")

    @torch.no_grad()
    def fuse(self) -> None:
        if not self.fused:
            self.weight_slice().add_(self.delta.to(self.weight.dtype))
            self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        if self.fused:
            self.weight_slice().sub_(self.delta.to(self.weight.dtype))
            self.fused = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, trainable={self.side}[:{self.size}], fused={self.fused}")
