"""How big a model is: bytes of its weights on disk, bytes of a loaded model in memory, and the
parameters a folder's safetensors hold — read from their headers, so no weight is loaded and
torch is not imported (``compress run --dry-run`` estimates a run with these).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from compress.models.fetch import converted_dir, is_fetched
from compress.models.zoo import ZOO

# Bytes per element of the dtypes a recipe names (model.dtype) and of safetensors' dtype codes.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2,
               "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def local_model_dir(source: str) -> Path | None:
    """The folder ``source`` names on this machine (a fetched zoo model's converted folder, or a
    local folder), or None (a zoo model not fetched yet, a hub id)."""
    if source in ZOO:
        return converted_dir(ZOO[source]) if is_fetched(ZOO[source]) else None
    folder = Path(source).expanduser()
    return folder if folder.is_dir() else None


def weights_on_disk(folder: str | Path, *, recursive: bool = False) -> int:
    """Bytes of the ``*.safetensors`` files in ``folder`` (and, ``recursive``, its subfolders: an
    export's adapter and calibrator ship with it)."""
    folder = Path(folder)
    files = folder.rglob("*.safetensors") if recursive else folder.glob("*.safetensors")
    return sum(f.stat().st_size for f in files if f.is_file())


def safetensors_elements(folder: str | Path) -> int:
    """Elements of every tensor in ``folder``'s top-level safetensors files, from the headers alone
    (the format: an 8-byte little-endian header length, then a JSON header of shapes and dtypes)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def module_bytes(model) -> int:
    """Bytes of a loaded model's parameters and buffers (each counted once, as tied weights share)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def size_change(before: dict, after: dict) -> dict:
    """``{before, after, disk_ratio, memory_ratio}``: before / after of each, where both are known."""
    out = {"before": before, "after": after}
    for kind in ("disk", "memory"):
        b, a = before.get(f"{kind}_bytes"), after.get(f"{kind}_bytes")
        if b and a:
            out[f"{kind}_ratio"] = round(b / a, 3)
    return out


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover
