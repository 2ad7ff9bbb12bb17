"""Recipe step ``gptq_mixed``: GPTQ with a bit width per module chosen by an integer program.

Three phases:

1. **Probe** (one calibration pass through the layer-wise runner, no weight
   changed, so every module sees float inputs): each module's Hessian is used to
   GPTQ-quantize it at every candidate width. ``sensitivity: layer_error`` keeps
   the layer-output errors; ``sensitivity: loss`` keeps the candidate levels on
   the CPU (about ``len(candidate_bits)`` bytes per weight) for phase 1b.
1b. **Loss probe** (``loss`` only; the paper's ΔL): the whole model goes to the
   device and, for each allocation unit and candidate, only that unit's weights
   are swapped for their quantized values and the mean next-token NLL over
   ``probe_samples`` calibration windows is measured: ΔL = NLL − NLL_float.
   Cost: ``units × len(candidate_bits) + 1`` forward passes over those windows.
2. **Allocate** with :func:`compress.quantize.mixed.solve_allocation` (budget =
   ``target_bits`` × Σ weight count; scales/zeros are not counted).
3. **Quantize** for real: a true-sequential GPTQ pass, each module at its bits,
   stored like the ``gptq`` step (``ctx.state.quant[fqn]``, ``spec.bits``
   per module).

Cost: two calibration passes with ``len(candidate_bits) + 1`` GPTQ solves per
module in all, plus (``loss``) the forward passes above; on SmolLM2-135M with
[3, 4] on one H200 that is about 3x a plain ``gptq`` step (75 s vs 25 s).

``layer_error`` is a proxy: trace((W−Ŵ)H(W−Ŵ)ᵀ) is in each layer's own output
units, so it compares widths within a layer well but weighs layers against each
other by their activation scale, not by what they do to the loss. ``loss`` ΔL
are noisy with few probe windows (small ΔL can come out negative); the program
uses them as measured.

Allocation units: with ``tie_fused`` (default) the modules an engine fuses into
one matmul (q,k,v and gate,up) get one width, chosen for the unit as a whole
(``loss``: the unit is quantized together; ``layer_error``: members' errors summed).
"""
from __future__ import annotations

from collections import Counter
import torch
from tqdm.auto import tqdm

from compress.algorithms import StepContext
from compress.distributed import shared
from compress.evaluate import evaluate_windows
from compress.quantize.config import GPTQMixedConfig
from compress.quantize.grid import dequantize
from compress.quantize.mixed import solve_allocation
from compress.quantize.solvers import QuantResult, free_graphs, gptq_solve
from compress.quantize.steps import _check_shapes, store_quant_result
from compress.runner import HessianAccumulator, block_layout, run_layerwise
from compress.runtime import on_device
from compress.targets import match_modules


def _units(model: torch.nn.Module, names: list[str], tie_fused: bool) -> dict[str, list[str]]:
    """Allocation units: unit name -> member fqns (in model order).

    With ``tie_fused`` the targeted members of one of the runner's true-sequential
    subsets (q,k,v / o / gate,up / down for llama-like models) form one unit:
    they are exactly the projections an engine fuses into one matmul.
    """
    if not tie_fused:
        return {n: [n] for n in names}
    layout = block_layout(model)
    groups: dict[tuple, list[str]] = {}
    for n in names:
        key: tuple = (n,)
        head = layout.blocks + "."
        if n.startswith(head):
            index, _, rel = n[len(head):].partition(".")
            key = next(((index, k) for k, subset in enumerate(layout.subsets) if rel in subset), key)
        groups.setdefault(key, []).append(n)
    units = {}
    for members in groups.values():
        if len(members) == 1:
            units[members[0]] = members
        else:
            prefix = members[0][:members[0].rfind(".") + 1]
            common = prefix if all(m.startswith(prefix) for m in members) else ""
            units[common + "{" + ",".join(m[len(common):] for m in members) + "}"] = members
    return units


def _compact(res: QuantResult) -> QuantResult:
    """What it takes to rebuild the weight later: uint8 levels and the grid, on the CPU."""
    return QuantResult(weight=None, qweight=res.qweight.cpu(), scales=res.scales.cpu(), zeros=res.zeros.cpu(),
                       g_idx=res.g_idx.cpu(), spec=res.spec, error=res.error)


def _dequantized(res: QuantResult, like: torch.Tensor) -> torch.Tensor:
    g = res.g_idx.to(like.device).long()
    q = dequantize(res.qweight.to(like.device), res.scales.to(like.device)[:, g], res.zeros.to(like.device)[:, g])
    return q.to(like.dtype)


