"""``format: gptq``: the GPTQ "v1" checkpoint that serving stacks load, and our loader for it.

Writer: every linear quantized by an ``rtn``/``gptq`` step becomes ``{fqn}.qweight``,
``.qzeros``, ``.scales``, ``.g_idx`` (see :mod:`compress.quantize.gptq_v1`), every
other tensor is float16 in ``model.safetensors``; ``config.json`` carries
``quantization_config`` (``quant_method: gptq``) and ``quantize_config.json`` the same
dict. Read by transformers (via optimum + gptqmodel), gptqmodel and vLLM.

Per-module specs that differ from the default, and linears inside the decoder blocks
that were left in float, are written as gptqmodel ``dynamic`` rules
(``"+:^model\\.layers\\.3\\.mlp\\.(?:down_proj)$": {"bits": 8}`` / ``"-:...": {}``).
gptqmodel 7.6 (``quantization/config.py`` ``dynamic_get``: first rule whose regex
``match``-es the module name; ``utils/model.py`` ``create_quant_module``: a negative
match stays ``nn.Linear``, a positive one overrides bits/group_size/sym/desc_act) and
vLLM (``quantization/utils/gptq_utils.py`` ``get_dynamic_override``, same semantics,
matched against fused names such as ``qkv_proj``, which our rules also match when all
siblings share the override) honour them. Exclusions also go into
``modules_in_block_to_quantize``, the only per-module switch that optimum's
``GPTQQuantizer.convert_model`` (the transformers path) reads: optimum 2.3 ignores
``dynamic``, so mixed bits load through gptqmodel/vLLM but not through transformers.

Loader: rebuild the float model from ``config.json`` without its quantization_config
and dequantize each packed linear (``scales * (q - zero)``), so ``compress eval DIR``
needs no gptqmodel.
"""
from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.export import register_writer
from compress.models import register_loader
from compress.quantize.gptq_v1 import check_v1_shape, dequantize_gptq_v1, pack_gptq_v1
from compress.quantize.grid import ALLOWED_BITS
from compress.quantize.solvers import QuantResult

WEIGHTS_NAME = "model.safetensors"
PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# QuantResult does not record the damping used; loaders ignore the value (it only
# describes how the checkpoint was made), transformers just checks 0 < x < 1.
_DAMP_PERCENT = 0.01


# ----------------------------------------------------------------- shared by the exports


def quantized_linears(model: nn.Module, artifacts: dict, fmt: str) -> dict[str, tuple[nn.Linear, QuantResult]]:
    """The quantized linears of ``artifacts["quant"]``, checked against the model.

    Refuses an empty set, a name the model lacks, a non-linear, and a weight that
    no longer equals the dequantized levels (a later step changed it, so the
    packed levels would describe a different model)."""
    quant = artifacts.get("quant") or {}
    if not quant:
        raise CompressError(f"export format {fmt!r} packs quantized weights, but no step quantized any: "
                            f"run rtn or gptq before exporting format {fmt}")
    modules = dict(model.named_modules())
    out: dict[str, tuple[nn.Linear, QuantResult]] = {}
    for name, res in quant.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            what = "is not in the model" if m is None else f"is a {type(m).__name__}, not a Linear"
            raise CompressError(f"export {fmt}: quantized module {name} {what}")
        if tuple(res.qweight.shape) != tuple(m.weight.shape):
            raise CompressError(f"export {fmt}: {name} has weight {tuple(m.weight.shape)} but its quantized "
                                f"levels are {tuple(res.qweight.shape)}; a later step changed the layer")
        w = m.weight.detach().float().cpu()
        deq = res.dequantize().to(m.weight.dtype).float()
        # Far below half a quantization step, far above float rounding.
        tol = 1e-3 * res.scales.float().abs().max() + torch.finfo(m.weight.dtype).eps * deq.abs()
        if not bool(((w - deq).abs() <= tol).all()):
            raise CompressError(f"export {fmt}: the weight of {name} is no longer on its quantization grid "
                                "(a step after the quantizing one changed it); quantize last, or export format hf")
        out[name] = (m, res)
    return out


