"""Exports: written into a temporary folder beside the target, then renamed into place.

Every export carries ``recipe.yaml`` (the fully resolved recipe), ``report.json``
and ``compress_export.json`` (format, toolkit version). Weights are safetensors
only; nothing is pickled.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from compress.errors import CompressError

EXPORT_MARKER = "compress_export.json"
# format -> writer(model, tokenizer, folder, artifacts, spec); "hf" is built in.
_WRITERS: dict[str, Callable[..., None]] = {}


def register_writer(fmt: str):
    def deco(fn):
        _WRITERS[fmt] = fn
        return fn
    return deco


def temp_dir_beside(target: Path) -> Path:
    """An empty folder next to ``target`` (same filesystem, so a rename moves it into place),
    with the permissions a plain mkdir would give (mkdtemp makes 0700)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def check_out_dir(out_dir: str | Path, *, force: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not force:
        raise CompressError(f"output folder {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise CompressError(f"output path {out} exists and is not a folder")
    return out


@register_writer("hf")
def _write_hf(model, tokenizer, folder: Path, artifacts: dict, spec: Any) -> None:
    dtype = getattr(torch, spec.dtype) if getattr(spec, "dtype", None) else None
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def write_export(model, tokenizer, out_dir: str | Path, *, spec: Any, recipe_yaml: str, report: dict,
                 artifacts: dict | None = None, force: bool = False) -> Path:
    """Write the export atomically: a crash leaves either the old folder or the new one, never half."""
    from compress import __version__

    out = check_out_dir(out_dir, force=force).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt = spec.format
    if fmt not in _WRITERS:
        raise CompressError(f"unknown export format {fmt!r}; known: {', '.join(_WRITERS)}")
    tmp = temp_dir_beside(out)
    try:
        _WRITERS[fmt](model, tokenizer, tmp, artifacts or {}, spec)
        # Fine-tuning adapters (e.g. the s2ft step's): a subfolder each, so that the export's own
        # folder has no adapter_config.json for transformers/peft to mistake it for a PEFT adapter.
        for name, adapter in (artifacts or {}).get("adapters", {}).items():
            adapter.save(tmp / name)
        if (artifacts or {}).get("calibrator") is not None:
            _write_calibrator(tmp, artifacts["calibrator"])
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        write_json_atomic(tmp / "report.json", report)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": fmt, "toolkit": "compress",
                                                     "version": __version__}, indent=2))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_calibrator(folder: Path, calibrator) -> None:
    """The recalibrate step's calibrator in ``calibrator/``; a pure next-token temperature also becomes
    ``generation_config.json``'s ``temperature``, so sampling with the export's defaults draws from
    softmax(z / T) (greedy decoding is unchanged; transformers warns that temperature is unused
    while do_sample is false). A model written without a generation config gets none: one holding only
    a temperature would hide the defaults transformers derives from config.json (eos, bos)."""
    from compress.recalibrate import CALIBRATOR_DIR
    calibrator.save(folder / CALIBRATOR_DIR)
    gen_file = folder / "generation_config.json"
    if calibrator.target == "tokens" and calibrator.temperature is not None and gen_file.is_file():
        gen = {**json.loads(gen_file.read_text()), "temperature": calibrator.temperature}
        gen.pop("_from_model_config", None)  # no longer what transformers derived from config.json
        write_json_atomic(gen_file, gen)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialize {type(obj).__name__} to JSON")
