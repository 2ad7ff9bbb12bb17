"""Loading a model from any *source*: a zoo id (fetched, verified and converted once), a local
directory (a Hugging Face model or an export of this toolkit, read by its format's loader,
``compress.formats``), or a hub id (``org/name``), for users with network access.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.formats import format_of
from compress.formats.calibrator import LMCalibrator, attached_calibrator
from compress.formats.hf import load_hf
from compress.models.fetch import fetch, is_fetched
from compress.models.zoo import ZOO, check_model_source
from compress.moe import split_experts


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    source: str  # what the user asked for
    path: str  # where it was loaded from
    # The confidence calibrator an export ships (its calibrator/ folder, from a recalibrate step),
    # applied by `compress eval`; None when there is none.
    calibrator: LMCalibrator | None = None

    def __post_init__(self):
        if self.calibrator is None and Path(self.path).is_dir():  # one place for every loading route
            self.calibrator = attached_calibrator(self.path)


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
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = resolve_model_dir(source, progress=progress)
    if source in ZOO and ZOO[source].kind == "encoder":
        model, tokenizer = load_hf(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                   encoder=True)
    else:
        load = format_of(path).load if Path(path).is_dir() else load_hf  # a hub id: transformers fetches it
        model, tokenizer = load(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        split_experts(model)  # a mixture of experts: per-expert linears (compress.moe); a no-op otherwise
    return LoadedModel(model.eval(), tokenizer, source, path)


def load_tokenizer(source: str, *, trust_remote_code: bool = False, progress: bool = True):
    """The tokenizer of any *source*, without loading the model (e.g. to check a text is long enough)."""
    from transformers import AutoTokenizer  # transformers: imported on first load (a slow import)

    return AutoTokenizer.from_pretrained(resolve_model_dir(source, progress=progress),
                                         trust_remote_code=trust_remote_code)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise CompressError(f"unknown dtype {name!r}; allowed: {', '.join(_DTYPES)}") from None


def zoo_rows() -> list[dict]:
    return [{"id": e.id, "kind": e.kind, "bytes": e.size, "fetched": is_fetched(e),
             "packages": len(e.packages), "description": e.description} for e in ZOO.values()]
