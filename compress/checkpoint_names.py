"""A checkpoint read under the names of the model the toolkit builds, one tensor at a time.

A streamed model (``compress.stream``) reads each block from the source checkpoint by the names of
its own parameters. Those are not always the names on disk:

- transformers renames some keys when it loads (Mixtral's ``block_sparse_moe.`` is ``mlp.``): the
  same renamings (``get_model_conversion_mapping``'s ``WeightRenaming`` entries) are applied here;
- a mixture of experts is split into per-expert linears (``compress.moe.split_experts``:
  ``…experts.E.gate_proj/up_proj/down_proj``), whichever layout the checkpoint stores:
  one tensor per expert and projection, as transformers 5 writes them (Mixtral's
  ``experts.E.w1/w3/w2``, Qwen-MoE's ``experts.E.gate_proj/up_proj/down_proj``), found through the
  converters transformers merges them with on load; or the fused 3-D ``experts.gate_up_proj``
  [E, 2I, H] and ``experts.down_proj`` [E, H, I], of which expert E's rows are read alone.

The values are those a model loaded whole and then split has, bit for bit: stacking, concatenating
and slicing copy values unchanged, and the dtype cast is per element.
"""
from __future__ import annotations

import re
from typing import Any, Callable

import torch
import torch.nn as nn

from compress.errors import CompressError

# How transformers 5 merges per-expert tensors into the fused ones (conversion_mapping.py): the
# leaves of the split experts that each source pattern of such a converter holds, in order.
_EXPERT_MERGES = {"experts.gate_up_proj": ("gate_proj.weight", "up_proj.weight"),
                  "experts.down_proj": ("down_proj.weight",)}


def _conversions(model: nn.Module) -> tuple[list, list[tuple[Any, tuple[str, ...]]]]:
    """transformers' load-time renamings for ``model``, and its per-expert merges with the split
    leaves each source pattern maps to. Other converters (fused q/k/v, transposes) are not read:
    a key they would convert keeps its name and a model parameter it feeds is reported missing."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    renamings, merges = [], []
    for t in get_model_conversion_mapping(model):
        if not isinstance(t, WeightConverter):
            renamings.append(t)
            continue
        target = t.target_patterns[0] if len(t.target_patterns) == 1 else ""
        leaves = next((v for k, v in _EXPERT_MERGES.items() if target.endswith(k)), None)
        ops = [type(op) for op in t.operations]
        if leaves is None or len(t.source_patterns) != len(leaves):
            continue
        if ops == [MergeModulelist, Concatenate] and len(leaves) == 2 and t.operations[1].dim == 1 \
                and t.operations[0].dim == 0:
            merges.append((t, leaves))
        elif ops == [MergeModulelist] and len(leaves) == 1 and t.operations[0].dim == 0:
            merges.append((t, leaves))
    return renamings, merges


def _per_expert_name(key: str, pattern: str, leaf: str) -> str | None:
    """``…experts.7.w1.weight`` matched by ``.experts.*.w1.weight`` -> ``…experts.7.gate_proj.weight``."""
    if pattern.count("*") != 1:
        return None
    tail = pattern.split("*", 1)[1].replace("\\.", ".")  # ".w1.weight"
    m = re.search(r"\.(\d+)" + re.escape(tail) + "$", key)
    return None if m is None else f"{key[:m.start()]}.{m.group(1)}.{leaf}"


class ModelCheckpoint:
    """``checkpoint`` (anything with ``keys``, ``get``, ``in``) under the parameter names of
    ``model`` (split experts included): ``keys``, ``in``, ``get`` by the model's names."""

    def __init__(self, checkpoint, model: nn.Module):
        from compress.moe import expert_lists

        self.checkpoint = checkpoint
        self.folder = getattr(checkpoint, "folder", "the checkpoint")
        renamings, merges = _conversions(model)
        self._read: dict[str, Callable[[], torch.Tensor]] = {}
        renamed: dict[str, str] = {}
        for key in checkpoint.keys():
            name = key
            for r in renamings:
                name, _ = r.rename_source_key(name)
            for converter, leaves in merges:
                _, pattern = converter.rename_source_key(name)
                if pattern is not None:
                    split = _per_expert_name(name, pattern, leaves[converter.source_patterns.index(pattern)])
                    name = split if split is not None else name
                    break
            renamed[name] = key
            self._read[name] = lambda key=key: checkpoint.get(key)
        # Fused experts on disk: expert e's rows of the 3-D tensors, read alone.
        for lst, experts in expert_lists(model):
            if f"{lst}.gate_up_proj" not in renamed or f"{lst}.down_proj" not in renamed:
                continue
            gate_up, down = renamed.pop(f"{lst}.gate_up_proj"), renamed.pop(f"{lst}.down_proj")
            del self._read[f"{lst}.gate_up_proj"], self._read[f"{lst}.down_proj"]
            for e, expert in enumerate(experts):
                i = expert.gate_proj.out_features  # gate rows first, then up (not interleaved: _splittable)
                for leaf, key, rows in (("gate_proj", gate_up, slice(0, i)), ("up_proj", gate_up, slice(i, 2 * i)),
                                        ("down_proj", down, slice(None))):
                    self._read[f"{lst}.{e}.{leaf}.weight"] = lambda k=key, e=e, r=rows: self._rows(k, e, r)

    def _rows(self, key: str, expert: int, rows: slice) -> torch.Tensor:
        """``key[expert, rows]``: from the file alone where the checkpoint can slice (safetensors)."""
        part = getattr(self.checkpoint, "get_part", None)
        if part is not None:
            return part(key, (expert, rows))
        return self.checkpoint.get(key)[expert, rows].clone()  # its own storage: the 3-D tensor goes

    # Said where a tensor the model needs is not found (compress.checkpoint.materialise says it too).
    missing_hint = (", under its own name or the one transformers gives it on load (renamings, per-expert "
                    "merges, fused expert tensors); a checkpoint whose layout transformers converts otherwise "
                    "(e.g. fused q/k/v) cannot be streamed yet: drop model.stream")

    def close(self) -> None:
        getattr(self.checkpoint, "close", lambda: None)()

    def keys(self):
        return self._read.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._read

    def get(self, name: str) -> torch.Tensor:
        try:
            read = self._read[name]
        except KeyError:
            raise CompressError(f"{self.folder}: the checkpoint has no tensor {name!r}{self.missing_hint}") from None
        return read()
