"""Int4 weight-only linears on torch's own kernels, so a 4-bit drafter really reads 4-bit weights.

Our GPTQ loader dequantizes packed linears to float (exact, but as many bytes per weight as
the float dtype). Here the integer levels, scales and zero points of a GPTQ export (or of the
in-memory quantize artifacts) become :class:`Int4Linear` modules that multiply with
``torch.ops.aten._weight_int4pack_mm`` on CUDA (the tinygemm kernel; activations bfloat16)
and ``_weight_int4pack_mm_for_cpu`` on the CPU (float32, float16 or bfloat16).

Kernel convention (aten int4mm, CUDA and CPU alike): a weight of output n, input k in group g
is ``(q − 8) · scale[g, n] + zero[g, n]`` with ``q`` in [0, 15] and ``scales_and_zeros`` of
shape [K / group, N, 2] (``[..., 0]`` scale, ``[..., 1]`` zero, both floats). GPTQ's is
``(q − z) · s`` with an integer z; the two agree for ``scale = s`` and ``zero = (8 − z) · s``.
In float32 that is exact (fp16 scales times a small integer); on CUDA scales and zeros are
bfloat16 (8 significant bits), an error of at most ~s/64 per weight (~1.5% of a step).

Shapes: the kernels need N % 16 == 0 (CPU; CUDA 8) and K a multiple of the kernel group size
(32, 64, 128 or 256) and of 32 (CUDA k-tiles). Other shapes are zero-padded here: extra input
columns meet zero activations, extra output rows are sliced off, so any layer converts (a
pruned model's MLP, a partial last group). A group size the kernel lacks (-1: one group per
row) is split into kernel groups that repeat the same (scale, zero), which is exact. A
permuted ``g_idx`` (act-order without static groups) puts one group's columns in many places;
that is refused, not emulated.

The packed layout differs between CPU and CUDA: convert on the device the model will run on.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from compress.errors import CompressError

log = logging.getLogger(__name__)

KERNEL_GROUP_SIZES = (32, 64, 128, 256)
_N_ALIGN = 16  # CPU packing needs N % 16 (CUDA 8): pad to 16 so one rule holds on both


def _kernel(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda"
    if device.type == "cpu":
        return "cpu"
    raise CompressError(f"int4 linears run on cuda or cpu, not on {device.type}")


def kernel_groups(g_idx: torch.Tensor, group_size: int, in_features: int) -> tuple[int, torch.Tensor]:
    """(kernel group size kgs, [ceil(K / kgs)] GPTQ group of each run of kgs input columns).

    Every run of ``kgs`` consecutive columns must share one GPTQ group (the kernel has one
    scale per run); that holds for ``g_idx = j // group_size`` with any group size the kernel
    has, or a multiple of 128 / the whole row. Raises CompressError for a permuted g_idx.
    """
    if group_size in KERNEL_GROUP_SIZES:
        kgs = group_size
    elif group_size in (-1, in_features) or group_size % 128 == 0:
        kgs = 128
    else:
        raise CompressError(f"group size {group_size} is not one the int4 kernel can express "
                            f"(allowed: {', '.join(map(str, KERNEL_GROUP_SIZES))}, -1, or a multiple of 128)")
    g = g_idx.long().cpu()
    runs = math.ceil(in_features / kgs)
    padded = torch.cat([g, g[-1:].expand(runs * kgs - in_features)]).view(runs, kgs)
    if not bool((padded == padded[:, :1]).all()):
        raise CompressError("g_idx is permuted (act-order without static groups): one quantization group's "
                            "columns are scattered, which the int4 kernel's contiguous groups cannot express; "
                            "quantize with act_order: false (or our static-group act-order) for an int4 drafter")
    return kgs, padded[:, 0].contiguous()


def _pack_for(kernel: str, levels: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """levels [N, K] ints in [0, 15] -> the kernel's packed weight (on levels' device)."""
    if kernel == "cuda":
        # CUDA takes uint8 [N, K/2]: the even column in the high nibble, the odd one in the low.
        lv = levels.to(torch.uint8)
        return torch.ops.aten._convert_weight_to_int4pack((lv[:, ::2] << 4 | lv[:, 1::2]).contiguous(),
                                                          inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(levels.to(torch.int32).contiguous(), inner_k_tiles)


class Int4Linear(nn.Module):
    """``y = x Wᵀ + b`` with W stored as packed 4-bit levels plus per-group (scale, zero)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, packed: torch.Tensor,
                 scales_and_zeros: torch.Tensor, bias: torch.Tensor | None, kernel: str):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel = kernel
        self.k_padded = scales_and_zeros.shape[0] * group_size
        self.n_padded = scales_and_zeros.shape[1]
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_levels(cls, levels: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None, *, device, dtype: torch.dtype
                    ) -> "Int4Linear":
        """From GPTQ tensors: levels [N, K] in [0, 15], scales [N, G], integer zeros [N, G], g_idx [K]."""
        device = torch.device(device)
        kernel = _kernel(device)
        n, k = levels.shape
        if int(levels.min()) < 0 or int(levels.max()) > 15:
            raise CompressError("int4 levels must lie in [0, 15]; is this a 4-bit quantization?")
        kgs, groups = kernel_groups(g_idx, group_size, k)
        k_pad, n_pad = groups.numel() * kgs, math.ceil(n / _N_ALIGN) * _N_ALIGN
        lv = torch.full((n_pad, k_pad), 8, dtype=torch.int32, device=device)
        lv[:n, :k] = levels.to(device=device, dtype=torch.int32)
        s = scales.to(device=device, dtype=torch.float32)[:, groups.to(device)]  # [N, runs]
        z = zeros.to(device=device, dtype=torch.float32)[:, groups.to(device)]
        sz = torch.zeros(n_pad, groups.numel(), 2, dtype=torch.float32, device=device)
        sz[:n, :, 0] = s
        sz[:n, :, 1] = (8 - z) * s  # (q − z)·s = (q − 8)·s + (8 − z)·s
        # CUDA's tinygemm only takes bfloat16 activations and scales; the CPU kernel any float dtype.
        sz_dtype = torch.bfloat16 if kernel == "cuda" else dtype
        inner = next(t for t in (8, 4, 2) if k_pad % (t * 16) == 0)
        packed = _pack_for(kernel, lv, inner)
        b = None if bias is None else bias.detach().to(device=device, dtype=dtype).clone()
        return cls(k, n, kgs, packed, sz.transpose(0, 1).contiguous().to(sz_dtype), b, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed.device.type != self.kernel:
            raise CompressError(f"this Int4Linear was packed for {self.kernel} but now lives on "
                                f"{self.packed.device.type}; the layouts differ: convert on the device it runs on")
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.k_padded > self.in_features:
            x2 = F.pad(x2, (0, self.k_padded - self.in_features))
        if self.kernel == "cuda":
            sz = self.scales_and_zeros
            y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), self.packed,
                                                   self.group_size, sz.to(torch.bfloat16))
        else:
            dt = x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(dt).contiguous(), self.packed, self.group_size,
                                                           self.scales_and_zeros.to(dt))
        if self.n_padded > self.out_features:
            y = y[:, : self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"group_size={self.group_size}, kernel={self.kernel}, bias={self.bias is not None}")


