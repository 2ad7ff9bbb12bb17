"""Code named in a registry and imported when it first runs.

A registry entry (an algorithm's step, an export format's writer and loader) names its function
as ``Deferred("package.module", "function")``. Reading the registries — building the recipe
schema, checking a recipe's step order in ``compress validate`` — then imports no torch,
transformers or datasets; the module is imported on the first call. This is for start-up time
only, not to avoid an import circle: the named modules import the registry, never the other way.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Deferred:
    module: str
    name: str

    def resolve(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args, **kwargs):
        return self.resolve()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{self.module}:{self.name}"


def deferred_names(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for a package face: ``table`` maps a public name to the
    module that defines it (``package.sub``), imported on first access (``from package import name``
    works). A name must not also be a submodule's: importing that submodule would bind the package
    attribute to the module, and the name would never reach this function."""
    for name in table:
        if importlib.util.find_spec(f"{package}.{name}") is not None:
            raise ValueError(f"{package}.{name} is a submodule; a deferred name cannot share it")

    def __getattr__(name: str) -> Any:
        if name in table:
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
