"""Reading a recipe file and ``--set`` overrides: YAML (safe loader, duplicate keys refused) in,
a plain dict out, for :func:`compress.recipe.validate_recipe` to check against the schema.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from compress.errors import RecipeError


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_recipe_dict(path: str | Path) -> dict:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
    if b"\x00" in raw:
        raise RecipeError(f"{path}: not a YAML text file (it contains NUL bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start}); a recipe is a YAML file") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe is empty; it needs at least `model:` (see recipes/default.yaml)")
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a YAML mapping (keys: version, model, calibration, "
                          f"stages, verify, export), got a {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str], *, origin: str = "--set") -> dict:
    """Apply ``a.b[0].c=value`` overrides (value parsed as YAML) to a recipe dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{origin} {item!r}: expected KEY=VALUE, e.g. stages[0].steps[0].bits=3")
        key, _, raw_value = item.partition("=")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError:
            value = raw_value
        parts = _split_path(key.strip(), origin, item)
        if len(parts) > 1 and parts[0] == "model" and isinstance(data.get("model"), str):
            data["model"] = {"id": data["model"]}  # `model: ID` is shorthand for `model: {id: ID}`: model.stream=true works
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt_is_index = isinstance(parts[i + 1], int)
            node = _descend(node, part, create=[] if nxt_is_index else {}, origin=origin, item=item)
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or not -len(node) <= last < len(node):
                raise RecipeError(f"{origin} {item!r}: index {last} is out of range")
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise RecipeError(f"{origin} {item!r}: {key!r} does not lead to a mapping")
    return data


def _split_path(key: str, origin: str, item: str) -> list:
    parts: list = []
    for token in key.replace("[", ".").replace("]", "").split("."):
        if token == "":
            raise RecipeError(f"{origin} {item!r}: empty path segment in {key!r}")
        parts.append(int(token) if token.lstrip("-").isdigit() else token)
    return parts


def _descend(node: Any, part: Any, *, create: Any, origin: str, item: str) -> Any:
    if isinstance(part, int):
        if not isinstance(node, list) or not -len(node) <= part < len(node):
            raise RecipeError(f"{origin} {item!r}: index {part} is out of range")
        return node[part]
    if not isinstance(node, dict):
        raise RecipeError(f"{origin} {item!r}: {part!r} is not under a mapping")
    if node.get(part) is None:
        node[part] = create
    return node[part]
