"""Base classes of every typed config — strict (unknown keys are errors) and versioned — and what
step configs share: which modules a step touches, and the names of the corpora.

Plain pydantic: the recipe schema is built from these without importing torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from compress.errors import RecipeError

# The named corpora (compress/data/corpora.py loads each); any local .txt / .jsonl path works too.
NAMED_CORPORA = ("bbc", "milton", "shakespeare", "stdlib")


def check_corpus(source: str) -> str:
    if source in NAMED_CORPORA or Path(source).expanduser().exists():
        return source
    raise ValueError(f"unknown corpus {source!r}; known: {', '.join(NAMED_CORPORA)}, "
                     f"or a path to a .txt/.jsonl file")


# A corpus a config reads: a named one or an existing file (checked when the config is validated).
CorpusName = Annotated[str, AfterValidator(check_corpus)]


class StrictModel(BaseModel):
    """Strict: unknown keys are errors, and so is an assignment of a bad value.

    Built from Python (``GPTQConfig(bits=5)``, ``cfg.bits = 5``) a config raises a RecipeError that
    names the field and the bad value as ``compress validate`` does (``GPTQConfig: bits: Input should
    be 2, 3, 4 or 8 (got 5)``), not pydantic's own dump; it is a ValueError too, as pydantic's is."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise RecipeError(self._error_text(exc)) from None

    # Marks this __init__ as pydantic's own (as pydantic's RootModel does), so that validating a nested
    # config (a step inside a recipe) does not call it: a nested error stays one pydantic error with
    # its full path, which the outer config (or validate_recipe) describes once.
    __init__.__pydantic_base_init__ = True  # type: ignore[attr-defined]

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise RecipeError(self._error_text(exc)) from None

    @classmethod
    def _error_text(cls, exc: ValidationError) -> str:
        return describe_validation_error(exc, cls.__name__)


def format_loc(loc: tuple) -> str:
    """('stages', 0, 'steps', 1, 'gptq', 'bits') -> 'stages[0].steps[1].bits': the YAML path."""
    out = ""
    parts = list(loc)
    for i, p in enumerate(parts):
        if isinstance(p, int):
            out += f"[{p}]"
            continue
        # Drop the tag pydantic inserts after a step's index (the step's algorithm, a union member).
        if i >= 2 and isinstance(parts[i - 1], int) and parts[i - 2] == "steps":
            continue
        if p.startswith("function-"):
            continue
        out += ("." if out else "") + str(p)
    return out or "(top level)"


def describe_error(err: dict) -> str:
    """One pydantic error as ``path: what is wrong (got value)``."""
    path = format_loc(err["loc"])
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        known = sorted(t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(","))
        return f"{path}.algorithm: unknown algorithm {ctx.get('tag')!r}; known: {', '.join(known)}"
    if err["type"] == "union_tag_not_found":
        return f"{path}: a step needs `algorithm:`"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key (not part of the schema here)"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"{path}: {msg}{shown}"


def describe_validation_error(exc: ValidationError, origin: str, describe=describe_error, limit: int = 6) -> str:
    """The first ``limit`` errors of ``exc``, one line each, every line starting with ``origin: ``."""
    lines = [describe(e) for e in exc.errors(include_url=False)][:limit]
    return "\n".join(f"{origin}: {line}" for line in lines)


class StepConfig(StrictModel):
    """What every algorithm step that acts on chosen modules shares.

    ``targets`` entries are a module class name (``Linear``), an fqn glob
    (``model.layers.*.mlp.*``) or ``re:<regex>`` on the fqn; ``ignore`` uses the
    same forms. A step whose targets match nothing is an error.
    """

    algorithm: str
    targets: list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"])


# What StepConfig's targets/ignore default to: an untargeted step accepts exactly these (resolved
# recipes written before such steps lost the fields carry them) and refuses anything else.
_TARGET_DEFAULTS = {"targets": ["Linear"], "ignore": ["lm_head"]}


class UntargetedStepConfig(StrictModel):
    """A step that chooses its modules itself (or changes none): it takes no ``targets`` / ``ignore``,
    and a recipe that gives them is refused rather than silently ignored."""

    algorithm: str
    untargeted_reason: ClassVar[str] = "it chooses its modules itself"  # said when targets are given

    @model_validator(mode="before")
    @classmethod
    def _no_targets(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        given = {k: data[k] for k in _TARGET_DEFAULTS if k in data}
        if any(v not in (_TARGET_DEFAULTS[k], []) for k, v in given.items()):  # [] says "none" in so many words
            name = data.get("algorithm", cls.model_fields["algorithm"].default)
            raise ValueError(f"{name} takes no targets/ignore: {cls.untargeted_reason} (got {given})")
        return {k: v for k, v in data.items() if k not in _TARGET_DEFAULTS}
