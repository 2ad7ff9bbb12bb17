"""Export formats: each one's writer and loader, registered together (``registry.py``).

    hf                  float safetensors (save_pretrained); also loads every plain HF folder
    gptq                GPTQ v1 packed ints (gptq.py), shared packing helpers in packed.py
    compressed-tensors  pack-quantized (compressed_tensors.py)

The table below names each writer and loader; their modules (torch, transformers) are imported
when one is first called, so reading the table — the recipe schema, ``compress validate`` — stays
cheap. Beside the formats: the pruned per-layer-sizes checkpoint (pruned.py) and the calibrator an
export ships (calibrator.py).
"""
from compress.deferred import Deferred
from compress.formats.registry import (DEFAULT_FORMAT, EXPORT_MARKER, FORMATS, ExportFormat, format_of, get_format,
                                       is_export, register_format)
from compress.state import Fact


def _code(module: str, name: str) -> Deferred:
    return Deferred(f"compress.formats.{module}", name)


register_format(ExportFormat("hf", _code("hf", "write_hf"), _code("hf", "load_hf"), doc="float safetensors"))
register_format(ExportFormat("gptq", _code("gptq", "write_gptq"), _code("gptq", "load_gptq"),
                             needs=frozenset({Fact.QUANTIZED}), doc="GPTQ v1 packed ints"))
register_format(ExportFormat("compressed-tensors", _code("compressed_tensors", "write_compressed_tensors"),
                             _code("compressed_tensors", "load_compressed_tensors"),
                             needs=frozenset({Fact.QUANTIZED}), doc="pack-quantized, one scheme per export"))

__all__ = ["DEFAULT_FORMAT", "EXPORT_MARKER", "FORMATS", "ExportFormat", "format_of", "get_format", "is_export",
           "register_format"]
