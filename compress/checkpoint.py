"""A safetensors checkpoint read one tensor at a time, and a model skeleton without its weights.

``Checkpoint(folder)`` maps every tensor name to its file — ``model.safetensors.index.json``'s
``weight_map`` for a sharded folder, else the one ``model.safetensors`` — and ``get(name)`` reads
that single tensor (``safe_open``): nothing else of the file is read.

``skeleton(folder, dtype)`` builds the model of ``config.json`` with every parameter on the meta
device (shapes, no storage) and its non-persistent buffers real (the rotary tables, computed as
``from_pretrained`` computes them), then materialises the parameters outside the decoder blocks
that the calibration capture runs (the embedding, the final norm), read from the checkpoint in the
model's dtype. The output head stays on meta: nothing before the last block reads it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from compress.errors import CompressError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class Checkpoint:
    """The tensors of a Hugging Face folder (sharded or not), read one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / f for name, f in weight_map.items()}
        elif (self.folder / SINGLE_NAME).is_file():
            with safe_open(self.folder / SINGLE_NAME, framework="pt") as f:
                self.files = {name: self.folder / SINGLE_NAME for name in f.keys()}
        else:
            raise CompressError(f"{self.folder}: no {SINGLE_NAME} or {INDEX_NAME}; streaming reads safetensors "
                                "checkpoints (a .bin checkpoint must be converted first)")
        self._open: dict[Path, object] = {}

    @classmethod
    def of_file(cls, path: str | Path) -> "Checkpoint":
        """The tensors of one safetensors file (whatever its name)."""
        self = cls.__new__(cls)
        self.folder = Path(path)
        with safe_open(path, framework="pt") as f:
            self.files = {name: Path(path) for name in f.keys()}
        self._open = {}
        return self

    def metadata(self) -> dict:
        """The header metadata of the (first) file."""
        path = next(iter(self.files.values()))
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def keys(self):
        return self.files.keys()

    def _handle(self, name: str):
        try:
            path = self.files[name]
        except KeyError:
            raise CompressError(f"{self.folder}: the checkpoint has no tensor {name!r}") from None
        handle = self._open.get(path)
        if handle is None:
            # A handle per shard, kept until ``close``: opening one reads its header again.
            handle = self._open[path] = safe_open(path, framework="pt")
        return handle

    def close(self) -> None:
        """Drop the open handles. safe_open maps the file, and every page a read touched stays in this
        process's resident set while the map lives: a streamed run that kept all its shards open grew
        by the whole checkpoint (the 8B shape's 21.6 GB peak on the H200, 16 GB of it file pages)."""
        self._open.clear()

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def get_part(self, name: str, index: tuple) -> torch.Tensor:
        """``tensor[index]`` (ints and slices) read without the rest of the tensor: one expert of a
        fused 3-D expert tensor (``compress.checkpoint_names``)."""
        return self._handle(name).get_slice(name)[index]


def skeleton(folder: str | Path, dtype: torch.dtype, *, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``folder/config.json`` with meta parameters and real non-persistent buffers."""
    from transformers import AutoConfig, AutoModelForCausalLM  # slow import: only when a model is built

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        raise CompressError(f"{folder}: a quantized checkpoint ({config.quantization_config.get('quant_method')}); "
                            "streaming compresses float checkpoints")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    # Non-persistent buffers are in no checkpoint: from_pretrained gives them storage and runs the
    # model's own _init_weights on their modules (the rotary tables); so does this.
    owners = {}
    for key, buf in list(model.named_buffers()):
        parent, _, leaf = key.rpartition(".")
        module = model.get_submodule(parent) if parent else model
        if leaf in module._non_persistent_buffers_set:
            # NaN, not empty: a buffer that _init_weights leaves alone is then found below, not used.
            module._buffers[leaf] = torch.full(buf.shape, float("nan"), dtype=buf.dtype, device="cpu") \
                if buf.is_floating_point() else torch.zeros(buf.shape, dtype=buf.dtype, device="cpu")
            owners[parent] = module
    for module in owners.values():
        model._init_weights(module)
    for key, buf in model.named_buffers():
        if buf.is_floating_point() and not buf.is_meta and torch.isnan(buf).any():
            raise CompressError(f"{folder}: streaming cannot compute the buffer {key} of this architecture "
                                "without loading the model (its _init_weights leaves it); drop model.stream")
    if (Path(folder) / "generation_config.json").is_file():  # as from_pretrained reads it
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()


def materialise(module: nn.Module, checkpoint: Checkpoint, prefix: str, dtype: torch.dtype,
                device: torch.device | str = "cpu", *, missing_bias_zero: bool = False) -> None:
    """Give every parameter (and persistent buffer) of ``module`` its value from ``checkpoint``
    (names ``prefix + local name``), in place: the module objects stay the same, so references held
    elsewhere (a step's target modules) see the weights. ``missing_bias_zero``: a bias the checkpoint
    lacks is zeros (bias correction gives linears a bias their checkpoint never had)."""
    for name, p in list(module.named_parameters(recurse=True)):
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        key = prefix + name
        if key in checkpoint:
            t = checkpoint.get(key)
            if tuple(t.shape) != tuple(p.shape):
                raise CompressError(f"{checkpoint.folder}: {key} has shape {tuple(t.shape)}, the model "
                                    f"{tuple(p.shape)}")
            value = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        elif missing_bias_zero and leaf == "bias":
            value = torch.zeros(p.shape, dtype=dtype, device=device)
        else:
            raise CompressError(f"{checkpoint.folder}: the checkpoint has no tensor {key!r}"
                                f"{getattr(checkpoint, 'missing_hint', '')}")
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    for name, b in list(module.named_buffers(recurse=True)):
        parent, _, leaf = name.rpartition(".")
        owner = module.get_submodule(parent) if parent else module
        if leaf in owner._non_persistent_buffers_set:
            owner._buffers[leaf] = b.to(device)
        elif prefix + name in checkpoint:
            owner._buffers[leaf] = checkpoint.get(prefix + name).to(device)


def to_meta(module: nn.Module) -> None:
    """Drop the storage of ``module``'s parameters (shapes stay); non-persistent buffers stay real."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=False)
        for leaf, b in list(sub._buffers.items()):
            if b is not None and leaf not in sub._non_persistent_buffers_set:
                sub._buffers[leaf] = torch.empty(b.shape, dtype=b.dtype, device="meta")
            elif b is not None:
                sub._buffers[leaf] = b.cpu()
