"""Recipe steps for weight-only quantization: ``rtn`` and ``gptq``.

Each step fake-quantizes the targeted linears in place (the weights become the
dequantized grid values) and leaves the integer levels, scales and zeros in
``ctx.state.quant`` so an export can pack them (GPTQ v1 layout).
"""
from __future__ import annotations

import torch

from compress.algorithms import StepContext
from compress.distributed import shared
from compress.errors import CompressError
from compress.quantize.config import GPTQConfig, RTNConfig
from compress.quantize.grid import QuantSpec
from compress.quantize.solvers import (QuantResult, free_graphs, gptq_solve, layer_output_error, rtn_solve,
                                      split_rows)
from compress.accumulators import AsymmetricAccumulator, HessianAccumulator
from compress.quantize.gptaq import asymmetric_target
from compress.runner import run_layerwise
from compress.blockwise import per_block
from compress.twin import FloatTwin
from compress.targets import match_modules


def store_quant_result(ctx: StepContext, name: str, module: torch.nn.Module, res: QuantResult) -> None:
    if ctx.keep_float_weights:
        ctx.state.float_weight.setdefault(name, module.weight.data.detach().cpu().clone())
    module.weight.data.copy_(res.weight.to(module.weight.dtype))
    # Keep only what an export packs; the dequantized weight already lives in the module.
    ctx.state.quant[name] = QuantResult(
        weight=None, qweight=res.qweight.cpu(), scales=res.scales.cpu(), zeros=res.zeros.cpu(),
        g_idx=res.g_idx.cpu(), spec=res.spec, error=res.error)


def _check_shapes(modules: dict, spec: QuantSpec, where: str) -> None:
    for name, m in modules.items():
        if m.weight.dim() != 2:
            raise CompressError(f"{where}: module {name} has a {m.weight.dim()}-d weight; only linears are quantized")


@torch.no_grad()
def apply_rtn(model: torch.nn.Module, cfg: RTNConfig, ctx: StepContext) -> dict:
    """Round-to-nearest weight quantization, per group of input columns (data-free baseline)."""
    modules = match_modules(model, cfg.targets, cfg.ignore, where=ctx.where)
    spec = cfg.spec()
    _check_shapes(modules, spec, ctx.where)

    def solve(name, m):
        w = m.weight.data.to(ctx.device)
        res = rtn_solve(w, spec)
        # Measured before storing: on the CPU, ``w`` is the module's own weight, which storing overwrites.
        report = {"bits": spec.bits, "group_size": spec.group_size,
                  "weight_rel_mse": float(((res.weight - w).pow(2).mean() / w.pow(2).mean().clamp_min(1e-30)))}
        store_quant_result(ctx, name, m, res)
        return report

    # In model order; a streamed model (compress.stream) block by block (compress.blockwise).
    return {"modules": per_block(model, modules, solve, device=ctx.device, progress=ctx.progress, desc="rtn")}


def apply_gptq(model: torch.nn.Module, cfg: GPTQConfig, ctx: StepContext) -> dict:
    """GPTQ (Frantar et al. 2022) through the shared layer-wise runner, true-sequential."""
    modules = match_modules(model, cfg.targets, cfg.ignore, where=ctx.where)
    spec = cfg.spec()
    _check_shapes(modules, spec, ctx.where)

    twin = FloatTwin() if cfg.asymmetric else None

    def make_acc(name, module, device):
        if twin is not None:
            return AsymmetricAccumulator(module.in_features, device, twin.input_of(module))
        return HessianAccumulator(module.in_features, device)

    def solve_group(members: dict[str, torch.nn.Module], acc):
        # Modules fed the same input (q,k,v; gate,up) share H, and GPTQ treats every output
        # row on its own given H: one solve on the stacked rows is the same maths as one per
        # module, with a third of the column loops for q,k,v.
        ws = [m.weight.data.float() for m in members.values()]
        target = torch.cat(ws)
        if twin is not None:  # GPTAQ: GPTQ on the least-squares target for the float inputs (gptaq.py)
            target = asymmetric_target(target, acc.H, acc.dXXT, percdamp=cfg.damp, alpha=cfg.asymmetric_alpha)
        stacked = gptq_solve(target, acc.H, spec, percdamp=cfg.damp, block_size=cfg.block_size,
                             act_order=cfg.act_order, with_error=False)  # split_rows measures each module
        reports, row = {}, 0
        for (name, module), w in zip(members.items(), ws):
            res = split_rows(stacked, row, row + w.shape[0], w, acc.H)
            row += w.shape[0]
            rtn_err = layer_output_error(w, rtn_solve(w, spec).weight.float(), acc.H)
            store_quant_result(ctx, name, module, res)
            reports[name] = {"bits": spec.bits, "group_size": spec.group_size, "tokens": acc.count,
                             "gptq_error": res.error, "rtn_error": rtn_err}
        return reports

    try:
        result = run_layerwise(model, ctx.calibration.batches(ctx.batch_size), modules=modules,
                               offload=ctx.offload(model),
                               make_accumulator=make_acc, solve_group=shared(solve_group, ctx.state, QuantResult.from_parts), device=ctx.device,
                               progress=ctx.progress, desc="gptq", share_inputs=True, twin=twin)
    finally:
        free_graphs()
    reports = result.reports
    total_g = sum(r["gptq_error"] for r in reports.values())
    total_r = sum(r["rtn_error"] for r in reports.values())
    experts = {"experts": result.experts} if result.experts else {}  # a mixture of experts: tokens per expert
    return {"modules": reports, "summary": {"gptq_error_sum": total_g, "rtn_error_sum": total_r,
                                            "gptq_over_rtn": total_g / total_r if total_r else None}, **experts}
