"""Resolve a step's ``targets`` / ``ignore`` patterns to module names.

The matching itself is plain Python over (name, class name) pairs, so a recipe can be checked
against a model's structure (``compress.structure``) without the model; ``match_modules`` applies
it to a live model.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Iterable

from compress.errors import CompressError


def _matches(pattern: str, name: str, class_name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?[") or "." in pattern:
        return fnmatch.fnmatchcase(name, pattern)
    return class_name == pattern or name == pattern


def match_names(modules: Iterable[tuple[str, str]], targets: list[str], ignore: list[str], *,
                where: str = "step") -> list[str]:
    """The names among ``modules`` ((name, class name) pairs, in model order) that ``targets``
    select and ``ignore`` does not; an error when none does."""
    for pattern in list(targets) + list(ignore):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise CompressError(f"{where}: bad regular expression {pattern!r}: {exc}") from None
    hits = [name for name, cls in modules
            if any(_matches(p, name, cls) for p in targets) and not any(_matches(p, name, cls) for p in ignore)]
    if not hits:
        raise CompressError(f"{where}: targets {targets} (ignore {ignore}) match no module of the model")
    return hits


def match_modules(model, targets: list[str], ignore: list[str], *, where: str = "step",
                  leaf_type: type | tuple | None = None) -> dict:
    """Modules of ``leaf_type`` (default ``nn.Linear``) selected by ``targets`` minus ``ignore``, in model order."""
    if leaf_type is None:
        import torch.nn as nn  # a model is at hand, so torch is loaded; this module itself stays torch-free
        leaf_type = nn.Linear
    modules = {name: m for name, m in model.named_modules() if isinstance(m, leaf_type)}
    names = match_names(((n, type(m).__name__) for n, m in modules.items()), targets, ignore, where=where)
    return {name: modules[name] for name in names}
