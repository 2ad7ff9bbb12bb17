"""Recipe steps that refine an earlier quantization: ``adaquant`` and ``bias_correction``.

Both run after ``rtn``/``gptq`` in the same recipe and compare the quantized
layer with its float weight, which the pipeline keeps for them in
``ctx.state.float_weight`` (they declare ``needs={FLOAT_WEIGHTS}``, config.py).
Both go through the shared layer-wise runner, so each layer sees inputs that
come through the already-refined prefix of the model (sequential mode).
"""
from __future__ import annotations

import math
import torch
import torch.nn as nn

from compress.algorithms import StepContext
from compress.distributed import shared
from compress.errors import CompressError
from compress.quantize.config import AdaQuantConfig, BiasCorrectionConfig
from compress.quantize.refine import MeanAccumulator, adaquant_refine, output_shift
from compress.quantize.solvers import QuantResult
from compress.quantize.steps import store_quant_result
from compress.runner import HessianAccumulator, block_layout, run_layerwise
from compress.targets import match_modules


def _float_weights(ctx: StepContext, modules: dict, *, need_quant: bool) -> dict:
    quant, floats = ctx.state.quant, ctx.state.float_weight
    for name in modules:
        if need_quant and name not in quant:
            raise CompressError(f"{ctx.where}: module {name} has no quantization result; run rtn or gptq first "
                                f"(an earlier step of the same recipe that targets it)")
        if name not in floats:
            raise CompressError(f"{ctx.where}: no float weight was kept for module {name}; run rtn or gptq first "
                                f"in the same recipe (run_recipe keeps float weights for steps that use them)")
    return floats


# ----------------------------------------------------------------------------- adaquant


def apply_adaquant(model: nn.Module, cfg: AdaQuantConfig, ctx: StepContext) -> dict:
    """AdaQuant (Hubara et al. 2020): per layer, Adam on weights, scales and zeros of the quantized layer."""
    modules = match_modules(model, cfg.targets, cfg.ignore, where=ctx.where)
    floats = _float_weights(ctx, modules, need_quant=True)
    quant = ctx.state.quant

    def make_acc(name, module, device):
        return HessianAccumulator(module.in_features, device)

    def solve(name, module, acc):
        W0 = floats[name].to(acc.H.device)
        res, stats = adaquant_refine(W0, acc.H, quant[name], steps=cfg.steps, lr_weight=cfg.lr_weight,
                                     lr_scale=cfg.lr_scale, lr_zero=cfg.lr_zero,
                                     optimize_zero=cfg.optimize_zero, init=cfg.init)
        store_quant_result(ctx, name, module, res)
        return {"tokens": acc.count, "error_before": stats["before"], "error_after": stats["after"],
                "improved": stats["improved"], "levels_changed": stats["levels_changed"],
                "best_step": stats["best_step"]}

    result = run_layerwise(model, ctx.calibration.batches(ctx.batch_size), modules=modules,
                           offload=ctx.offload(model),
                           make_accumulator=make_acc, solve=shared(solve, ctx.state, QuantResult.from_parts), device=ctx.device,
                           progress=ctx.progress, desc="adaquant", share_inputs=True)
    reports = result.reports
    before = sum(r["error_before"] for r in reports.values())
    after = sum(r["error_after"] for r in reports.values())
    return {"modules": reports, "summary": {
        "error_before_sum": before, "error_after_sum": after,
        "after_over_before": after / before if before else None,
        "modules_improved": sum(r["improved"] for r in reports.values()), "modules": len(reports)}}


# ----------------------------------------------------------------------------- bias correction

# Per model type: config flag -> the block-relative linears whose bias it makes the
# architecture build. A target without a bias needs its flag, or a reload would drop it.
BIAS_FLAGS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {"attention_bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
              "mlp_bias": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
}


def _flags_to_set(model: nn.Module, modules: dict, where: str) -> set[str]:
    """The config flags that must be turned on so that every target without a bias can get one."""
    blocks = block_layout(model).blocks
    model_type = getattr(model.config, "model_type", None)
    flags = BIAS_FLAGS.get(model_type, {})
    needed = set()
    for name, module in modules.items():
        if module.bias is not None:
            continue
        parts = name[len(blocks) + 1:].split(".", 1) if name.startswith(blocks + ".") else []
        rel = parts[1] if len(parts) == 2 else None
        flag = next((f for f, covered in flags.items() if rel in covered), None)
        if flag is None:
            raise CompressError(
                f"{where}: module {name} has no bias and a {model_type} model cannot load one there "
                f"(no config flag builds it; known flags: {dict(flags) or 'none'}); "
                f"leave it out of the targets (add it to `ignore`)")
        needed.add(flag)
    return needed


def _enable_biases(model: nn.Module, flags: set[str]) -> list[str]:
    """Turn the flags on and give every linear they cover a bias (zeros where there was none)."""
    blocks = model.get_submodule(block_layout(model).blocks)
    covered = BIAS_FLAGS.get(model.config.model_type, {})
    created = []
    for flag in sorted(flags):
        setattr(model.config, flag, True)
        for block in blocks:
            for rel in covered[flag]:
                linear = block.get_submodule(rel)
                if linear.bias is None:
                    w = linear.weight
                    linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                               requires_grad=w.requires_grad)
                    created.append(rel)
    return created


def apply_bias_correction(model: nn.Module, cfg: BiasCorrectionConfig, ctx: StepContext) -> dict:
    """Bias correction: add (W0 − Ŵ)·E[x] to each quantized layer's bias (mean output = the float layer's)."""
    modules = match_modules(model, cfg.targets, cfg.ignore, where=ctx.where)
    floats = _float_weights(ctx, modules, need_quant=False)
    had_bias = {name: m.bias is not None for name, m in modules.items()}
    flags = _flags_to_set(model, modules, ctx.where)  # validate everything before touching the model
    _enable_biases(model, flags)

    def make_acc(name, module, device):
        return MeanAccumulator(module.in_features, device)

    @torch.no_grad()
    def solve(name, module, acc):
        W0 = floats[name].to(acc.mean.device)
        shift = output_shift(W0, module.weight, acc.mean)
        old = module.bias.detach().float().clone()
        module.bias.add_(shift.to(device=module.bias.device, dtype=module.bias.dtype))
        applied = module.bias.detach().float().to(shift.device) - old.to(shift.device)
        # Mean-output error (RMS over output channels) on the calibration inputs: before is
        # the shift itself; after is what the bias's dtype could not represent.
        return {"tokens": acc.count, "bias_created": not had_bias[name],
                "mean_abs_shift": float(shift.abs().mean()),
                "mean_output_error_before": float(shift.pow(2).mean().sqrt()),
                "mean_output_error_after": float((shift - applied).pow(2).mean().sqrt())}

    result = run_layerwise(model, ctx.calibration.batches(ctx.batch_size), modules=modules,
                           offload=ctx.offload(model),
                           make_accumulator=make_acc, solve=shared(solve, ctx.state, QuantResult.from_parts), device=ctx.device,
                           progress=ctx.progress, desc="bias correction", share_inputs=True)
    reports = result.reports
    n = len(reports)
    return {"modules": reports, "config_flags_set": sorted(flags), "summary": {
        "modules": n, "biases_created": sum(r["bias_created"] for r in reports.values()),
        "mean_abs_shift": sum(r["mean_abs_shift"] for r in reports.values()) / n,
        "mean_output_error_before": math.sqrt(sum(r["mean_output_error_before"] ** 2 for r in reports.values()) / n),
        "mean_output_error_after": math.sqrt(sum(r["mean_output_error_after"] ** 2 for r in reports.values()) / n)}}
