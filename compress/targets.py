"""Resolve a step's ``targets`` / ``ignore`` patterns to module names."""
from __future__ import annotations

import fnmatch
import re

import torch.nn as nn

from compress.errors import CompressError


def _matches(pattern: str, name: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?[") or "." in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return type(module).__name__ == pattern or name == pattern


def match_modules(model: nn.Module, targets: list[str], ignore: list[str], *,
                  where: str = "step", leaf_type: type | tuple = nn.Linear) -> dict[str, nn.Module]:
    """Modules of ``leaf_type`` selected by ``targets`` minus ``ignore``, in model order."""
    for pattern in list(targets) + list(ignore):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise CompressError(f"{where}: bad regular expression {pattern!r}: {exc}") from None
    hits = {}
    for name, module in model.named_modules():
        if not isinstance(module, leaf_type):
            continue
        if any(_matches(p, name, module) for p in targets) and not any(_matches(p, name, module) for p in ignore):
            hits[name] = module
    if not hits:
        raise CompressError(f"{where}: targets {targets} (ignore {ignore}) match no module of the model")
    return hits