def block_list_of(model: nn.Module, names: list[str], fmt: str) -> str:
    """The ModuleList of decoder blocks (``model.layers``) that holds every quantized linear.

    GPTQ/compressed-tensors loaders quantize linears inside the repeated blocks;
    anything else (lm_head, a vision tower) would be loaded as float and miss its weight."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    found = set()
    for name in names:
        owners = [lst for lst in lists if re.match(rf"{re.escape(lst)}\.\d+\.", name)]
        if not owners:
            raise CompressError(
                f"export {fmt}: {name} is quantized but lies outside the model's decoder blocks; "
                "serving loaders only quantize linears inside the blocks (model.layers.N.*). "
                "Leave it out of the quantize step (e.g. ignore: [lm_head]) or export format hf")
        found.add(max(owners, key=len))
    if len(found) > 1:
        raise CompressError(f"export {fmt}: quantized linears lie in several block lists ({', '.join(sorted(found))}); "
                            "only one decoder stack can be quantized")
    return found.pop()


def float_linears_in_blocks(model: nn.Module, block_list: str, quantized: dict) -> list[str]:
    """Linears inside the decoder blocks that stay in float (loaders must be told)."""
    prefix = re.compile(rf"{re.escape(block_list)}\.\d+\.")
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and prefix.match(n) and n not in quantized]


def float_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict minus ``skip``, floats cast to ``dtype``, on the CPU.

    Tied weights are written once, as transformers' save_pretrained does: with
    ``tie_word_embeddings`` the output embedding shares storage with the input one
    and only the input embedding is stored (the loader re-ties)."""
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        if out_emb is not None and out_emb.weight is model.get_input_embeddings().weight:
            tied = {n + ".weight" for n, m in model.named_modules() if m is out_emb}
    out = {}
    for name, t in model.state_dict().items():
        if name in skip or name in tied:
            continue
        t = t.detach().cpu()
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def export_dtype(spec: Any, fmt: str, allowed: tuple[str, ...]) -> torch.dtype:
    name = getattr(spec, "dtype", None) or "float16"
    if name not in allowed:
        raise CompressError(f"export {fmt}: dtype {name!r} is not supported; allowed: {', '.join(allowed)}")
    return getattr(torch, name)


def write_model_files(model: nn.Module, tokenizer, folder: Path, tensors: dict, dtype: torch.dtype,
                      quantization_config: dict, metadata_format: str) -> None:
    """model.safetensors, config.json (with ``quantization_config``), generation config, tokenizer."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": metadata_format})
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    data = json.loads(config.to_json_string(use_diff=True))
    data["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def build_float_model(path: str | Path, dtype: torch.dtype):
    """The architecture of ``config.json`` in float, without its quantization_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress.prune.shrink import apply_pruned_layers

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build plain nn.Linear layers; we dequantize ourselves
    return apply_pruned_layers(AutoModelForCausalLM.from_config(config, dtype=dtype))


def load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], dequantized: set[str], path, fmt: str) -> None:
    """Load the float tensors and check that every parameter got a value."""
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CompressError(f"{path}: the {fmt} export has tensors the model does not: {unexpected[:5]}")
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()},
                          strict=False)
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        out_emb = model.get_output_embeddings()
        tied = {n + ".weight" for n, m in model.named_modules() if m is out_emb}
    missing = sorted(expected - set(tensors) - dequantized - tied)
    if missing:
        raise CompressError(f"{path}: the {fmt} export lacks tensors: {missing[:5]}")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------- the GPTQ v1 writer