# ----------------------------------------------------------------- whole models


def _gptq_export_levels(path: Path) -> dict[str, dict]:
    """{linear name: {levels, scales, zeros, g_idx, bits}} from a GPTQ v1 export folder."""

    from compress.quantize.gptq_v1 import unpack_gptq_v1  # only for loading an export's packed weights

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CompressError(f"{path}: no *.safetensors file; give a GPTQ export folder")
    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys = set(st.keys())
            for key in sorted(k for k in keys if k.endswith(".qweight")):
                name = key[: -len(".qweight")]
                t = {s: st.get_tensor(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
                in_f = t["g_idx"].numel()
                out_f = t["scales"].shape[1]
                bits = t["qweight"].shape[0] * 32 // in_f
                try:
                    levels, scales, zeros, g_idx = unpack_gptq_v1(t, bits, in_f, out_f)
                except ValueError as exc:
                    raise CompressError(f"{path}: {name}: {exc}") from None
                out[name] = {"levels": levels, "scales": scales, "zeros": zeros, "g_idx": g_idx, "bits": bits}
    if not out:
        raise CompressError(f"{path}: no packed linear (*.qweight) found; is this a format gptq export?")
    return out


def _group_size_of(g_idx: torch.Tensor, n_groups: int, in_features: int) -> int:
    """The group size of a contiguous grouping (j // gs); for others, what the first group spans."""
    if n_groups == 1:
        return -1
    return int((g_idx.long() == 0).sum())


def int4_linears_from_gptq(model: nn.Module, source, *, device=None) -> dict:
    """Replace the 4-bit quantized linears of ``model`` by :class:`Int4Linear`, in place.

    ``source``: a ``format: gptq`` export folder (the levels are re-read from its packed
    tensors, so they are exactly what was exported: fp16 scales, v1 zero points), or quantize
    artifacts (``{"quant": {name: QuantResult}}`` or the inner dict). Linears at other bit
    widths stay float (listed in the result). Returns ``{"converted": [...], "kept_float": {...}}``.
    """
    if isinstance(source, (str, Path)):
        entries = _gptq_export_levels(Path(source).expanduser())
    else:
        quant = source.get("quant", source) if isinstance(source, dict) else None
        if not quant:
            raise CompressError("int4_linears_from_gptq needs a GPTQ export folder or quantize artifacts "
                                "(artifacts['quant']); got none")
        entries = {name: {"levels": r.qweight, "scales": r.scales, "zeros": r.zeros, "g_idx": r.g_idx,
                          "bits": r.spec.bits} for name, r in quant.items()}
    modules = dict(model.named_modules())
    converted, kept = [], {}
    for name, e in entries.items():
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            what = "missing from the model" if linear is None else f"a {type(linear).__name__}"
            raise CompressError(f"quantized linear {name} is {what}; is this the model the export was made from?")
        if tuple(e["levels"].shape) != (linear.out_features, linear.in_features):
            raise CompressError(f"{name}: quantized levels {tuple(e['levels'].shape)} do not fit the linear's "
                                f"weight {(linear.out_features, linear.in_features)}")
        if e["bits"] != 4:
            kept[name] = f"{e['bits']}-bit (the int4 kernel takes 4-bit levels only)"
            continue
        gs = _group_size_of(e["g_idx"], e["scales"].shape[1], linear.in_features)
        try:
            new = Int4Linear.from_levels(e["levels"], e["scales"], e["zeros"], e["g_idx"], gs, linear.bias,
                                         device=device or linear.weight.device, dtype=linear.weight.dtype)
        except CompressError as exc:
            raise CompressError(f"{name}: {exc}") from None
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, new)
        converted.append(name)
    if kept:
        log.info("int4: %d linears kept in float: %s", len(kept),
                 ", ".join(f"{k} ({v})" for k, v in list(kept.items())[:4]) + (" ..." if len(kept) > 4 else ""))
    log.info("int4: %d linears now run on the %s int4 kernel", len(converted),
             "CUDA" if converted and next(model.parameters()).device.type == "cuda" else "CPU")
    return {"converted": converted, "kept_float": kept}


@torch.no_grad()
def quantize_int4_(model: nn.Module, group_size: int = 128, *, ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """Round-to-nearest asymmetric 4-bit of every Linear (except ``ignore``), straight into
    :class:`Int4Linear` modules: for timing models that have no GPTQ export."""
    from compress.quantize.grid import QuantSpec  # only for quantize_int4_ (tests, demos)
    from compress.quantize.solvers import rtn_solve

    spec = QuantSpec(bits=4, group_size=group_size, sym=False)
    quant = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] not in ignore and name not in ignore:
            quant[name] = rtn_solve(m.weight.detach().float(), spec)
    return int4_linears_from_gptq(model, quant)
