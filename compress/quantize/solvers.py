"""Weight-only quantization solvers: round-to-nearest and GPTQ.

Pure functions on tensors: ``W`` is a linear layer's weight [out, in] and ``H``
the Hessian of the layer-wise reconstruction loss ``||W X - Ŵ X||²`` with
respect to a row of ``W``, i.e. ``H = 2 X Xᵀ / n`` over ``n`` calibration
tokens ([in, in], see :func:`hessian_from_inputs`).

GPTQ follows Frantar, Ashkboos, Hoefler & Alistarh, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers" (2022,
arXiv:2210.17323): quantize the input columns one at a time and spread each
column's rounding error over the not-yet-quantized columns through the inverse
Hessian (Optimal Brain Quantization), using the upper Cholesky factor of H⁻¹
and lazy block updates.

All maths runs in float32 on the device of ``W`` (CPU or CUDA); the dequantized
weight is cast back to ``W``'s dtype at the end.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

# free_graphs is re-exported: quantizing steps call it through this module when they finish.
from .column_loop import free_graphs, quantize_block, use_graphs
from .grid import QuantSpec, _quantize_float, dequantize, fit_grid

__all__ = [
    "QuantResult",
    "gptq_solve",
    "hessian_from_inputs",
    "layer_output_error",
    "free_graphs",
    "rtn_solve",
    "split_rows",
]

# How many times the damping is multiplied by 10 when H + damp·I is not
# numerically positive definite, before giving up.
_MAX_DAMP_RETRIES = 6


ROWS_AT_ONCE = 1 << 24  # elements of a weight checked or packed at once (an export): bounds the transient memory


def row_chunks(shape: tuple[int, ...]) -> list[slice]:
    """Slices of whole rows of an [out, in] matrix, each at most ROWS_AT_ONCE elements (at least one row)."""
    step = max(1, ROWS_AT_ONCE // max(1, shape[1]))
    return [slice(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]


@dataclass
class QuantResult:
    """The outcome of quantizing one weight matrix.

    weight:  [out, in] dequantized weight, dtype of the input W.
    qweight: [out, in] uint8 levels in [0, 2**bits - 1] (original column order).
    scales:  [out, n_groups] float32.
    zeros:   [out, n_groups] int32 zero points in [0, 2**bits - 1].
    g_idx:   [in] int32, the group of each input column (original column order);
             ``weight == scales[:, g_idx] * (qweight - zeros[:, g_idx])``.
    spec:    the grid that was used.
    error:   trace((W - Ŵ) H (W - Ŵ)ᵀ) when a Hessian was available, else None.
    """

    weight: Tensor
    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    spec: QuantSpec
    error: float | None = None

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        """Rebuild the [out, in] float32 weight (or its ``rows``) from levels, scales, zeros and g_idx."""
        g = self.g_idx.long()
        return dequantize(self.qweight[rows], self.scales[rows][:, g], self.zeros[rows][:, g])

    def to(self, device: torch.device | str) -> "QuantResult":
        """The same result with its tensors on ``device`` (those already there are not copied)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantResult(weight=move(self.weight), qweight=move(self.qweight), scales=move(self.scales),
                           zeros=move(self.zeros), g_idx=move(self.g_idx), spec=self.spec, error=self.error)

    @classmethod
    def from_parts(cls, tensors: dict, spec: dict, error) -> "QuantResult":
        """Made again from its tensors and its spec's fields (a result another rank solved,
        ``compress.distributed.shared``)."""
        return cls(**tensors, spec=QuantSpec(**spec), error=error)


# --------------------------------------------------------------------------- helpers


def hessian_from_inputs(X: Tensor) -> Tensor:
    """``H = 2 XᵀX / n`` (float32, [in, in]) from layer inputs X [n, in] (or [..., in])."""
    X = X.reshape(-1, X.shape[-1]).float()
    n = X.shape[0]
    if n == 0:
        raise ValueError("hessian_from_inputs needs at least one input row")
    # Scale before the product (as the reference does) to keep magnitudes moderate.
    Xs = X * math.sqrt(2.0 / n)
    return Xs.T @ Xs


def layer_output_error(W: Tensor, W_hat: Tensor, H: Tensor) -> float:
    """``trace((W - Ŵ) H (W - Ŵ)ᵀ)``.

    With ``H = 2 X Xᵀ / n`` this equals ``2/n · ||W X - Ŵ X||²_F`` over the
    calibration tokens: the layer-output error that GPTQ minimises. The product
    runs in float32 on W's device (float64 is slow or missing on some
    accelerators); the final sum is accumulated in float64.
    """
    if W.shape != W_hat.shape:
        raise ValueError(f"W {tuple(W.shape)} and W_hat {tuple(W_hat.shape)} differ in shape")
    if H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected {(W.shape[1], W.shape[1])}")
    D = W.float() - W_hat.to(device=W.device, dtype=torch.float32)
    Hf = H.to(device=W.device, dtype=torch.float32)
    return float(((D @ Hf) * D).sum(dtype=torch.float64).item())


