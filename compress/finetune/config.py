"""Typed configs of S2FT — what trains (``S2FTConfig``), how (``TrainConfig``), and the recipe step
that joins them with a task (``S2FTStepConfig``) — and the step's registration.

Plain pydantic: the recipe schema is built from these without importing torch. The step's code is
``steps.s2ft_step``. It leaves an adapter; training moves the weights, so quantized levels, kept
float weights or a calibrator from an earlier step would no longer describe the model: fine-tune
before quantizing.
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from compress.algorithms import register_algorithm
from compress.config import CorpusName, StrictModel, UntargetedStepConfig
from compress.deferred import Deferred
from compress.state import Fact


class S2FTConfig(StrictModel):
    """What S2FT trains.

    ``attention_ratio`` / ``mlp_ratio``: fraction of KV head groups / FFN channels
    selected, in (0, 1]; 0 skips that kind (not both). ``attention_modules`` /
    ``mlp_modules``: which of the coupled matrices of a selected unit get a
    trainable slice (row slices: v_proj, gate_proj, up_proj; column slices:
    o_proj, down_proj). The default is the paper's LLaMA3 setting: 3% of the
    down_proj channels. ``delta_dtype``: ``weight`` keeps the deltas in the
    model's dtype; ``float32`` keeps them (and so the optimizer state) in fp32
    when the model is bf16/fp16.
    """

    strategy: Literal["random", "weight", "activation", "gradient"] = "random"
    attention_ratio: float = Field(0.0, description="fraction of KV head groups; 0 = no attention slices")
    mlp_ratio: float = Field(0.03, description="fraction of FFN channels; 0 = no FFN slices")
    attention_modules: list[Literal["v_proj", "o_proj"]] = Field(default_factory=lambda: ["o_proj"])
    mlp_modules: list[Literal["gate_proj", "up_proj", "down_proj"]] = Field(
        default_factory=lambda: ["down_proj"])
    seed: int = 0
    delta_dtype: Literal["weight", "float32"] = "weight"

    @field_validator("attention_ratio", "mlp_ratio")
    @classmethod
    def _ratio_in_range(cls, value: float, info) -> float:
        check_ratio(info.field_name, value)
        return value

    @field_validator("attention_modules", "mlp_modules")
    @classmethod
    def _no_duplicates(cls, value: list[str], info) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"{info.field_name} lists a module twice: {value}")
        return value


def check_ratio(name: str, value: float) -> None:
    # ValueError: pydantic turns it into a validation error naming the field;
    # apply_s2ft re-checks and raises CompressError for configs built without validation.
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0.0 <= value <= 1.0) \
            or math.isnan(value):
        raise ValueError(f"{name} must be in (0, 1] (or 0 to skip this kind), got {value!r}")


class TrainConfig(StrictModel):
    """How to train (the data and the trainable parameters are given separately)."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    warmup: int = Field(0, ge=0, description="steps of linear warmup from 0 to lr")
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # after warmup, down to 0 at `steps`
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the gradient norm (null: no clipping)")
    seed: int = 0
    checkpoint_dir: str | None = None
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (with checkpoint_dir)")


class S2FTStepConfig(UntargetedStepConfig, S2FTConfig, TrainConfig):
    """S2FTConfig (what trains) + TrainConfig (how) + the task (on what). ``seed`` seeds both the
    random selection and the training."""

    algorithm: Literal["s2ft"] = "s2ft"
    untargeted_reason: ClassVar[str] = ("s2ft chooses its modules with attention_modules/mlp_modules and the "
                                        "ratios; targets/ignore are not supported")
    task: Literal["bbc_topics", "lm"] = "bbc_topics"
    corpus: CorpusName = Field("bbc", description="bbc_topics: a corpus with topic labels (bbc, or a .jsonl "
                                                  "with text+label); lm: any corpus (e.g. stdlib)")
    split: Literal["train", "validation"] = "train"  # never test: verify scores the test split
    max_examples: int | None = Field(None, ge=1, description="cap on training examples (seeded sample)")
    max_chars: int = Field(600, ge=1, description="bbc_topics: article characters in the prompt")
    max_len: int = Field(256, ge=2, le=131_072, description="tokens per example")

    def s2ft(self) -> S2FTConfig:
        return S2FTConfig(**self.model_dump(include=set(S2FTConfig.model_fields)))

    def training(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))


register_algorithm("s2ft", S2FTStepConfig, step=Deferred("compress.finetune.steps", "s2ft_step"),
                   requires_calibration=False, produces={Fact.ADAPTER},
                   invalidates={Fact.QUANTIZED, Fact.FLOAT_WEIGHTS, Fact.CALIBRATOR, Fact.DRAFTER_HEADS},
                   doc="Apply S2FT, train the selected slices on the task's train split, merge, keep the adapter.")