def _mean_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token NLL over every predicted token of ``windows`` [n, seq]."""
    return evaluate_windows(model, windows, batch_size=batch_size, device=device, progress=False)["nll"]


def _loss_sensitivity(model, units: dict[str, list[str]], modules: dict, candidates: dict, bits: list[int],
                      cfg: GPTQMixedConfig, ctx: StepContext) -> tuple[dict, dict]:
    """ΔL(unit, b) = NLL(only the unit at b bits) − NLL(float), on the first probe_samples windows."""
    windows = ctx.calibration.input_ids[:cfg.probe_samples]
    with on_device(model, ctx.device):
        base = _mean_nll(model, windows, ctx.batch_size, ctx.device)
        delta: dict[str, dict[int, float]] = {}
        bar = tqdm(total=len(units) * len(bits), desc="loss probe", unit="pass", disable=not ctx.progress)
        for unit, members in units.items():
            delta[unit] = {}
            for b in bits:
                originals = {n: modules[n].weight.data for n in members}
                try:
                    for n in members:
                        modules[n].weight.data = _dequantized(candidates[n][b], originals[n])
                    delta[unit][b] = _mean_nll(model, windows, ctx.batch_size, ctx.device) - base
                finally:
                    for n in members:
                        modules[n].weight.data = originals[n]
                bar.update()
            for n in members:
                candidates.pop(n)  # free this unit's levels as soon as they are measured
        bar.close()
    return delta, {"nll_float": base, "probe_windows": int(len(windows)),
                   "probe_forward_passes": len(units) * len(bits) + 1}


def apply_gptq_mixed(model: torch.nn.Module, cfg: GPTQMixedConfig, ctx: StepContext) -> dict:
    """GPTQ at a bit width per module, allocated by an integer program over measured sensitivities
    (Hubara et al. 2021, AdaQuant/CalibTIP bit allocation); see the module docstring for the phases."""
    modules = match_modules(model, cfg.targets, cfg.ignore, where=ctx.where)
    bits = list(cfg.candidate_bits)
    _check_shapes(modules, cfg.spec(bits[0]), ctx.where)
    units = _units(model, list(modules), cfg.tie_fused)
    keep_levels = cfg.sensitivity == "loss"
    candidates: dict[str, dict[int, QuantResult]] = {}

    def make_acc(name, module, device):
        return HessianAccumulator(module.in_features, device)

    def probe(name, module, acc):  # records, never modifies the module
        w = module.weight.data.float()
        errors = {}
        for b in bits:
            res = gptq_solve(w, acc.H, cfg.spec(b), percdamp=cfg.damp, block_size=cfg.block_size,
                             act_order=cfg.act_order)
            errors[b] = res.error
            if keep_levels:
                candidates.setdefault(name, {})[b] = _compact(res)
        return errors

    layer_error = run_layerwise(model, ctx.calibration.batches(ctx.batch_size), modules=modules,
                                offload=ctx.offload(model),
                                make_accumulator=make_acc, solve=probe, device=ctx.device,
                                progress=ctx.progress, desc="gptq_mixed probe", share_inputs=True).reports
    extra: dict = {}
    if keep_levels:
        sensitivity, extra = _loss_sensitivity(model, units, modules, candidates, bits, cfg, ctx)
    else:
        sensitivity = {u: {b: sum(layer_error[n][b] for n in members) for b in bits} for u, members in units.items()}

    params = {u: sum(modules[n].weight.numel() for n in members) for u, members in units.items()}
    alloc = solve_allocation(sensitivity, params, cfg.target_bits)
    unit_of = {n: u for u, members in units.items() for n in members}
    module_bits = {n: alloc.bits[unit_of[n]] for n in modules}

    def solve(name, module, acc):
        w = module.weight.data.float()
        res = gptq_solve(w, acc.H, cfg.spec(module_bits[name]), percdamp=cfg.damp, block_size=cfg.block_size,
                         act_order=cfg.act_order)
        store_quant_result(ctx, name, module, res)
        return {"gptq_error": res.error, "tokens": acc.count}

    walk = run_layerwise(model, ctx.calibration.batches(ctx.batch_size), modules=modules,
                         offload=ctx.offload(model),
                         make_accumulator=make_acc, solve=shared(solve, ctx.state, QuantResult.from_parts), device=ctx.device,
                         progress=ctx.progress, desc="gptq_mixed", share_inputs=True)
    final = walk.reports
    free_graphs()  # the column-loop CUDA graphs both passes reused

    # String keys: the report is written as JSON, and the in-memory report should read the same.
    report = {}
    for n in modules:
        u = unit_of[n]
        report[n] = {"bits": module_bits[n], "group_size": cfg.group_size,
                     "sensitivity": {str(b): sensitivity[u][b] for b in bits},
                     "probe_layer_error": {str(b): layer_error[n][b] for b in bits}, **final[n]}
        if u != n:
            report[n]["unit"] = u
    histogram = Counter(module_bits.values())
    weights_at = Counter()
    for n, b in module_bits.items():
        weights_at[b] += modules[n].weight.numel()
    summary = {
        "target_bits": cfg.target_bits, "achieved_avg_bits": alloc.avg_bits,
        "bits_histogram": {str(b): histogram[b] for b in bits},
        "weights_by_bits": {str(b): weights_at[b] for b in bits},
        "sensitivity": cfg.sensitivity, "predicted_delta": alloc.objective,
        "min_avg_bits": alloc.min_avg_bits, "units": len(units),
        "gptq_error_sum": sum(r["gptq_error"] for r in final.values()), **extra,
    }
    experts = {"experts": walk.experts} if walk.experts else {}  # a mixture of experts: tokens per expert
    return {"modules": report, "summary": summary, **experts}
