"""Mixed-precision bit allocation as an integer program (pure maths, no model walking).

Following Hubara et al., "Accurate Post Training Quantization With Small
Calibration Sets" (AdaQuant / CalibTIP, ICML 2021, arXiv:2006.10518): let
``ΔL(l, b)`` be the loss increase when only layer ``l`` is quantized to ``b``
bits. Assuming the degradations add up, the best assignment under a size budget
is the binary program

    minimise   Σ_l Σ_b x(l,b) · ΔL(l,b)
    subject to Σ_b x(l,b) = 1                          for every layer l
               Σ_l Σ_b x(l,b) · params_l · b ≤ budget   (budget = target_avg_bits · Σ params)
               x(l,b) ∈ {0, 1}

(a multiple-choice knapsack), solved exactly with HiGHS through
:func:`scipy.optimize.milp`. "Bits" here are the weight levels only: the
scales/zeros of each group are not counted in the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from compress.errors import CompressError

__all__ = ["Allocation", "allocate_bits", "average_bits", "solve_allocation"]

# Slack on the budget row: a target that an assignment meets exactly must not be
# declared infeasible by floating-point rounding of Σ params·bits / Σ params.
_BUDGET_TOL = 1e-9
_TIME_LIMIT_S = 300.0


@dataclass(frozen=True)
class Allocation:
    """The solved program: per-layer bits and what they cost and achieve."""

    bits: dict[str, int]  # layer -> chosen bit width, in the order of ``sensitivity``
    avg_bits: float  # Σ params·bits / Σ params (never above the target)
    objective: float  # Σ ΔL(l, bits_l): the predicted total loss increase
    target_avg_bits: float
    min_avg_bits: float  # every layer at its smallest candidate
    max_avg_bits: float  # every layer at its largest candidate


def average_bits(bits: dict[str, int], params: dict[str, int]) -> float:
    """The parameter-weighted average bit width of an assignment."""
    total = sum(params[name] for name in bits)
    return sum(params[name] * b for name, b in bits.items()) / total


def allocate_bits(sensitivity: dict[str, dict[int, float]], params: dict[str, int],
                  target_avg_bits: float) -> dict[str, int]:
    """Bits per layer minimising Σ ΔL under ``Σ params·bits ≤ target_avg_bits · Σ params``.

    See :func:`solve_allocation` for the achieved average and the objective.
    """
    return solve_allocation(sensitivity, params, target_avg_bits).bits


def solve_allocation(sensitivity: dict[str, dict[int, float]], params: dict[str, int],
                     target_avg_bits: float) -> Allocation:
    """Solve the bit-allocation program.

    ``sensitivity[layer][bits]`` is ΔL(layer, bits) (any finite float; layers may
    have different candidate sets), ``params[layer]`` the layer's weight count.
    Raises :class:`CompressError` when the target is below the smallest achievable
    average (the message names that minimum). A target at or above the largest
    achievable average gives every layer its largest candidate.
    """
    _check(sensitivity, params, target_avg_bits)
    names = list(sensitivity)
    total = sum(params[n] for n in names)
    lo = {n: min(sensitivity[n]) for n in names}
    hi = {n: max(sensitivity[n]) for n in names}
    min_avg = sum(params[n] * lo[n] for n in names) / total
    max_avg = sum(params[n] * hi[n] for n in names) / total

    def done(bits: dict[str, int]) -> Allocation:
        return Allocation(bits=bits, avg_bits=average_bits(bits, params),
                          objective=float(sum(sensitivity[n][b] for n, b in bits.items())),
                          target_avg_bits=float(target_avg_bits), min_avg_bits=min_avg, max_avg_bits=max_avg)

    if target_avg_bits < min_avg - _BUDGET_TOL:
        raise CompressError(
            f"target average of {target_avg_bits:g} bits is infeasible: the minimum achievable average is "
            f"{min_avg:.6g} bits (every layer at its smallest candidate); raise the target")
    if target_avg_bits >= max_avg:
        return done(dict(hi))

    # Variables: one binary x(l, b) per (layer, candidate), layer-major.
    pairs = [(n, b) for n in names for b in sorted(sensitivity[n])]
    k = len(pairs)
    row = {n: i for i, n in enumerate(names)}
    # Shifting a layer's ΔL by a constant does not change the argmin (exactly one
    # candidate is chosen per layer); shifting and scaling keeps HiGHS's gap tolerances
    # meaningful when the ΔL are tiny or large.
    c = np.array([sensitivity[n][b] - min(sensitivity[n].values()) for n, b in pairs], dtype=np.float64)
    scale = float(np.abs(c).max())
    if scale > 0:
        c /= scale
    one_each = sparse.csr_array((np.ones(k), ([row[n] for n, _ in pairs], np.arange(k))), shape=(len(names), k))
    # The budget row divided by Σ params: coefficients are bits weighted by the layer's share.
    size = np.array([[params[n] * b / total for n, b in pairs]], dtype=np.float64)
    res = milp(c, integrality=np.ones(k), bounds=Bounds(0, 1),
               constraints=[LinearConstraint(one_each, 1, 1),
                            LinearConstraint(size, -np.inf, target_avg_bits + _BUDGET_TOL)],
               options={"mip_rel_gap": 1e-9, "time_limit": _TIME_LIMIT_S})
    if res.x is None:  # cannot happen for a target between min_avg and max_avg
        raise CompressError(f"the bit-allocation program found no solution for target {target_avg_bits:g} "
                            f"bits (HiGHS status {res.status}: {res.message})")
    bits: dict[str, int] = {}
    start = 0
    for n in names:  # the variables are layer-major, candidates sorted
        cands = sorted(sensitivity[n])
        bits[n] = cands[int(np.argmax(res.x[start:start + len(cands)]))]
        start += len(cands)
    alloc = done(bits)
    if alloc.avg_bits > target_avg_bits + 1e-6:  # a solver tolerance leaking through; never silently
        raise RuntimeError(f"bit allocation exceeded its budget: {alloc.avg_bits} > {target_avg_bits}")
    return alloc


def _check(sensitivity: dict, params: dict, target: float) -> None:
    if not sensitivity:
        raise CompressError("bit allocation needs at least one layer")
    missing = [n for n in sensitivity if n not in params]
    extra = [n for n in params if n not in sensitivity]
    if missing or extra:
        raise CompressError(f"bit allocation: sensitivity and params name different layers "
                            f"(no params for {missing[:5]}, no sensitivity for {extra[:5]})")
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not math.isfinite(target):
        raise CompressError(f"target average bits must be a finite number, got {target!r}")
    for n, cands in sensitivity.items():
        if not cands:
            raise CompressError(f"bit allocation: layer {n} has no candidate bit widths")
        for b, d in cands.items():
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise CompressError(f"bit allocation: layer {n} has candidate bits {b!r}; expected a positive int")
            if not math.isfinite(d):
                raise CompressError(f"bit allocation: layer {n} has a non-finite sensitivity {d} at {b} bits")
        p = params[n]
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise CompressError(f"bit allocation: layer {n} has params={p!r}; expected a positive int")
