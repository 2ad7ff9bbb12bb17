"""Model zoo and loading: zoo ids, local Hugging Face directories, toolkit exports, hub ids.

``load_model(source)`` is the one entry point. A *source* is
  - a zoo id (``smollm2-135m``; see ``ZOO``): fetched, verified and converted once;
  - a local directory: a Hugging Face model or an export of this toolkit (whose
    ``compress_export.json`` names a format with its own loader);
  - a hub id (``org/name``), for users with network access.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from compress.errors import CompressError
from compress.models.fetch import fetch, is_fetched
from compress.models.zoo import DEFAULT_MODEL, ZOO, ZooEntry

__all__ = ["ZOO", "DEFAULT_MODEL", "ZooEntry", "LoadedModel", "load_model", "resolve_model_dir",
           "fetch_model", "register_loader", "check_model_source"]

from compress.export import EXPORT_MARKER  # noqa: E402
# Export formats that need more than AutoModelForCausalLM (packed int weights,
# per-layer pruned shapes) register a loader here: format -> fn(dir, dtype, device).
_LOADERS: dict[str, Callable[..., Any]] = {}


def register_loader(fmt: str):
    def deco(fn):
        _LOADERS[fmt] = fn
        return fn
    return deco


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    source: str  # what the user asked for
    path: str  # where it was loaded from
    # The confidence calibrator an export ships (its calibrator/ folder, from a recalibrate step):
    # a compress.recalibrate.LMCalibrator, applied by `compress eval`; None when there is none.
    calibrator: Any = None

    def __post_init__(self):
        if self.calibrator is None and Path(self.path).is_dir():  # one place for every loading route
            from compress.recalibrate import attached_calibrator
            self.calibrator = attached_calibrator(self.path)


def check_model_source(source: str) -> None:
    """Raise a CompressError unless ``source`` is a zoo id, an existing directory or a hub id."""
    if source in ZOO or Path(source).expanduser().is_dir():
        return
    if "/" in source and not source.startswith((".", "/", "~")) and source.count("/") == 1:
        return  # looks like a hub id; only resolvable with network access
    raise CompressError(
        f"unknown model {source!r}: not a zoo id and not a directory. "
        f"Known zoo ids: {', '.join(ZOO)}; or give a local Hugging Face directory.")


def fetch_model(model_id: str, *, progress: bool = True) -> Path:
    if model_id not in ZOO:
        raise CompressError(f"unknown zoo id {model_id!r}; known ids: {', '.join(ZOO)}")
    return fetch(ZOO[model_id], progress=progress)


def resolve_model_dir(source: str, *, progress: bool = True) -> str:
    check_model_source(source)
    if source in ZOO:
        return str(fetch_model(source, progress=progress))
    path = Path(source).expanduser()
    return str(path) if path.is_dir() else source


def load_model(source: str, *, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
               trust_remote_code: bool = False, progress: bool = True) -> LoadedModel:
    """Load a causal LM (or the ``minilm-l6`` encoder) and its tokenizer from any *source*."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = _parse_dtype(dtype)
    path = resolve_model_dir(source, progress=progress)
    marker = Path(path) / EXPORT_MARKER
    if marker.is_file():
        import json

        import compress.quantize  # noqa: F401  (registers the loaders of quantized formats)
        fmt = json.loads(marker.read_text()).get("format", "hf")
        if fmt in _LOADERS:
            model, tokenizer = _LOADERS[fmt](path, dtype=dtype, device=device)
            return LoadedModel(model.eval(), tokenizer, source, path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    from compress.prune.shrink import has_pruned_layers, load_pruned_checkpoint
    if has_pruned_layers(path):  # per-layer sizes that a plain config cannot say
        return LoadedModel(load_pruned_checkpoint(path, dtype=dtype, device=device), tokenizer, source, path)
    auto = AutoModel if source in ZOO and ZOO[source].kind == "encoder" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise CompressError(f"could not load model from {path!r}: {exc}") from exc
    return LoadedModel(model.to(device).eval(), tokenizer, source, path)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CompressError(f"unknown dtype {name!r}; allowed: {', '.join(_DTYPES)}") from None


def zoo_rows() -> list[dict]:
    return [{"id": e.id, "kind": e.kind, "bytes": e.size, "fetched": is_fetched(e),
             "packages": len(e.packages), "description": e.description} for e in ZOO.values()]
