"""``format: compressed-tensors``: the ``pack-quantized`` checkpoint of the
compressed-tensors library (vLLM's and llm-compressor's): its writer and our loader.

Conventions, checked against compressed-tensors 0.20.0
(``compressors/pack_quantized/base.py`` ``PackedQuantizationCompressor.compress``/
``decompress``, ``compressors/pack_quantized/helpers.py`` ``pack_to_int32``/
``unpack_from_int32``, ``quantization/lifecycle/forward.py`` ``dequantize``,
``quantization/utils/helpers.py`` ``calculate_range``):

- levels are signed, ``q_s in [-2**(b-1), 2**(b-1) - 1]``, and zero points too;
  ``W = scale * (q_s - zp_s)``. Packing stores ``q_s + 2**(b-1)``, which is exactly
  our unsigned level ``q``; an asymmetric zero point ``zp_s = zero - 2**(b-1)`` is
  likewise stored as our ``zero``. Symmetric means ``zp_s = 0``, i.e. our
  ``zero = 2**(b-1)``, and no zero point is stored.
- ``{fqn}.weight_packed`` int32 [out, ceil(in*b/32)]: each row a little-endian
  bitstream, value k at bit k*b, padded to a run of 32 then cut to ceil(in*b/32)
  words (the same bitstream as GPTQ v1, but not transposed);
  ``{fqn}.weight_scale`` [out, G] in the model dtype; ``{fqn}.weight_zero_point``
  int32 [ceil(out*b/32), G] packed along the OUTPUT dim (asymmetric only);
  ``{fqn}.weight_shape`` int64 [2] = (out, in).
- groups must divide the input size (``_process_group`` raises otherwise), so a
  partial last group is refused; group_size -1 is the ``channel`` strategy.

One scheme for every quantized linear (``config_groups.group_0``, ``targets:
[Linear]``); the float linears are listed in ``ignore``. Mixed per-module bits are
refused: use ``format: gptq`` (gptqmodel ``dynamic``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress.errors import CompressError
from compress.formats.packed import export_dtype, float_tensors, load_packed_model, quantized_linears, write_model_files
from compress.quantize.gptq_v1 import pack_bits, unpack_bits
from compress.quantize.grid import QuantSpec
from compress.quantize.solvers import QuantResult

CT_VERSION = "0.20.0"  # the compressed-tensors release whose format this follows
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def pack_dense(values: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' dense packing of the last dim: ``[..., n]`` unsigned values ->
    ``[..., ceil(n * bits / 32)]`` int32 (pad to a run of 32, pack, cut)."""
    n = values.shape[-1]
    padded = torch.nn.functional.pad(values.to(torch.int64), (0, -n % 32))
    return pack_bits(padded, bits)[..., : -(-n * bits // 32)].contiguous()


def unpack_dense(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_dense`: ``[..., m]`` int32 -> ``[..., n]`` unsigned int32."""
    padded = torch.nn.functional.pad(words, (0, -words.shape[-1] % bits))
    return unpack_bits(padded, bits)[..., :n]


def _uniform_spec(quantized: dict[str, tuple[nn.Linear, QuantResult]]) -> QuantSpec:
    specs = {res.spec for _, res in quantized.values()}
    if len(specs) > 1:
        seen = ", ".join(f"{s.bits}-bit g{s.group_size}{' sym' if s.sym else ''}" for s in sorted(
            specs, key=lambda s: (s.bits, s.group_size, s.sym)))
        raise CompressError(f"export compressed-tensors: one scheme per export is supported, but the quantized "
                            f"linears use several ({seen}); export format gptq for mixed precision")
    return specs.pop()


def ct_quantization_config(spec: QuantSpec, ignore: list[str]) -> dict:
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym, "dynamic": False,
               "strategy": "channel" if spec.group_size == -1 else "group",
               "group_size": None if spec.group_size == -1 else spec.group_size,
               "actorder": None, "block_structure": None, "observer": "minmax"}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "version": CT_VERSION,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def pack_module(name: str, linear: nn.Linear, res: QuantResult, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    spec = res.spec
    out_f, in_f = linear.out_features, linear.in_features
    gs = spec.group_size_for(in_f)
    if in_f % gs:
        raise CompressError(
            f"export compressed-tensors: {name}: {in_f} inputs are not a multiple of group_size {gs} "
            "(a partial last group), which compressed-tensors refuses; use group_size 32 or -1, or format gptq")
    if not torch.equal(res.g_idx.long().cpu(), torch.arange(in_f) // gs):
        raise CompressError(f"export compressed-tensors: {name} has a permuted g_idx, which pack-quantized "
                            "without actorder 'group' cannot store")
    mid = 1 << (spec.bits - 1)
    if spec.sym and not bool((res.zeros == mid).all()):
        raise CompressError(f"export compressed-tensors: {name} is symmetric but its zero points are not {mid}")
    scales = res.scales.to(dtype)
    if not torch.isfinite(scales).all():
        raise CompressError(f"export compressed-tensors: {name}: scales overflow {dtype}")
    tensors = {
        "weight_packed": pack_dense(res.qweight.cpu(), spec.bits),
        "weight_scale": scales.cpu().contiguous(),
        "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64),
    }
    if not spec.sym:
        tensors["weight_zero_point"] = pack_dense(res.zeros.cpu().T, spec.bits).T.contiguous()
    out = {f"{name}.{k}": v for k, v in tensors.items()}
    if linear.bias is not None:
        out[f"{name}.bias"] = linear.bias.detach().cpu().to(dtype).contiguous()
    return out


def write_compressed_tensors(model, tokenizer, folder: Path, state, spec: Any) -> None:
    """compressed-tensors pack-quantized checkpoint (see the module docstring)."""
    dtype = export_dtype(spec, "compressed-tensors", ("float16", "bfloat16"))
    quantized = quantized_linears(model, state.quant, "compressed-tensors")
    qspec = _uniform_spec(quantized)
    tensors: dict[str, torch.Tensor] = {}
    for name, (linear, res) in quantized.items():
        tensors.update(pack_module(name, linear, res, dtype))
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    skip = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
    tensors.update(float_tensors(model, skip, dtype))
    write_model_files(model, tokenizer, folder, tensors, dtype, ct_quantization_config(qspec, ignore), "pt")


def _read_scheme(path: str | Path) -> dict:
    cfg = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    groups = cfg.get("config_groups") or {}
    if cfg.get("format") != "pack-quantized" or len(groups) != 1:
        raise CompressError(f"{path}: expected one pack-quantized config group, got format "
                            f"{cfg.get('format')!r} with {len(groups)} groups")
    weights = next(iter(groups.values()))["weights"]
    if weights.get("type") != "int" or weights.get("strategy") not in ("group", "channel"):
        raise CompressError(f"{path}: unsupported weight scheme {weights}")
    return weights


def load_compressed_tensors(path: str, *, dtype: torch.dtype = torch.float32, device="cpu",
                            trust_remote_code: bool = False):
    """Float model with each packed linear dequantized: ``W = scale * (q - zero)``."""
    weights = _read_scheme(path)
    bits, sym = int(weights["num_bits"]), bool(weights["symmetric"])

    def dequantize_one(name, linear, tensors):
        out_f, in_f = (int(x) for x in tensors.pop(f"{name}.weight_shape").tolist())
        if (out_f, in_f) != (linear.out_features, linear.in_features):
            raise CompressError(f"{path}: {name}.weight_shape is {(out_f, in_f)}, the model's layer "
                                f"{(linear.out_features, linear.in_features)}")
        levels = unpack_dense(tensors.pop(f"{name}.weight_packed"), bits, in_f)
        scales = tensors.pop(f"{name}.weight_scale").float()
        n_groups = scales.shape[1]
        if sym:
            zeros = torch.full_like(scales, 1 << (bits - 1), dtype=torch.int32)
        else:
            zeros = unpack_dense(tensors.pop(f"{name}.weight_zero_point").T, bits, out_f).T
        g = torch.arange(in_f) // (in_f // n_groups)
        return scales[:, g] * (levels - zeros[:, g]).float()

    return load_packed_model(path, "compressed-tensors", ".weight_packed", dequantize_one, dtype=dtype, device=device)
