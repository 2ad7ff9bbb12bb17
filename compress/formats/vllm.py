"""What vLLM does with a packed export, decided at export time: loads or refuses, and which int4/int8
kernel each layer would run on.

The rules are those of vLLM 0.26.0 — the release whose wheel pins torch 2.11, the GPU machine's
(``bench/device/vllm_prepare.sh``) — read from that wheel's source; they are restated here, not
copied. Where each comes from:

- GPTQ checkpoints (``quant_method: gptq``) load through ``AutoGPTQConfig``
  (``model_executor/layers/quantization/auto_gptq.py``): its type map holds (4 bits, sym) and
  (8 bits, sym) only, so asymmetric or 2/3-bit GPTQ is refused ("Unsupported quantization config"),
  also per module through ``dynamic`` (``quantization/utils/gptq_utils.py`` ``override_config``);
  ``AutoGPTQLinearMethod`` first calls ``verify_marlin_supported`` (``utils/marlin_utils.py``:
  group sizes -1, 32, 64, 128) and sizes ``scales``/``qzeros`` with ``in // group_size`` rows, so a
  partial last group (SmolLM2's 576 inputs at g128) fails to load with a shape mismatch; ``qweight``
  and ``qzeros`` need ``in`` and ``out`` divisible by the pack factor ``32 / bits``.
- compressed-tensors pack-quantized loads through ``CompressedTensorsWNA16``
  (``compressed_tensors/schemes/compressed_tensors_wNa16.py``): 2–8 bits symmetric, zero points
  (asymmetric) only at 4 and 8 bits; groups must divide the input (``distributed/utils.py``
  ``verify_group_size_divides_partition``).
- The kernel of each layer is the first of ``choose_mp_linear_kernel``'s CUDA list
  (``model_executor/kernels/linear/__init__.py``) whose ``can_implement`` accepts it, in
  ``kernels/linear/mixed_precision/``: ``MacheteLinearKernel`` (Hopper only; GPTQ-style types uint4b8 /
  uint8b128, or uint4 / uint8 with zero points; groups -1, 64, 128 for fp16/bf16 activations; in % 64 and
  out % 128, ``quantization/utils/machete_utils.py``), AllSpark (Ampere only: never on an H200),
  ``MarlinLinearKernel`` (uint4b8 / uint8b128, or uint4 with zero points; groups -1, 32, 64, 128; inputs a
  whole number of groups; other tile misalignment is zero-padded with a "performance may be degraded"
  warning — strict n % 64 and k % 128 only with act-order), Conch (needs the ``conch`` package, not a
  vLLM dependency), ``ExllamaLinearKernel`` (uint4b8 / uint8b128, float16 activations only, groups > 0
  dividing the input, out % pack factor), ``TritonW4A16LinearKernel`` (4 bits, with or without zero points;
  out % 8; groups -1, 32, 64, 128, 256 dividing the input; no act-order) and ``HummingLinearKernel``
  (any type without act-order; ``humming-kernels`` is a vLLM 0.26 dependency).

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``: those are checked as one layer
(outputs summed), and their parts must share one scheme. Tensor parallelism splits a column-parallel
layer's outputs and a row-parallel one's (``o_proj``, ``down_proj``) inputs: ``tp`` checks that shard.
Measured on the H200 only once ``bench/serving_vllm.py`` has run (bench/results/serving/README.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

VLLM_VERSION = "0.26.0"
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
_ROW_PARALLEL = ("o_proj", "down_proj")
_MARLIN_GROUPS = (-1, 32, 64, 128)


@dataclass(frozen=True)
class LayerSpec:
    """A quantized linear as the export stores it."""
    name: str
    in_features: int
    out_features: int
    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    act_order: bool = False  # a non-trivial g_idx (desc_act)


@dataclass
class VLLMReport:
    fmt: str
    refusals: list[str] = field(default_factory=list)  # each: why vLLM will not load it, and what to do
    kernels: dict[str, str] = field(default_factory=dict)  # vLLM layer -> kernel (+ note)

    @property
    def loads(self) -> bool:
        return not self.refusals

    def as_dict(self) -> dict:
        used: dict[str, int] = {}
        for k in self.kernels.values():
            used[k.split(" ")[0]] = used.get(k.split(" ")[0], 0) + 1
        return {"vllm": VLLM_VERSION, "format": self.fmt, "loads": self.loads, "refusals": self.refusals,
                "kernels": used, "layers": self.kernels}


def fused_layers(layers: list[LayerSpec]) -> tuple[list[LayerSpec], list[str]]:
    """vLLM's view: q/k/v and gate/up merged (outputs summed); problems where parts disagree."""
    groups: dict[str, list[LayerSpec]] = {}
    for lay in layers:
        parent, _, leaf = lay.name.rpartition(".")
        key = f"{parent}.{_FUSED[leaf]}" if leaf in _FUSED else lay.name
        groups.setdefault(key, []).append(lay)
    out, problems = [], []
    for key, parts in groups.items():
        schemes = {(p.bits, p.group_size, p.sym, p.act_order, p.in_features) for p in parts}
        if len(schemes) > 1:
            problems.append(f"{key}: vLLM fuses {', '.join(p.name.rpartition('.')[2] for p in parts)} into one "
                            f"layer and needs one scheme for all of them; here they differ ({sorted(schemes)}): "
                            "quantize them alike")
            continue
        p = parts[0]
        out.append(LayerSpec(key, p.in_features, sum(q.out_features for q in parts), p.bits, p.group_size, p.sym,
                             p.act_order))
    return out, problems


