"""The ``self_spec`` step's typed config, and its registration with the ``self-spec`` export format.

Plain pydantic: the recipe schema is built from it without importing torch; the step and the
format's writer are named (``step.py``) and imported when they first run. The step leaves the
target unchanged and produces exit heads (``Fact.DRAFTER_HEADS``), which the ``self-spec`` export
writes — that export holds no model, so it has no model loader.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from compress.algorithms import register_algorithm
from compress.config import CorpusName, UntargetedStepConfig
from compress.deferred import Deferred
from compress.errors import CompressError
from compress.formats import ExportFormat, register_format
from compress.state import Fact

FORMAT = "self-spec"


class SelfSpecConfig(UntargetedStepConfig):
    algorithm: Literal["self_spec"] = "self_spec"
    untargeted_reason: ClassVar[str] = "the step adds exit heads and changes no module of the target"
    exit_layers: list[int] = Field(default_factory=lambda: [4], min_length=1)
    vocab_size: int | None = Field(32768, ge=16, description="trimmed LM head size; null for the full vocabulary")
    full_vocab_layers: list[int] = Field(default_factory=list, description="extra full-vocabulary heads")
    train_corpora: list[CorpusName] = Field(default_factory=lambda: ["stdlib"], min_length=1)
    train_windows: int = Field(1024, ge=1, description="windows of seq_len tokens per corpus (train split)")
    eval_windows: int = Field(24, ge=2, description="held-out windows per corpus (validation split)")
    exclude_prompts: list[str] = Field(default_factory=list,
                                       description="prompt files (blank-line separated) whose documents are kept out "
                                                   "of training: a benchmark's prompts must be unseen text")
    seq_len: int = Field(512, ge=16, le=8192)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0, le=1)
    gammas: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6], min_length=1)
    calibrator: Literal["platt", "isotonic", "temperature", "hcal"] | None = "platt"
    seed: int = 0

    @field_validator("exit_layers", "full_vocab_layers")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if k < 1]
        if bad:
            raise ValueError(f"exit layers must be >= 1 (blocks the drafter runs), got {bad}")
        return sorted(set(v))

    @field_validator("gammas")
    @classmethod
    def _gammas(cls, v: list[int]) -> list[int]:
        if any(g < 1 for g in v):
            raise ValueError(f"draft lengths must be >= 1, got {v}")
        return sorted(set(v))


def _no_model(path, **_):
    raise CompressError(f"{path} is a self-spec drafter export: exit heads for a target, not a model; use it as "
                        f"--drafter with compress draft-bench --target <the target it was trained on>")


register_algorithm("self_spec", SelfSpecConfig, step=Deferred("compress.draft.selfspec.step", "apply_self_spec"),
                   requires_calibration=False, produces={Fact.DRAFTER_HEADS},
                   doc="Shared-prefix self-drafter: distil exit heads at several depths, pick one, calibrate its stop.")
register_format(ExportFormat(FORMAT, Deferred("compress.draft.selfspec.step", "write_self_spec"), _no_model,
                             needs=frozenset({Fact.DRAFTER_HEADS}), doc="exit heads, manifest and calibrator"))
