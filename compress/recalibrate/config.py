"""The ``recalibrate`` step's typed config and its registration.

Plain pydantic (the recipe schema is built from it without importing torch); the step's code is
``step.apply_recalibrate``. It produces the recipe's one calibrator, fitted on the model as it is
at that point: a later step that changes the weights would leave it describing another model.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from compress.algorithms import register_algorithm
from compress.config import CorpusName, UntargetedStepConfig
from compress.deferred import Deferred
from compress.state import Fact

FIT_SPLITS = ("train", "validation")


class RecalibrateConfig(UntargetedStepConfig):
    """Which calibrator to fit, on what (``target``), from which held-out split."""

    algorithm: Literal["recalibrate"] = "recalibrate"
    untargeted_reason: ClassVar[str] = "recalibrate changes no module; it fits a calibrator on the model's outputs"
    method: str = "temperature"
    options: dict[str, Any] = Field(default_factory=dict, description="the calibrator's own options")
    target: Literal["tokens", "topics"] = "tokens"
    corpus: CorpusName = "bbc"
    split: str = Field("validation", description="train or validation; never test (verify scores it)")
    seq_len: int = Field(512, ge=8, le=131_072, description="tokens: window length")
    max_windows: int | None = Field(16, ge=1, description="tokens: windows of the split (None: all)")
    max_logit_mb: float = Field(256, gt=0, le=65_536,
                                description="tokens + temperature: MB of full float32 logits kept for the fit")
    max_examples: int | None = Field(200, ge=1, description="topics: articles of the split (None: all)")
    max_chars: int = Field(600, ge=1, description="topics: article characters in the prompt")
    batch_size: int = Field(1, ge=1, le=4096)
    seed: int = 0

    @field_validator("split")
    @classmethod
    def _not_test(cls, v: str) -> str:
        if v in FIT_SPLITS:
            return v
        why = (" verify evaluates on the test split, and a calibrator fitted there would be graded on its own "
               "fitting data" if v in ("test", "all") else "")
        raise ValueError(f"recalibrate fits on split {v!r}, which is not allowed:{why}; use "
                         f"{' or '.join(FIT_SPLITS)}")

    @model_validator(mode="after")
    def _method_and_target(self) -> "RecalibrateConfig":
        # calibration imports torch: only a recipe with a recalibrate step pays for it at validation.
        from calibration import CALIBRATORS, make_calibrator
        if self.method not in CALIBRATORS:
            raise ValueError(f"unknown calibrator {self.method!r}; allowed: {', '.join(sorted(CALIBRATORS))}")
        make_calibrator(self.method, **self.options)  # bad options fail at validation, not after the forwards
        if self.target == "topics" and self.corpus != "bbc":
            raise ValueError(f"target topics scores the BBC topic labels; corpus must be bbc, got {self.corpus!r}")
        if self.target == "topics" and self.method == "platt":
            raise ValueError("platt is binary; the topics target has 5 classes (use temperature, vector, matrix, "
                             "histogram, isotonic or hcal)")
        return self


register_algorithm("recalibrate", RecalibrateConfig, step=Deferred("compress.recalibrate.step", "apply_recalibrate"),
                   requires_calibration=False, produces={Fact.CALIBRATOR},
                   doc="Fit a confidence calibrator (next-token or BBC-topic) on a held-out split; verify applies "
                       "it, the export ships it.")
