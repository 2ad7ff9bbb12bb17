"""Exports: written into a temporary folder beside the target, then renamed into place.

Every export carries ``recipe.yaml`` (the fully resolved recipe), ``report.json``
and ``compress_export.json`` (format, toolkit version). Weights are safetensors
only; nothing is pickled. The weights themselves are the format's writer's
(``compress.formats``).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from compress import __version__
from compress.errors import CompressError
from compress.formats import EXPORT_MARKER, get_format
from compress.formats.calibrator import write_calibrator
from compress.formats.vllm import check_export
from compress.fs import replace_dir, temp_dir_beside, write_json_atomic
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
    serving = serving_check(fmt.name, model, state, getattr(spec, "vllm", "warn"))
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
        full_report = report() if callable(report) else report
        if serving is not None:  # in place: the run's report (RunResult.report) is the file's
            full_report["serving"] = {"vllm": serving}
        write_json_atomic(tmp / "report.json", full_report)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": fmt.name, "toolkit": "compress",
                                                     "version": __version__}, indent=2))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def serving_check(fmt: str, model, state: RunState, mode: str) -> dict | None:
    """What vLLM would do with this export (``compress.formats.vllm``), before anything is written:
    ``mode`` warn logs each refusal, require raises a CompressError naming them, off skips the check."""
    if mode == "off":
        return None
    found = check_export(fmt, model, state.quant)
    if found is None or found["loads"]:
        return found
    head = (f"export {fmt}: vLLM {found['vllm']} would not load this checkpoint "
            f"({len(found['refusals'])} layer(s)): ")
    listed = "; ".join(found["refusals"][:3]) + (f"; and {len(found['refusals']) - 3} more"
                                                  if len(found["refusals"]) > 3 else "")
    if mode == "require":
        raise CompressError(head + listed + " (export.vllm: warn exports it anyway)")
    logging.getLogger(__name__).warning(head + listed + " (recorded in report.json serving.vllm; export.vllm: "
                                        "require refuses such an export)")
    return found