def _shard(lay: LayerSpec, tp: int) -> tuple[int, int]:
    """(in, out) of one tensor-parallel shard."""
    if lay.name.rpartition(".")[2] in _ROW_PARALLEL:
        return lay.in_features // tp, lay.out_features
    return lay.in_features, lay.out_features // tp


def _whole_groups(lay: LayerSpec, k: int) -> bool:
    return lay.group_size == -1 or lay.group_size >= lay.in_features or k % lay.group_size == 0


def choose_kernel(lay: LayerSpec, *, zero_points: bool, tp: int = 1, act_dtype: str = "bfloat16") -> tuple[str | None, str]:
    """(kernel vLLM would pick on an H200, note) — None when no kernel accepts the layer."""
    k, n = _shard(lay, tp)
    b, g = lay.bits, lay.group_size
    gptq_type = not zero_points and b in (4, 8)
    split_act_order = lay.act_order and k != lay.in_features
    if ((gptq_type or (zero_points and b in (4, 8))) and g in (-1, 64, 128) and not split_act_order
            and k % 64 == 0 and n % 128 == 0):
        return "Machete", ""
    marlin_type = gptq_type or (zero_points and b == 4)
    if marlin_type and g in _MARLIN_GROUPS:
        if lay.act_order:
            if n % 64 == 0 and k % 128 == 0 and _whole_groups(lay, k):
                return "Marlin", ""
        elif _whole_groups(lay, k):
            aligned = (n % 64 == 0 and k % 128 == 0) or (n % 128 == 0 and k % 64 == 0)
            return "Marlin", "" if aligned else f"(zero-padded to its tile: in {k}, out {n}; slower)"
    if gptq_type and act_dtype == "float16" and not split_act_order and n % (32 // b) == 0 and g > 0 and k % g == 0:
        return "Exllama", ""
    if b == 4 and not lay.act_order and n % 8 == 0 and (g in (-1, 32, 64, 128, 256) or g == lay.in_features) \
            and _whole_groups(lay, k):
        return "TritonW4A16", ""
    if not lay.act_order:
        return "Humming", "(fallback kernel)"
    return None, "act-order with no kernel that takes this shape"


def _alternative_group(lay: LayerSpec) -> str:
    fits = [g for g in (128, 64, 32) if lay.in_features % g == 0]
    return f"group_size {fits[0]} ({lay.in_features} = {lay.in_features // fits[0]} x {fits[0]})" if fits \
        else "group_size -1"


def check_gptq(layers: list[LayerSpec], *, tp: int = 1, act_dtype: str = "bfloat16") -> VLLMReport:
    """A GPTQ v1 export as vLLM 0.26 loads it."""
    rep = VLLMReport("gptq")
    fused, rep.refusals = fused_layers(layers)
    for lay in fused:
        k, n = _shard(lay, tp)
        pack = 32 // lay.bits if lay.bits in (2, 4, 8) else None
        if (lay.bits, lay.sym) not in ((4, True), (8, True)):
            rep.refusals.append(
                f"{lay.name}: {lay.bits}-bit {'symmetric' if lay.sym else 'asymmetric'} GPTQ: vLLM {VLLM_VERSION}'s "
                "GPTQ loader (AutoGPTQConfig) takes 4- or 8-bit symmetric only ('Unsupported quantization config'); "
                "quantize with sym: true at 4 or 8 bits, or export format compressed-tensors (asymmetric 4/8-bit "
                "runs on Machete / Marlin / Triton)")
            continue
        if lay.group_size not in _MARLIN_GROUPS:
            rep.refusals.append(f"{lay.name}: group_size {lay.group_size}: vLLM's GPTQ loader checks the Marlin group "
                                f"sizes {list(_MARLIN_GROUPS)}")
            continue
        if not _whole_groups(lay, k):
            rep.refusals.append(
                f"{lay.name}: {k} inputs are not a whole number of groups of {lay.group_size}: vLLM's GPTQ loader sizes "
                f"scales/qzeros as {k} // {lay.group_size} = {k // lay.group_size} rows (the export has "
                f"{-(-k // lay.group_size)}), so loading fails; no kernel (Machete, Marlin, Exllama, Triton) takes a "
                f"partial group. Use {_alternative_group(lay)}, or pad the layer")
            continue
        if pack and (k % pack or n % pack):
            rep.refusals.append(f"{lay.name}: in {k} / out {n} not divisible by the pack factor {pack}")
            continue
        kernel, note = choose_kernel(lay, zero_points=False, tp=tp, act_dtype=act_dtype)
        if kernel is None:
            rep.refusals.append(f"{lay.name}: no vLLM kernel: {note}")
        else:
            rep.kernels[lay.name] = f"{kernel} {note}".strip()
    return rep


def check_compressed_tensors(layers: list[LayerSpec], *, tp: int = 1, act_dtype: str = "bfloat16") -> VLLMReport:
    """A compressed-tensors pack-quantized export as vLLM 0.26 loads it."""
    rep = VLLMReport("compressed-tensors")
    fused, rep.refusals = fused_layers(layers)
    for lay in fused:
        k, _ = _shard(lay, tp)
        if not 2 <= lay.bits <= 8 or (not lay.sym and lay.bits not in (4, 8)):
            rep.refusals.append(f"{lay.name}: {lay.bits}-bit {'symmetric' if lay.sym else 'asymmetric'}: vLLM's "
                                "CompressedTensorsWNA16 takes zero points at 4 and 8 bits only; quantize with "
                                "sym: true, or at 4 or 8 bits")
            continue
        if not _whole_groups(lay, k):
            rep.refusals.append(f"{lay.name}: {k} inputs are not a whole number of groups of {lay.group_size}; "
                                f"use {_alternative_group(lay)}")
            continue
        kernel, note = choose_kernel(lay, zero_points=not lay.sym, tp=tp, act_dtype=act_dtype)
        if kernel is None:
            rep.refusals.append(f"{lay.name}: no vLLM kernel: {note}")
        else:
            rep.kernels[lay.name] = f"{kernel} {note}".strip()
    return rep


CHECKS = {"gptq": check_gptq, "compressed-tensors": check_compressed_tensors}


def pruned_layers_refusal(config) -> str | None:
    """vLLM builds every decoder layer from one config: per-layer pruned sizes do not load."""
    if getattr(config, "pruned_layers", None):
        return ("config.json has pruned_layers (per-layer sizes differ): vLLM builds every layer from one config and "
                "cannot load it; prune with allocation: uniform (every layer alike, a standard config)")
    return None


def layer_specs(model, quant: dict) -> list[LayerSpec]:
    """The quantized linears of a run (``RunState.quant``) as LayerSpecs."""
    import torch  # here: the rules above need none

    modules = dict(model.named_modules())
    out = []
    for name, res in quant.items():
        lin = modules[name]
        gs = res.spec.group_size_for(lin.in_features)
        act_order = not torch.equal(res.g_idx.long().cpu(), torch.arange(lin.in_features) // gs)
        out.append(LayerSpec(name, lin.in_features, lin.out_features, res.spec.bits, res.spec.group_size,
                             res.spec.sym, act_order))
    return out


def check_export(fmt: str, model, quant: dict) -> dict | None:
    """report.json's ``serving.vllm`` for an export of format ``fmt``; None when there is nothing to say."""
    if fmt in CHECKS and quant:
        return CHECKS[fmt](layer_specs(model, quant)).as_dict()
    refusal = pruned_layers_refusal(getattr(model, "config", None))
    if refusal:
        return {"vllm": VLLM_VERSION, "format": fmt, "loads": False, "refusals": [refusal], "kernels": {}, "layers": {}}
    return None
