"""``format: gptq``: the GPTQ "v1" checkpoint that serving stacks load: its writer and our loader.

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

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import __version__
from compress.errors import CompressError
from compress.formats.packed import (block_list_of, export_dtype, float_linears_in_blocks, float_tensors,
                                     load_packed_model, quantized_linears, write_model_files)
from compress.quantize.gptq_v1 import check_v1_shape, dequantize_gptq_v1, pack_gptq_v1
from compress.quantize.grid import ALLOWED_BITS
from compress.quantize.solvers import QuantResult

PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# QuantResult does not record the damping used; loaders ignore the value (it only
# describes how the checkpoint was made), transformers just checks 0 < x < 1.
_DAMP_PERCENT = 0.01


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
        packed = pack_gptq_v1(res.to(linear.weight.device))  # on the layer's device: integer ops, the same bits
    except ValueError as exc:
        raise CompressError(f"export gptq: {name}: {exc}") from None
    tensors = {f"{name}.{k}": packed[k].cpu().contiguous() for k in PACKED_SUFFIXES}
    if linear.bias is not None:
        tensors[f"{name}.bias"] = linear.bias.detach().cpu().to(torch.float16).contiguous()
    return tensors


def write_gptq(model, tokenizer, folder: Path, state, spec: Any) -> None:
    """GPTQ v1 checkpoint (see the module docstring)."""
    dtype = export_dtype(spec, "gptq", ("float16",))
    quantized = quantized_linears(model, state.quant, "gptq")
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


def load_gptq(path: str, *, dtype: torch.dtype = torch.float32, device="cpu", trust_remote_code: bool = False):
    """Float model with each packed linear dequantized: ``W = scales * (q - zero)``."""

    def dequantize_one(name, linear, tensors):
        packed = {k: tensors.pop(f"{name}.{k}") for k in PACKED_SUFFIXES}
        bits = _v1_bits(name, packed["qweight"], linear.in_features)
        try:
            return dequantize_gptq_v1(packed, bits, linear.in_features, linear.out_features, dtype=dtype)
        except ValueError as exc:
            raise CompressError(f"{path}: {name}: {exc}") from None

    return load_packed_model(path, "gptq", ".qweight", dequantize_one, dtype=dtype, device=device)
