"""``format: hf``: float safetensors as ``save_pretrained`` writes them, and the loader of every
plain Hugging Face folder (zoo models, exports without a marker, exports of format ``hf``).

A pruned model whose blocks differ in size carries them in ``config.json`` ``pruned_layers``;
its loader builds those sizes first (``compress.formats.pruned``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from compress.errors import CompressError
from compress.formats.pruned import has_pruned_layers, load_pruned_checkpoint
from compress.moe import fused_experts


def write_hf(model, tokenizer, folder: Path, state, spec: Any) -> None:
    dtype = getattr(torch, spec.dtype) if getattr(spec, "dtype", None) else None
    if dtype is not None and dtype != next(model.parameters()).dtype:
        model = model.to(dtype)
    with fused_experts(model):  # experts split into linears (compress.moe) are saved as transformers has them
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def load_hf(path: str, *, dtype: torch.dtype = torch.float32, device="cpu", trust_remote_code: bool = False,
            encoder: bool = False):
    """(model, tokenizer): a causal LM, or with ``encoder`` a bare encoder (AutoModel; the zoo's minilm-l6)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer  # slow import: only when loading

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if has_pruned_layers(path):  # per-layer sizes that a plain config cannot say
        return load_pruned_checkpoint(path, dtype=dtype, device=device), tokenizer
    auto = AutoModel if encoder else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise CompressError(f"could not load model from {path!r}: {exc}") from exc
    return model.to(device).eval(), tokenizer
