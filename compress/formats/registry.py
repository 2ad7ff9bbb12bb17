"""The export-format registry: one entry per format, holding its writer *and* its loader.

``write(model, tokenizer, folder, state, spec)`` fills ``folder`` with the weights (``state``: the
run's ``compress.state.RunState``, e.g. its quantized levels);
``load(path, *, dtype, device, trust_remote_code=False) -> (model, tokenizer)`` reads them back.
A format is registered once; registering a name twice is an error (a second writer or loader
must not silently replace the first).

Every export names its format in ``compress_export.json``; a folder without that marker (a zoo
model, any Hugging Face folder) loads as ``hf``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compress.errors import CompressError
from compress.state import Fact

EXPORT_MARKER = "compress_export.json"
DEFAULT_FORMAT = "hf"


@dataclass(frozen=True)
class ExportFormat:
    name: str
    write: Callable[..., None]
    load: Callable[..., tuple]
    # What the run must leave for the writer: a packed format needs quantized weights.
    needs: frozenset[Fact] = frozenset()
    doc: str = ""


FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    if fmt.name in FORMATS:
        raise ValueError(f"export format {fmt.name!r} registered twice")
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise CompressError(f"unknown export format {name!r}; known: {', '.join(FORMATS)}") from None


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` was written by this toolkit's export (it carries the marker)."""
    return (Path(folder) / EXPORT_MARKER).is_file()


def format_of(folder: str | Path) -> ExportFormat:
    """The format a folder is stored in: the one its marker names, else ``hf``."""
    marker = Path(folder) / EXPORT_MARKER
    name = json.loads(marker.read_text()).get("format", DEFAULT_FORMAT) if marker.is_file() else DEFAULT_FORMAT
    return get_format(name)