def _check_inputs(W: Tensor, spec: QuantSpec) -> None:
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    if W.dim() != 2:
        raise ValueError(f"W must be [out, in], got shape {tuple(W.shape)}")
    if W.shape[0] == 0 or W.shape[1] == 0:
        raise ValueError(f"W has an empty dimension: shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {W.dtype}")
    if not torch.isfinite(W).all():
        raise ValueError("W contains NaN or Inf values")


def _g_idx(in_features: int, spec: QuantSpec, device: torch.device) -> Tensor:
    gs = spec.group_size_for(in_features)
    return (torch.arange(in_features, device=device) // gs).to(torch.int32)


def _finish(
    W_in: Tensor, Q: Tensor, levels: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor,
    spec: QuantSpec, H: Tensor | None, what: str,
) -> QuantResult:
    if not torch.isfinite(Q).all() or not torch.isfinite(scales).all():
        raise FloatingPointError(
            f"{what} produced non-finite weights for a layer of shape {tuple(W_in.shape)}; "
            "the Hessian is probably degenerate (check the calibration inputs for NaN/Inf)"
        )
    weight = Q.to(W_in.dtype)
    return QuantResult(
        weight=weight,
        qweight=levels.to(torch.uint8),
        scales=scales,
        zeros=zeros,
        g_idx=g_idx,
        spec=spec,
        error=_checked_error(W_in, weight, H, what),
    )


def _checked_error(W: Tensor, W_hat: Tensor, H: Tensor | None, what: str) -> float | None:
    """The layer error under ``H`` (None without one), refused when it is not finite."""
    if H is None:
        return None
    error = layer_output_error(W, W_hat, H)
    if not math.isfinite(error):
        raise FloatingPointError(f"{what}: layer error is not finite ({error})")
    return error


def split_rows(res: QuantResult, start: int, stop: int, W: Tensor, H: Tensor | None) -> QuantResult:
    """Rows ``start:stop`` of a result solved on stacked weights, as that module's own result;
    ``W`` is the module's original weight (for its layer error under ``H``)."""
    weight = res.weight[start:stop].clone()  # copies: no view keeps the stacked tensors alive
    return QuantResult(weight=weight, qweight=res.qweight[start:stop].clone(), scales=res.scales[start:stop].clone(),
                       zeros=res.zeros[start:stop].clone(), g_idx=res.g_idx.clone(), spec=res.spec,
                       error=_checked_error(W, weight, H, "split_rows"))


# --------------------------------------------------------------------------- RTN


_RTN_CHUNK = 1 << 22  # weights per chunk of groups in rtn_solve


@torch.no_grad()
def rtn_solve(W: Tensor, spec: QuantSpec, H: Tensor | None = None) -> QuantResult:
    """Round-to-nearest, one grid per (row, group of ``group_size`` input columns).

    n_groups = ceil(in / group_size); the last group may be partial. When ``H``
    is given the layer error is filled in (``QuantResult.error``).
    """
    _check_inputs(W, spec)
    out_f, in_f = W.shape
    Wf = W.float()
    gs = spec.group_size_for(in_f)
    n_groups = spec.n_groups(in_f)
    scales = torch.empty(out_f, n_groups, device=W.device, dtype=torch.float32)
    zeros = torch.empty(out_f, n_groups, device=W.device, dtype=torch.int32)
    levels = torch.empty(out_f, in_f, device=W.device, dtype=torch.float32)
    Q = torch.empty_like(Wf)
    # Several full groups at a time: their [out, k·gs] columns viewed as [out·k, gs] rows, one grid per
    # row. fit_grid's rows are independent, so the numbers are those of a loop over the groups, bit for
    # bit, in ~8 kernels per chunk instead of per group (on a GPU the loop is bound by launches). Chunks
    # of ~2^22 weights keep the temporaries small (on a CPU whole-matrix temporaries were 1.5x slower
    # than the loop). A partial last group goes on its own.
    full = in_f // gs
    step = max(1, _RTN_CHUNK // (out_f * gs))
    parts = [(g, min(g + step, full)) for g in range(0, full, step)]
    if full < n_groups:
        parts.append((full, n_groups))
    for g0, g1 in parts:
        c0, c1 = g0 * gs, min(g1 * gs, in_f)
        w = Wf[:, c0:c1].reshape(out_f * (g1 - g0), -1)  # rows of gs, or of the partial group's width
        scale, zero = fit_grid(w, spec)
        q = _quantize_float(w, scale, zero, spec.maxq)
        scales[:, g0:g1] = scale.view(out_f, g1 - g0)
        zeros[:, g0:g1] = zero.view(out_f, g1 - g0)
        levels[:, c0:c1] = q.view(out_f, c1 - c0)
        Q[:, c0:c1] = dequantize(q, scale, zero).view(out_f, c1 - c0)
    return _finish(W, Q, levels, scales, zeros, _g_idx(in_f, spec, W.device), spec, H, "rtn_solve")


# --------------------------------------------------------------------------- GPTQ


def _upper_cholesky_of_inverse(H: Tensor, percdamp: float) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + damp·I)⁻¹ (H⁻¹ = UᵀU), with damping retries.

    damp starts at ``percdamp · mean(diag H)``; while H + damp·I is not
    numerically positive definite (or the factors are not finite) it is
    multiplied by 10, up to ``_MAX_DAMP_RETRIES`` times, with a warning naming
    the damping finally used.
    """
    n = H.shape[0]
    mean_diag = float(torch.diagonal(H).mean().item())
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        raise ValueError(f"the Hessian's diagonal mean is {mean_diag}; expected a positive finite value")
    damp = percdamp * mean_diag
    eye = torch.eye(n, device=H.device, dtype=H.dtype)
    tried = []
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        Hd = H + damp * eye
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info.item()) == 0 and torch.isfinite(L).all():
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2.item()) == 0 and torch.isfinite(U).all() and bool((torch.diagonal(U) > 0).all()):
                if attempt > 0:
                    warnings.warn(
                        f"GPTQ: the Hessian ({n}x{n}) was not positive definite with damping "
                        f"{tried[0]:.3e} ({percdamp:g} x mean diag {mean_diag:.3e}); "
                        f"used damping {damp:.3e} ({damp / mean_diag:.3g} x mean diag) instead",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return U, damp
        tried.append(damp)
        # percdamp=0 cannot be multiplied up: start the ladder at 1e-4 x mean diag.
        damp = damp * 10.0 if damp > 0 else 1e-4 * mean_diag
    raise FloatingPointError(
        f"GPTQ: the Hessian ({n}x{n}) is not positive definite even with damping "
        f"{tried[-1]:.3e} ({tried[-1] / mean_diag:.3g} x mean diag); tried {['%.3e' % d for d in tried]}"
    )


# --------------------------------------------------------------------------- blocks (the column loop: column_loop.py)


def _aligned_block(block_size: int, gs: int) -> int:
    """A block size that keeps every group start on a block start (or every block inside one
    group): a multiple of ``gs``, or the largest divisor of ``gs`` that is a power of two and
    ≤ ``block_size``. Lazy updates are exact, so the block size only changes speed."""
    if block_size >= gs:
        return block_size // gs * gs
    b = 1
    while 2 * b <= block_size and gs % (2 * b) == 0:
        b *= 2
    return b


@torch.no_grad()
def gptq_solve(
    W: Tensor,
    H: Tensor,
    spec: QuantSpec,
    *,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    graphs: bool | None = None,
    with_error: bool = True,
) -> QuantResult:
    """Quantize W [out, in] with GPTQ given the input Hessian H [in, in].

    - Dead inputs (``diag(H) == 0``) get ``H[i, i] = 1`` and ``W[:, i] = 0``.
    - ``percdamp · mean(diag H)`` is added to the diagonal (raised x10 with a
      warning if H is still not positive definite).
    - Columns are processed in blocks of ``block_size``; each column is rounded on
      its group's grid, and its error ``(w - q) / [H⁻¹]ᵢᵢ`` is spread over the
      later columns through row i of the upper Cholesky factor of H⁻¹.
    - Groups are always defined on the ORIGINAL column indices: column j belongs
      to group ``j // group_size`` (``g_idx[j] = j // group_size``). Without
      static groups a group's grid is fitted on the current, error-updated
      weights of its columns when its first column is reached.
    - ``act_order``: columns are processed by descending ``diag(H)`` and the
      result is un-permuted at the end. With act_order and ``group_size != -1``
      the "first column of a group" is no longer reached before the others, so
      ``static_groups`` is forced on: every group's grid is fitted up front on the
      original (dead-zeroed) W. This keeps ``g_idx`` trivial (no reordering in
      kernels) at the cost of grids that do not see GPTQ's updates.
    - ``static_groups``: fit all group grids up front on the original W.
    - ``block_size`` only changes speed (lazy updates are exact); with grids fitted
      on the fly it is aligned to the group size (see :func:`_aligned_block`).
    - ``graphs``: on CUDA, record each block shape's column loop once as a CUDA
      graph and replay it (default: on CUDA unless a capture already failed in this
      process; a failed capture warns and runs the same loop eagerly).

    The layer error ``trace((W - Ŵ) H (W - Ŵ)ᵀ)`` is stored in ``error`` (computed
    with the H that was passed in, undamped). ``with_error=False`` leaves it None: a
    caller that splits the stacked rows of several modules (:func:`split_rows`) measures
    each module's error itself, and the stacked one would be an [out, in] x [in, in]
    product thrown away.
    """
    _check_inputs(W, spec)
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({in_f}, {in_f}) for W of shape {tuple(W.shape)}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains NaN or Inf values")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not (percdamp >= 0 and math.isfinite(percdamp)):
        raise ValueError(f"percdamp must be a finite value >= 0, got {percdamp}")

    dev = W.device
    grouped = spec.group_size != -1
    gs = spec.group_size_for(in_f)
    n_groups = spec.n_groups(in_f)
    if act_order and grouped:
        static_groups = True

    Wf = W.detach().to(dtype=torch.float32).clone()
    Hf = H.detach().to(device=dev, dtype=torch.float32).clone()
    # Symmetrise: a caller's H accumulated in pieces may be asymmetric by rounding.
    Hf = 0.5 * (Hf + Hf.T)

    dead = torch.diagonal(Hf) == 0
    if bool(dead.any()):
        Hf[dead, dead] = 1.0
        Wf[:, dead] = 0.0

    scales = torch.empty(out_f, n_groups, device=dev, dtype=torch.float32)
    zeros = torch.empty(out_f, n_groups, device=dev, dtype=torch.int32)

    if not grouped or static_groups:
        # Fit every group's grid up front on the original (dead-zeroed) W.
        for g in range(n_groups):
            s, z = fit_grid(Wf[:, g * gs:min((g + 1) * gs, in_f)], spec)
            scales[:, g] = s
            zeros[:, g] = z

    if act_order:
        # stable: ties (e.g. several dead columns) keep their original order on every device.
        perm = torch.argsort(torch.diagonal(Hf), descending=True, stable=True)
        Wf = Wf[:, perm]
        Hf = Hf[perm][:, perm]
        orig_col = perm.tolist()
    else:
        perm = None
        orig_col = list(range(in_f))
    col_group = [j // gs for j in orig_col]  # group of the column at each processing position

    U, _ = _upper_cholesky_of_inverse(Hf, percdamp)
    del Hf

    levels = torch.zeros_like(Wf)
    col_group_t = torch.tensor(col_group, device=dev)
    dynamic = grouped and not static_groups
    block = _aligned_block(block_size, gs) if dynamic else block_size
    graphs = use_graphs(graphs, dev)

    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = Wf[:, i1:i2].clone()
        fits: tuple[tuple[int, int], ...] = ()
        if dynamic:
            # Block starts sit on group starts (or inside a group that began at a block
            # start), so every group is fitted either here, on columns past the block that
            # already carry every earlier block's update, or inside the column loop.
            if i1 % gs == 0 and i1 + gs > i2:
                S1, Z1 = (t.float().unsqueeze(1).expand(-1, i2 - i1).clone()
                          for t in fit_grid(Wf[:, i1:min(i1 + gs, in_f)], spec))
            else:
                S1 = torch.empty_like(W1)
                Z1 = torch.empty_like(W1)
                fits = tuple((c - i1, min(c + gs, i2) - i1) for c in range(i1, i2) if c % gs == 0)
                if not fits:  # a block inside a group fitted at an earlier block's start
                    g = col_group[i1]
                    S1[:] = scales[:, g:g + 1]
                    Z1[:] = zeros[:, g:g + 1].float()
        else:
            S1 = scales[:, col_group_t[i1:i2]]
            Z1 = zeros[:, col_group_t[i1:i2]].float()
        U1 = U[i1:i2, i1:i2]
        L1, Err1, S1, Z1 = quantize_block(W1, U1, S1, Z1, fits, spec, graphs)
        levels[:, i1:i2] = L1
        if dynamic:
            for c in range(i1, i2):
                if c % gs == 0:
                    scales[:, col_group[c]] = S1[:, c - i1]
                    zeros[:, col_group[c]] = Z1[:, c - i1].to(torch.int32)
        # Lazy batch update of all later columns with this block's errors.
        if i2 < in_f:
            Wf[:, i2:] -= Err1 @ U[i1:i2, i2:]

    # the dequantized weight, from the stored levels and grids: the same formula the
    # column loop used for each column's rounding error
    Q = dequantize(levels, scales[:, col_group_t], zeros[:, col_group_t])
    if perm is not None:
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]
        levels = levels[:, invperm]

    return _finish(W, Q, levels, scales, zeros, _g_idx(in_f, spec, dev), spec, H if with_error else None,
                   "gptq_solve")
