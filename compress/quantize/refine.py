"""Refinement after quantization: AdaQuant and bias (output-shift) correction.

Pure tensor maths; no module walking. ``W0`` is a linear layer's float weight
[out, in], ``H = 2 XᵀX / n`` the Hessian of its calibration inputs (see
:class:`compress.runner.HessianAccumulator`) and ``q`` the :class:`QuantResult`
of an earlier rtn/gptq step.

AdaQuant follows Hubara, Nahshan, Hanani, Banner & Soudry, "Improving Post
Training Neural Quantization: Layer-wise Calibration and Integer Programming"
(2020, arXiv:2006.10518): per layer, minimise ``||Ŵ X - W0 X||²`` over the
calibration set with Adam, learning the weights, the grid's scales and zero
points through a straight-through rounding estimator. Because
``||Ŵ X - W0 X||² · 2/n = trace((Ŵ - W0) H (Ŵ - W0)ᵀ)``, the loss needs only H,
not the stored activations.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from compress.accumulators import MeanAccumulator  # bias correction's statistic; importable from here

from .grid import MIN_ASYM_ZERO, dequantize
from .solvers import QuantResult, layer_output_error

__all__ = ["MeanAccumulator", "adaquant_refine", "output_shift"]

# The scale multiplier never drops below this: keeps every scale positive and V/s finite.
_MIN_SCALE_FACTOR = 1e-3

Init = Literal["dequantized", "float"]


def _round_ste(x: Tensor) -> Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _check(W0: Tensor, H: Tensor, q: QuantResult, steps: int, lrs: dict[str, float]) -> None:
    if W0.dim() != 2:
        raise ValueError(f"W0 must be [out, in], got shape {tuple(W0.shape)}")
    if H.shape != (W0.shape[1], W0.shape[1]):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(W0.shape[1], W0.shape[1])}")
    if tuple(q.qweight.shape) != tuple(W0.shape):
        raise ValueError(f"the quantization levels have shape {tuple(q.qweight.shape)}, W0 {tuple(W0.shape)}")
    if not torch.isfinite(H).all() or not torch.isfinite(W0).all():
        raise ValueError("W0 or H contains NaN or Inf values")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    for name, lr in lrs.items():
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"{name} must be a finite value >= 0, got {lr}")
    if not bool((q.scales > 0).all()):
        raise ValueError("the input grid has non-positive scales")


def adaquant_refine(
    W0: Tensor,
    H: Tensor,
    q: QuantResult,
    *,
    steps: int = 200,
    lr_weight: float = 1e-3,
    lr_scale: float = 1e-3,
    lr_zero: float = 1e-3,
    optimize_zero: bool = True,
    init: Init = "dequantized",
) -> tuple[QuantResult, dict]:
    """Refine the quantized layer ``q`` of ``W0`` by AdaQuant; returns ``(result, stats)``.

    Parametrisation (float32, on H's device), per group of a row with the input
    grid ``s0, z0``:

    - ``s = ρ · s0``: ρ is a scale multiplier (``lr_scale`` is a relative rate;
      ρ is kept >= 1e-3 so scales stay positive).
    - ``z``: zero point in level units (``lr_zero`` is in levels; the rounded
      zero changes only after z has moved by 0.5). Symmetric grids keep their
      midpoint zero (the GPTQ v1 convention), whatever ``optimize_zero`` says.
    - ``U``: the continuous weights in grid steps. ``lr_weight`` is therefore
      relative to the per-group scale: one Adam step moves a weight by about
      ``lr_weight · s``, so a level flips after about ``0.5 / lr_weight`` steps
      pushing the same way from a cell centre.

    Forward: ``Ŵ = s·(clamp(round_ste(V/s) + round_ste(z), 0, maxq) − round_ste(z))``;
    loss ``trace((Ŵ−W0) H (Ŵ−W0)ᵀ) / trace(W0 H W0ᵀ)``; Adam; the best iterate
    (including the starting point) is kept. Levels, integer zeros (in
    ``[0, maxq]``) and positive scales are re-derived from it, so
    ``result.weight == result.dequantize()``.

    ``init`` says where V starts and how it is tied to the scale (the forward is
    the same; the gradients differ):

    - ``"dequantized"`` (default, for a gptq input): V = Q, the input solution,
      so the first iterate reproduces it exactly and the search starts from
      GPTQ's error. V follows the scale (``V = U·s``): a scale step rescales the
      integer codes, whose gradient ``levels − z`` re-fits the scales to the
      codes (min/max grids are not error-optimal; this is where most of the
      gain after GPTQ comes from, about as much as a per-row least-squares
      scale refit). With V fixed in weight units instead, the STE's scale
      gradient is LSQ's ``round(V/s) − V/s``, zero at the cell centres where Q
      sits, and the scales barely move (0.985x vs 0.93x at 3 bits g32).
    - ``"float"`` (the paper's choice, for an rtn input): V = W0, fixed in
      weight units (``V = U·s0``), so a scale step re-rounds the weights (LSQ).
      The first iterate is round-to-nearest on the input grid: much better
      after ``rtn`` (about 0.8x its error at 3-4 bits), useless after
      ``gptq`` (RTN is worse than GPTQ's start, and the STE pushes all weights
      near a cell boundary across it at once, Adam's steps having the same size
      whatever the gradient) -- the best iterate then stays the input.

    The result is never worse than the input: when the refined layer error is
    larger, the input is returned (``stats["improved"]`` is False).
    ``stats``: ``before``/``after`` = ``trace((W0−Ŵ) H (W0−Ŵ)ᵀ)`` of the input
    and of the returned result, ``improved``, ``levels_changed`` (fraction),
    ``best_step``. The returned weight has W0's dtype; everything lives on H's device.
    """
    _check(W0, H, q, steps, {"lr_weight": lr_weight, "lr_scale": lr_scale, "lr_zero": lr_zero})
    if init not in ("dequantized", "float"):
        raise ValueError(f"unknown init {init!r}; allowed: dequantized, float")
    dev = H.device
    spec = q.spec
    maxq = float(spec.maxq)
    with torch.no_grad():
        Hf = H.detach().to(torch.float32).clone()
        Hf = 0.5 * (Hf + Hf.T)  # accumulated in pieces: symmetric only up to rounding
        W0f = W0.detach().to(device=dev, dtype=torch.float32).clone()
        g_idx = q.g_idx.to(dev).long()
        s0 = q.scales.detach().to(device=dev, dtype=torch.float32).clone()
        z0 = q.zeros.detach().to(device=dev, dtype=torch.float32).clone()
        L0 = q.qweight.detach().to(device=dev, dtype=torch.float32)
        s0_full = s0[:, g_idx]
        cell = L0 - z0[:, g_idx]  # input levels relative to the zero, in grid steps
        Q0 = s0_full * cell
        before = layer_output_error(W0f, Q0, Hf)
        norm = float(((W0f @ Hf) * W0f).sum(dtype=torch.float64))
        norm = norm if norm > 0 and math.isfinite(norm) else 1.0
        U0 = cell.clone() if init == "dequantized" else W0f / s0_full

    codes_follow_scale = init == "dequantized"
    learn_zero = optimize_zero and not spec.sym and lr_zero > 0
    U = U0.clone().requires_grad_(lr_weight > 0)
    rho = torch.ones_like(s0).requires_grad_(lr_scale > 0)
    z = z0.clone().requires_grad_(learn_zero)
    groups = [{"params": [p], "lr": lr} for p, lr in ((U, lr_weight), (rho, lr_scale), (z, lr_zero))
              if p.requires_grad]

    def forward() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        zr = _round_ste(z)
        zr_full = zr[:, g_idx]
        levels = torch.clamp(_round_ste(U if codes_follow_scale else U / rho[:, g_idx]) + zr_full, 0.0, maxq)
        scales = s0 * rho
        return scales[:, g_idx] * (levels - zr_full), levels, scales, zr

    best = (math.inf, L0, s0, z0, -1)  # (loss, levels, scales, zeros, step)
    with torch.enable_grad():
        opt = torch.optim.Adam(groups) if groups else None
        for step in range(steps + 1):
            W_hat, levels, scales, zr = forward()
            D = W_hat - W0f
            loss = ((D @ Hf) * D).sum() / norm
            value = float(loss.detach())
            if value < best[0]:
                best = (value, levels.detach().clone(), scales.detach().clone(), zr.detach().clone(), step)
            if step == steps or opt is None:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                rho.clamp_(min=_MIN_SCALE_FACTOR)
                z.clamp_(float(MIN_ASYM_ZERO), maxq)  # representable levels that the v1 layout can store

    _, levels, scales, zeros, best_step = best
    levels_u8 = levels.round().clamp(0, maxq).to(torch.uint8)
    zeros_i = zeros.round().clamp(0 if q.spec.sym else MIN_ASYM_ZERO, maxq).to(torch.int32)
    weight = dequantize(levels_u8, scales[:, g_idx], zeros_i[:, g_idx])
    after = layer_output_error(W0f, weight, Hf)
    if not (math.isfinite(after) and after <= before):
        result = QuantResult(weight=Q0.to(W0.dtype), qweight=L0.to(torch.uint8), scales=s0,
                             zeros=z0.to(torch.int32), g_idx=q.g_idx.to(dev), spec=spec, error=before)
        return result, {"before": before, "after": before, "improved": False, "levels_changed": 0.0,
                        "best_step": 0}
    result = QuantResult(weight=weight.to(W0.dtype), qweight=levels_u8, scales=scales, zeros=zeros_i,
                         g_idx=q.g_idx.to(dev), spec=spec, error=after)
    changed = float((levels_u8 != L0.to(torch.uint8)).float().mean())
    return result, {"before": before, "after": after, "improved": after < before, "levels_changed": changed,
                    "best_step": best_step}


def output_shift(W0: Tensor, W_hat: Tensor, mean_x: Tensor) -> Tensor:
    """``(W0 − Ŵ) · E[x]`` [out], float32 on ``mean_x``'s device.

    Added to the quantized layer's bias, it makes the layer's mean output over the
    inputs whose mean is ``mean_x`` equal to the float layer's (the layer is affine,
    so the mean of the outputs is the output of the mean).
    """
    if W0.shape != W_hat.shape:
        raise ValueError(f"W0 {tuple(W0.shape)} and W_hat {tuple(W_hat.shape)} differ in shape")
    if mean_x.shape != (W0.shape[1],):
        raise ValueError(f"mean_x has shape {tuple(mean_x.shape)}, expected ({W0.shape[1]},)")
    dev = mean_x.device
    D = W0.to(device=dev, dtype=torch.float32) - W_hat.to(device=dev, dtype=torch.float32)
    return D @ mean_x.to(torch.float32)
