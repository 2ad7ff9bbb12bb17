"""A safetensors file written one tensor at a time, a slice at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once. The streamed export's first
shard holds the embedding and the output head (1 GB each in bf16 for an 8B Llama, 2 GB for a 70B),
read from the source checkpoint and converted to the export dtype: kept whole, they and their
converted copies were the peak of a streamed run's host memory. Here the header is written from the
shapes alone, then each tensor is read, converted and written a slice at a time and dropped before
the next one is read.

The bytes are ``save_file``'s for the same tensors and metadata (the same order: by safetensors'
dtype enumeration, last first, then by name; the same compact header padded with spaces to 8 bytes), which
``tests/test_stream.py`` checks, so any safetensors reader loads it.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable, Iterable

import torch

# In the order of safetensors' own dtype enumeration: save_file writes the later ones first.
_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64",
          torch.int64: "I64"}
_RANK = {dtype: i for i, dtype in enumerate(_NAMES)}
_SLICE = 1 << 24  # elements converted and written at once (32 MB in half precision)


def save_file_streamed(path: Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                       read: Callable[[str], torch.Tensor], *, metadata: dict[str, str] | None = None,
                       convert: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None,
                       after_each: Callable[[], None] = lambda: None) -> int:
    """Write ``path`` with one tensor per ``(name, dtype, shape)``: ``read(name)`` gives its values,
    ``convert(part, dtype)`` (default ``part.to(dtype)``) turns each slice into ``dtype``, and
    ``after_each()`` runs once a tensor is written (a checkpoint unmaps what the read touched).
    Returns the bytes of tensor data written."""
    convert = convert or (lambda part, dtype: part.to(dtype))
    entries = list(entries)
    for name, dtype, _ in entries:
        if dtype not in _NAMES:
            raise ValueError(f"{name}: dtype {dtype} is not written here; allowed: {', '.join(map(str, _NAMES))}")
    entries.sort(key=lambda e: (-_RANK[e[1]], e[0]))
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dtype, shape in entries:
            t = read(name)
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: read a tensor of shape {tuple(t.shape)}, the header says {tuple(shape)}")
            flat = t.reshape(-1)
            for start in range(0, flat.numel(), _SLICE):
                part = convert(flat[start:start + _SLICE], dtype).contiguous()
                if part.dtype != dtype:
                    raise ValueError(f"{name}: converted to {part.dtype}, the header says {dtype}")
                f.write(part.view(torch.uint8).numpy().data)  # little-endian, as safetensors is
            del t, flat
            after_each()
    return offset
