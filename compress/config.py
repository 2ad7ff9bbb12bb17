"""Base classes of every typed config — strict (unknown keys are errors) and versioned — and what
step configs share: which modules a step touches, and the names of the corpora.

Plain pydantic: the recipe schema is built from these without importing torch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

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
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
