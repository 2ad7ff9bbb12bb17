"""Exports: written into a temporary folder beside the target, then renamed into place.

Every export carries ``recipe.yaml`` (the fully resolved recipe), ``report.json``
and ``compress_export.json`` (format, toolkit version). Weights are safetensors
only; nothing is pickled. The weights themselves are the format's writer's
(``compress.formats``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

from compress import __version__
from compress.errors import CompressError
from compress.formats import EXPORT_MARKER, get_format
from compress.formats.calibrator import write_calibrator
from compress.fs import make_readable, replace_dir, temp_dir_beside, write_json_atomic
from compress.state import RunState


def check_out_dir(out_dir: str | Path, *, force: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not force:
        raise CompressError(f"output folder {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CompressError(f"output path {out} exists and is not a folder")
    return out


def write_export(model, tokenizer, out_dir: str | Path, *, spec: Any, recipe_yaml: str,
                 report: dict | Callable[[], dict], state: RunState | None = None, force: bool = False) -> Path:
    """Write the export atomically: a crash leaves either the old folder or the new one, never half.

    ``report`` may be a function: it is called once the weights are written, just before
    ``report.json`` is, so the report can carry the time the export took (it is written once)."""
    out = check_out_dir(out_dir, force=force).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = get_format(spec.format)
    state = state or RunState()
    tmp = temp_dir_beside(out)
    try:
        fmt.write(model, tokenizer, tmp, state, spec)
        # Fine-tuning adapters (e.g. the s2ft step's): a subfolder each, so that the export's own
        # folder has no adapter_config.json for transformers/peft to mistake it for a PEFT adapter.
        for name, adapter in state.adapters.items():
            adapter.save(tmp / name)
        if state.calibrator is not None:
            write_calibrator(tmp, state.calibrator)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        write_json_atomic(tmp / "report.json", report() if callable(report) else report)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": fmt.name, "toolkit": "compress",
                                                     "version": __version__}, indent=2))
        make_readable(tmp)  # safetensors writes its files 0600; a server under another user must read them
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
