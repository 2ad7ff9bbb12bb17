"""A model's structure without its weights: its ``model_type`` and the name and class of every linear
layer, which is what a recipe's ``targets`` are matched against.

From a live model (``structure_of``), or from a model's ``config.json`` built on the meta device
(``model_structure``): no weight is read or allocated. For the dense decoder families whose module
tree is fixed by a few config numbers (llama, mistral, qwen2/3, gemma2/3, phi3) the linears are
written from ``config.json`` alone (``static_structure``; tests/test_validate.py checks each against
the model transformers builds). Any other model is built on the meta device: that imports torch
and the architecture's transformers code (about 8 s on 2 cores: it made the first validation of a
model slower than the warm ones), so its result is cached by the config's content and the
transformers version (``COMPRESS_CACHE/structure``); a later check of it reads one small JSON file.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from compress.cache import cache_dir
from compress.fs import write_text_atomic
from compress.models.fetch import converted_dir, is_fetched
from compress.models.zoo import ZOO


@dataclass(frozen=True)
class Structure:
    model_type: str
    linears: tuple[tuple[str, str], ...]  # (fqn, class name) of every nn.Linear, in model order


def structure_of(model) -> Structure:
    import torch.nn as nn  # the caller holds a model, so torch is loaded already

    linears = tuple((n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, nn.Linear))
    return Structure(getattr(model.config, "model_type", None) or type(model).__name__, linears)


def model_structure(source: str, *, trust_remote_code: bool = False) -> tuple[Structure | None, str]:
    """(the structure of the model ``source`` names, a note); the structure is None, and the note
    says why, when its config is not on this machine (a zoo model not fetched yet, a hub id)."""
    if source in ZOO:
        if not is_fetched(ZOO[source]):
            return None, (f"targets not checked: {source} is not fetched yet "
                          f"(python -m compress models fetch {source})")
        folder = converted_dir(ZOO[source])
    else:
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            return None, f"targets not checked: {source} has no local config.json"
    cached = _cache_file(folder)
    if cached.is_file():
        data = json.loads(cached.read_text())
        return Structure(data["model_type"], tuple(map(tuple, data["linears"]))), ""
    if not trust_remote_code:  # remote code may build any tree: only transformers' own classes are known
        structure = static_structure(json.loads((folder / "config.json").read_text()))
        if structure is not None:
            return structure, ""
    structure = _meta_structure(folder, trust_remote_code)
    remember_structure(folder, structure)
    return structure, ""


# Per decoder layer, the linears (under ``model.layers.{i}.``, in registration order) of the families whose
# tree has no other variable than the layer count; then ``lm_head``, a Linear even when it is tied.
_ATTN_MLP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_LINEARS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"), _ATTN_MLP),
    "phi3": ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),
}


def static_structure(config: dict) -> Structure | None:
    """The structure of a ``config.json`` of a known dense family, without torch or transformers;
    None for any other (a mixture of experts, remote code, an unknown type)."""
    per_layer = _LAYER_LINEARS.get(config.get("model_type"))
    layers = config.get("num_hidden_layers")
    if per_layer is None or "auto_map" in config or not isinstance(layers, int) or layers < 1:
        return None
    names = [f"model.layers.{i}.{n}" for i in range(layers) for n in per_layer] + ["lm_head"]
    return Structure(config["model_type"], tuple((n, "Linear") for n in names))


def remember_structure(folder: str | Path, structure: Structure) -> None:
    """Cache ``structure`` as that of the model in ``folder`` (``compress run`` does, having loaded the
    model anyway: a later ``compress validate`` of it then builds nothing)."""
    if not (Path(folder) / "config.json").is_file():
        return  # a hub id: nothing local to key the cache by
    cached = _cache_file(Path(folder))
    write_text_atomic(cached, json.dumps({"model_type": structure.model_type, "linears": structure.linears}))


def _cache_file(folder: Path) -> Path:
    """Keyed by the config's bytes and the transformers version (which decides the module tree)."""
    key = hashlib.sha256((folder / "config.json").read_bytes()
                         + f"\0transformers {version('transformers')}".encode()).hexdigest()[:32]
    return cache_dir("structure") / f"{key}.json"


def _meta_structure(folder: Path, trust_remote_code: bool) -> Structure:
    """The model of ``folder/config.json`` built on the meta device (shapes, no storage)."""
    # torch and transformers are imported here only: a cached structure needs neither.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a packed export: its linears are plain ones before packing
    from compress.moe import split_experts  # imports torch: only when a structure is built

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    split_experts(model)  # per-expert linears, as a loaded model has them
    return structure_of(model)