def _module_spec(res: QuantResult, in_features: int) -> dict:
    """The gptqmodel per-module quant keys. desc_act is True only for a non-trivial
    g_idx: our act-order uses static groups, so g_idx stays ``j // group_size`` and
    kernels can take the fast no-reordering path (desc_act=False)."""
    gs = res.spec.group_size_for(in_features)
    trivial = torch.equal(res.g_idx.long().cpu(), torch.arange(in_features) // gs)
    return {"bits": res.spec.bits, "group_size": res.spec.group_size, "sym": res.spec.sym,
            "desc_act": not trivial}


# vLLM fuses these siblings into one layer and matches ``dynamic`` rules against the
# fused name (its ``packed_modules_mapping`` for llama/qwen2-style models).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def dynamic_rules(names: list[str]) -> list[str]:
    """Anchored regexes matching exactly ``names``, one per parent module
    (``^model\\.layers\\.0\\.mlp\\.(?:down_proj|up_proj)$``); a parent whose
    fused siblings are all listed also matches the fused name vLLM uses."""
    by_parent: dict[str, list[str]] = {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        by_parent.setdefault(parent, []).append(leaf)
    rules = []
    for parent, leaves in by_parent.items():
        leaves = sorted(leaves)
        fused = [f for f, parts in _FUSED.items() if set(parts) <= set(leaves)]
        alts = "|".join(re.escape(x) for x in leaves + fused)
        head = re.escape(parent) + r"\." if parent else ""
        rules.append(f"^{head}(?:{alts})$")
    return rules


def gptq_quantization_config(specs: dict[str, dict], excluded: list[str], partial_groups: bool) -> dict:
    """``quantization_config`` for config.json and quantize_config.json.

    The most common spec is the default; modules with another spec get ``dynamic``
    ``+:`` overrides, float linears inside the blocks ``-:`` rules (gptqmodel and vLLM
    apply the first rule that ``re.match``-es, so the negative rules come first)."""
    counts = Counter(json.dumps(s, sort_keys=True) for s in specs.values())
    default = json.loads(counts.most_common(1)[0][0])
    dynamic: dict[str, dict] = {"-:" + rule: {} for rule in dynamic_rules(excluded)}
    overrides: dict[str, list[str]] = {}
    for name, s in specs.items():
        diff = {k: v for k, v in s.items() if v != default[k]}
        if diff:
            overrides.setdefault(json.dumps(diff, sort_keys=True), []).append(name)
    for diff, names in overrides.items():
        for rule in dynamic_rules(names):
            dynamic["+:" + rule] = json.loads(diff)
    from compress import __version__

    cfg = {
        "quant_method": "gptq",
        "bits": default["bits"],
        "group_size": default["group_size"],
        "desc_act": default["desc_act"],
        "sym": default["sym"],
        "checkpoint_format": "gptq",
        "format": "gptq",  # transformers' name for checkpoint_format
        "true_sequential": True,
        "damp_percent": _DAMP_PERCENT,
        "static_groups": False,
        "act_group_aware": False,
        "lm_head": False,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"compress:{__version__}"]},
    }
    if dynamic:
        cfg["dynamic"] = dynamic
    if excluded:
        # optimum (and vLLM) keep a block linear quantized iff its name contains one of these.
        cfg["modules_in_block_to_quantize"] = [sorted(specs)]
    if partial_groups:
        # gptqmodel's auto choice on CPU (TorchAtenLinear) accepts in % group_size != 0 at
        # load time but fails at the first forward; its torch kernel pads correctly.
        cfg["backend"] = "torch"
    return cfg


def check_zero_points(quantized: dict[str, tuple[nn.Linear, QuantResult]]) -> None:
    """Refuse zero points of 0 (asymmetric groups with no negative weight): v1 stores
    zero - 1, and readers disagree on a stored -1 (vLLM/exllama decode 2**bits,
    gptqmodel's v1->v2 carry corrupts the neighbouring zero), so none reads them right."""
    bad = {name: int((res.zeros == 0).sum()) for name, (_, res) in quantized.items()}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        listed = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CompressError(
            f"export gptq: {sum(bad.values())} zero points are 0, which GPTQ v1 cannot store (it stores "
            f"zero - 1): {listed}{more}. Quantize with sym: true, or export format compressed-tensors")


