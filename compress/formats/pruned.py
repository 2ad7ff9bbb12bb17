"""The pruned checkpoint: a Hugging Face folder whose ``config.json`` lists per-layer sizes
(``pruned_layers``, written by :func:`compress.prune.shrink.record_dims`), which a plain
``AutoModelForCausalLM.from_pretrained`` cannot build. The ``hf`` format and the packed
formats build such a model here, then load the weights into it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from compress.errors import CompressError
from compress.prune.shrink import PRUNED_LAYERS_KEY, apply_pruned_layers


def build_pruned_model(config, dtype: torch.dtype) -> nn.Module:
    """The architecture of ``config`` (per-layer sizes included), randomly initialised."""
    from transformers import AutoModelForCausalLM  # transformers (slow to import) only when a model is built

    return apply_pruned_layers(AutoModelForCausalLM.from_config(config, dtype=dtype))


def load_pruned_checkpoint(path, *, dtype: torch.dtype, device) -> nn.Module:
    """A Hugging Face folder whose config has per-layer sizes: build them, then load the weights."""
    from transformers import AutoConfig  # transformers (slow to import) only when a model is loaded

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CompressError(f"{path}: a pruned checkpoint without *.safetensors weights")
    model = build_pruned_model(AutoConfig.from_pretrained(path), dtype)
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise CompressError(f"{path}: weights do not fit the pruned config: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    return model.to(device).eval()


def has_pruned_layers(path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and bool(json.loads(cfg.read_text()).get(PRUNED_LAYERS_KEY))
