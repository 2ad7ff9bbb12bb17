"""The GPTQ "v1" checkpoint layout (auto-gptq's), as read by transformers via
optimum + gptqmodel, and by vLLM.

Per linear layer with ``in`` inputs, ``out`` outputs and ``G = ceil(in / group_size)``
groups, four tensors:

- ``qweight`` int32 [in * bits / 32, out]: levels packed along the INPUT dim.
- ``qzeros``  int32 [G, out * bits / 32]: ``(zero - 1)`` packed along the OUTPUT dim.
- ``scales``  float16 [G, out].
- ``g_idx``   int32 [in]: group of each input column.

Packing: every 32 consecutive values form a little-endian bitstream of
``32 * bits`` bits spread over ``bits`` int32 words; value ``k`` of the run sits at
bit ``k * bits`` of that stream. For 2, 4 and 8 bits no value straddles a word (value
``k`` of a word sits at bits ``k * bits``); for 3 bits, 32 values fill 3 words and
values 10 and 21 straddle word boundaries (value 10: bits 30-31 of word 0 + bit 0 of
word 1; value 21: bit 31 of word 1 + bits 0-1 of word 2) — auto-gptq's 3-bit scheme.
Words are stored as signed int32 (the same 32 bits).

Shapes: a packed dimension must fill whole int32 words. For 2, 4 and 8 bits that is
``n % (32 // bits) == 0`` (gptqmodel allocates ``ceil(n * bits / 32)`` words and vLLM
checks ``n % pack_factor``); for 3 bits the 32-value runs need ``n % 32 == 0``.
So the GQA key/value projection of 80 outputs packs at 2/4/8 bits but not at 3 bits.
(auto-gptq itself sized buffers as ``n // 32 * bits``, i.e. required multiples of 32;
it is unmaintained and its successor gptqmodel does not.) :func:`check_v1_shape`
checks this.

Zero points: v1 stores ``zero - 1`` (a historical off-by-one) and readers add 1 back.
``zero = 0`` wraps to ``-1 & maxq = maxq`` in its own field, which per-field readers
(vLLM, exllama) decode as ``maxq + 1 = 2**bits``, not 0, and gptqmodel's v1->v2
conversion (one integer add of 0x11111111 over the packed word) turns into 0 but with a
carry into the next field: such a zero is not representable in v1 and
:func:`pack_gptq_v1` warns when it meets one (symmetric grids never have it; the
asymmetric grid of :func:`compress.quantize.grid.fit_grid` only for groups with
``min >= -scale/2``, i.e. almost entirely non-negative groups).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .grid import ALLOWED_BITS
from .solvers import QuantResult, row_chunks

__all__ = [
    "check_v1_shape",
    "dequantize_gptq_v1",
    "pack_bits",
    "pack_gptq_v1",
    "unpack_bits",
    "unpack_gptq_v1",
    "words_align",
]

_MASK32 = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if bits not in ALLOWED_BITS:
        raise ValueError(f"bits={bits!r} is not supported by the GPTQ v1 layout; allowed: {list(ALLOWED_BITS)}")


def words_align(bits: int) -> int:
    """How many values a packed dimension must be a multiple of: whole int32 words for
    2/4/8 bits, whole 32-value runs (3 words) for 3 bits."""
    _check_bits(bits)
    return 32 if 32 % bits else 32 // bits


def check_v1_shape(bits: int, in_features: int, out_features: int) -> None:
    """Raise ValueError unless an [out, in] layer is representable in GPTQ v1."""
    align = words_align(bits)
    bad = []
    if in_features % align:
        bad.append(f"in_features={in_features} (qweight packs the input dim)")
    if out_features % align:
        bad.append(f"out_features={out_features} (qzeros packs the output dim)")
    if bad:
        raise ValueError(
            f"a {out_features}x{in_features} (out x in) layer cannot be stored in the GPTQ v1 layout "
            f"at {bits} bits: {' and '.join(bad)} must be a multiple of {align}, "
            + ("as 3-bit values are packed in runs of 32 over 3 int32 words"
               if bits == 3 else f"so that {bits}-bit values fill whole int32 words")
        )


def _to_int32_words(words: Tensor) -> Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    words = words & _MASK32
    return torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack the last dim of ``values`` (ints in [0, 2**bits)) into int32 words.

    ``[..., n]`` -> ``[..., n * bits // 32]``; ``n`` must be a multiple of
    :func:`words_align` (whole words). Each run of 32 values is a little-endian
    bitstream over ``bits`` words (value k at stream bit ``k * bits``), which is
    auto-gptq's layout for 2, 3, 4 and 8 bits; for 2/4/8 bits a short last run just
    has fewer words.
    """
    align = words_align(bits)
    n = values.shape[-1]
    if n % align:
        raise ValueError(f"pack_bits: the packed dimension ({n}) must be a multiple of {align} at {bits} bits")
    maxq = (1 << bits) - 1
    v = values.to(torch.int64)
    if bool(((v < 0) | (v > maxq)).any()):
        raise ValueError(f"pack_bits: values outside [0, {maxq}] cannot be packed in {bits} bits")
    pad = -n % 32  # zero values fill the last run; its unused words are dropped below
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    v = v.reshape(*values.shape[:-1], (n + pad) // 32, 32)
    words = torch.zeros(*v.shape[:-1], bits, dtype=torch.int64, device=values.device)
    for k in range(32):
        word, off = divmod(k * bits, 32)
        words[..., word] |= (v[..., k] << off) & _MASK32
        if off + bits > 32:  # straddles into the next word (3 bits only)
            words[..., word + 1] |= v[..., k] >> (32 - off)
    words = words.reshape(*values.shape[:-1], (n + pad) // 32 * bits)[..., : n * bits // 32]
    return _to_int32_words(words)


def unpack_bits(words: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``[..., m]`` int32 -> ``[..., m * 32 // bits]`` int32."""
    _check_bits(bits)
    m = words.shape[-1]
    if bits == 3 and m % 3:
        raise ValueError(f"unpack_bits: the packed dimension ({m}) must be a multiple of 3 at 3 bits")
    maxq = (1 << bits) - 1
    w = words.to(torch.int64) & _MASK32
    pad = -m % bits
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    w = w.reshape(*words.shape[:-1], (m + pad) // bits, bits)
    vals = torch.empty(*w.shape[:-1], 32, dtype=torch.int64, device=words.device)
    for k in range(32):
        word, off = divmod(k * bits, 32)
        v = w[..., word] >> off
        if off + bits > 32:
            v = v | (w[..., word + 1] << (32 - off))
        vals[..., k] = v & maxq
    vals = vals.reshape(*words.shape[:-1], (m + pad) // bits * 32)[..., : m * 32 // bits]
    return vals.to(torch.int32)


def pack_gptq_v1(res: QuantResult) -> dict[str, Tensor]:
    """Pack a :class:`QuantResult` into the GPTQ v1 tensors (on res's device).

    Returns ``{"qweight", "qzeros", "scales", "g_idx"}`` as described in the module
    docstring. Raises ValueError when the layer shape is not representable; warns
    when a zero point is 0 (stored wrapped as ``maxq``, decoded by v1 readers as
    ``2**bits``).
    """
    bits = res.spec.bits
    maxq = (1 << bits) - 1
    out_f, in_f = res.qweight.shape
    check_v1_shape(bits, in_f, out_f)
    n_groups = res.scales.shape[1]
    if res.scales.shape != (out_f, n_groups) or res.zeros.shape != (out_f, n_groups):
        raise ValueError(
            f"scales {tuple(res.scales.shape)} / zeros {tuple(res.zeros.shape)} do not match "
            f"qweight {tuple(res.qweight.shape)}"
        )
    if res.g_idx.shape != (in_f,):
        raise ValueError(f"g_idx has shape {tuple(res.g_idx.shape)}, expected ({in_f},)")
    if bool(((res.g_idx < 0) | (res.g_idx >= n_groups)).any()):
        raise ValueError(f"g_idx has values outside [0, {n_groups}) for {n_groups} groups")

    zeros = res.zeros.to(torch.int64)
    n_zero = int((zeros == 0).sum().item())
    if n_zero:
        warnings.warn(
            f"GPTQ v1: {n_zero} of {zeros.numel()} zero points of a {out_f}x{in_f} layer are 0; "
            f"v1 stores zero-1, so they wrap to {maxq} and v1 readers decode them as {maxq + 1}: "
            "those groups dequantize wrongly. Use sym=True (or a v2 layout) for exact v1 checkpoints.",
            RuntimeWarning,
            stacklevel=2,
        )

    scales16 = res.scales.to(torch.float16)
    if not torch.isfinite(scales16).all():
        raise ValueError(f"scales of a {out_f}x{in_f} layer overflow float16 (max {res.scales.max().item():.3e})")

    # [out, in*bits/32], packed along the input dim, a slice of rows at a time (pack_bits widens to int64)
    qweight = torch.cat([pack_bits(res.qweight[rows], bits) for rows in row_chunks((out_f, in_f))])
    qzeros = pack_bits(((zeros - 1) & maxq).T.contiguous(), bits)  # [G, out*bits/32]
    return {
        "qweight": qweight.T.contiguous(),
        "qzeros": qzeros.contiguous(),
        "scales": scales16.T.contiguous(),
        "g_idx": res.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq_v1(
    tensors: dict[str, Tensor], bits: int, in_features: int, out_features: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unpack v1 tensors into ``(levels [out, in] int32, scales [out, G] float16,
    zeros [out, G] int32, g_idx [in] int32)``; ``zeros = stored + 1`` (v1), so a
    stored ``maxq`` comes back as ``2**bits`` exactly as v1 readers see it."""
    check_v1_shape(bits, in_features, out_features)
    qweight, qzeros, scales, g_idx = (tensors[k] for k in ("qweight", "qzeros", "scales", "g_idx"))
    if qweight.shape != (in_features * bits // 32, out_features):
        raise ValueError(
            f"qweight has shape {tuple(qweight.shape)}, expected {(in_features * bits // 32, out_features)}"
        )
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, out_features) or qzeros.shape != (n_groups, out_features * bits // 32):
        raise ValueError(
            f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not fit out_features={out_features} "
            f"at {bits} bits"
        )
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
    levels = unpack_bits(qweight.T.contiguous(), bits)  # [out, in]
    zeros = unpack_bits(qzeros, bits) + 1  # [G, out]
    return levels, scales.T.contiguous(), zeros.T.contiguous(), g_idx.to(torch.int32)


def dequantize_gptq_v1(
    tensors: dict[str, Tensor], bits: int, in_features: int, out_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``W[o, i] = scales[o, g] * (level[o, i] - zero[o, g])`` with ``g = g_idx[i]``,
    computed in float32 (fp16 scales are exact in float32) and returned as ``dtype``."""
    levels, scales, zeros, g_idx = unpack_gptq_v1(tensors, bits, in_features, out_features)
    g = g_idx.long()
    return (scales.float()[:, g] * (levels - zeros[:, g]).float()).to(dtype)