def pack_module(name: str, linear: nn.Linear, res: QuantResult) -> dict[str, torch.Tensor]:
    """The v1 tensors of one linear, or a CompressError saying why it cannot be stored."""
    bits, out_f, in_f = res.spec.bits, linear.out_features, linear.in_features
    try:
        check_v1_shape(bits, in_f, out_f)
    except ValueError as exc:
        raise CompressError(f"export gptq: {name}: {exc}; exclude it from the quantize step "
                            "(it then stays float) or use other bits") from None
    try:
        packed = pack_gptq_v1(res)
    except ValueError as exc:
        raise CompressError(f"export gptq: {name}: {exc}") from None
    tensors = {f"{name}.{k}": packed[k].cpu().contiguous() for k in PACKED_SUFFIXES}
    if linear.bias is not None:
        tensors[f"{name}.bias"] = linear.bias.detach().cpu().to(torch.float16).contiguous()
    return tensors


@register_writer("gptq")
def write_gptq(model, tokenizer, folder: Path, artifacts: dict, spec: Any) -> None:
    """GPTQ v1 checkpoint (see the module docstring)."""
    dtype = export_dtype(spec, "gptq", ("float16",))
    quantized = quantized_linears(model, artifacts, "gptq")
    block_list = block_list_of(model, list(quantized), "gptq")
    excluded = float_linears_in_blocks(model, block_list, quantized)
    check_zero_points(quantized)
    tensors: dict[str, torch.Tensor] = {}
    specs = {}
    for name, (linear, res) in quantized.items():
        tensors.update(pack_module(name, linear, res))
        specs[name] = _module_spec(res, linear.in_features)
    skip = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
    tensors.update(float_tensors(model, skip, dtype))
    partial = any(linear.in_features % res.spec.group_size_for(linear.in_features)
                  for linear, res in quantized.values())
    qcfg = gptq_quantization_config(specs, excluded, partial)
    write_model_files(model, tokenizer, folder, tensors, dtype, qcfg, "pt")
    (folder / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")


# ----------------------------------------------------------------- our loader


def _v1_bits(name: str, qweight: torch.Tensor, in_features: int) -> int:
    """Bits from the packed shape: qweight has ``in * bits / 32`` rows (exact)."""
    rows = qweight.shape[0]
    for bits in ALLOWED_BITS:
        if in_features * bits == rows * 32:
            return bits
    raise CompressError(f"{name}.qweight has {rows} rows, which fits no bit width for {in_features} inputs")


def load_packed_model(path: str, fmt: str, packed_suffix: str, dequantize_one, *, dtype: torch.dtype, device):
    """Float model from an export: every ``{name}{packed_suffix}`` tensor names a packed linear whose
    weight ``dequantize_one(name, linear, tensors)`` rebuilds (popping the tensors it uses);
    every other tensor loads as is."""
    from safetensors.torch import load_file

    model = build_float_model(path, dtype)
    tensors = load_file(str(Path(path) / WEIGHTS_NAME))
    modules = dict(model.named_modules())
    dequantized = set()
    for key in [k for k in tensors if k.endswith(packed_suffix)]:
        name = key[: -len(packed_suffix)]
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise CompressError(f"{path}: packed weights for {name}, which is not a Linear of this model")
        w = dequantize_one(name, linear, tensors)
        with torch.no_grad():
            linear.weight.copy_(w.to(dtype))
        dequantized.add(name + ".weight")
    if not dequantized:
        raise CompressError(f"{path}: a {fmt} export without any packed linear")
    load_rest(model, tensors, dequantized, path, fmt)
    return model.to(device).eval(), load_tokenizer(path)


@register_loader("gptq")
def load_gptq(path: str, *, dtype: torch.dtype = torch.float32, device="cpu"):
    """Float model with each packed linear dequantized: ``W = scales * (q - zero)``."""

    def dequantize_one(name, linear, tensors):
        packed = {k: tensors.pop(f"{name}.{k}") for k in PACKED_SUFFIXES}
        bits = _v1_bits(name, packed["qweight"], linear.in_features)
        try:
            return dequantize_gptq_v1(packed, bits, linear.in_features, linear.out_features, dtype=dtype)
        except ValueError as exc:
            raise CompressError(f"{path}: {name}: {exc}") from None

    return load_packed_model(path, "gptq", ".qweight", dequantize_one, dtype=dtype, device=device)
