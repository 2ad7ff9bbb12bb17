"""Recipes: one pydantic schema that YAML and Python both describe, 1:1.

    version: 1
    model: smollm2-135m                 # or {id: ..., dtype: float32, device: auto}
    calibration: {corpus: bbc, num_samples: 32, seq_len: 512, seed: 0}
    stages:
      - name: quantize
        steps:
          - {algorithm: gptq, bits: 4, group_size: 128}
    verify: {corpus: bbc, split: test, seq_len: 512, max_windows: 16}
    export: {format: hf}

Unknown keys are errors; every error names its YAML path (``stages[0].steps[1].bits``),
the bad value and what is allowed. Reading the YAML and ``--set`` overrides: ``recipe_io.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

# Registering every algorithm (and the self-spec format) before the step union is built:
import compress.draft.selfspec.config  # noqa: F401
import compress.finetune  # noqa: F401
import compress.prune  # noqa: F401
import compress.quantize  # noqa: F401
import compress.recalibrate  # noqa: F401
import compress.rotate  # noqa: F401
from compress.algorithms import ALGORITHMS
from compress.config import CorpusName, StrictModel, describe_error, describe_validation_error, format_loc
from compress.errors import CompressError, RecipeError
from compress.formats import FORMATS
from compress.harness.catalog import parse_task_list
from compress.models import ZOO, check_model_source
from compress.recipe_io import apply_overrides, read_recipe_dict

RECIPE_VERSION = 1
DTYPES = Literal["float32", "float16", "bfloat16"]


class LayoutSpec(StrictModel):
    """A hand-written block layout, for a model whose inferred one (compress/layout.py) is wrong."""

    blocks: str = Field(min_length=1, description="fqn of the ModuleList of decoder blocks, e.g. model.layers")
    subsets: list[list[str]] = Field(min_length=1, description="true-sequential subsets of linears, names "
                                     "relative to a block, e.g. [[self_attn.q_proj, self_attn.k_proj], ...]")


class StreamSpec(StrictModel):
    """Compress the model one decoder block at a time from its safetensors (compress/stream.py)."""

    resume: bool = Field(True, description="keep each finished block so that an interrupted run resumes at the "
                         "first block not written (costs one float copy of the model on disk while it runs)")


class ModelSpec(StrictModel):
    id: str  # a zoo id, a model folder or a hub id; required: a recipe says which model it compresses
    dtype: DTYPES = "float32"
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    trust_remote_code: bool = False
    layout: LayoutSpec | None = Field(None, description="override the inferred block layout (exotic models)")
    stream: StreamSpec | None = Field(None, description="true: read, compress and write one decoder block at a "
                                      "time (layer-wise steps, export gptq); host memory O(one block)")

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_shorthand(cls, v: Any) -> Any:
        return {} if v is True else None if v is False else v

    @field_validator("id")
    @classmethod
    def _known(cls, v: str) -> str:
        try:
            check_model_source(v)
        except CompressError as exc:
            raise ValueError(str(exc)) from None
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError(f"unknown device {v!r}; allowed: auto, cpu, cuda, cuda:N")


class CalibrationSpec(StrictModel):
    """Which calibration windows the data-driven steps see (compress/data/README.md)."""

    corpus: CorpusName = "bbc"  # for `domain`, name the target-domain corpus here (e.g. stdlib for code)
    split: Literal["train", "validation"] = "train"  # never the test split: that is for verify
    num_samples: int = Field(128, ge=1, le=1_000_000)
    seq_len: int = Field(512, ge=8, le=131_072)
    seed: int = 0
    batch_size: int = Field(8, ge=1, le=4096)
    activations: Literal["auto", "host", "device"] = Field(
        "auto", description="where the activations between blocks live: host (CPU RAM), device (the GPU), or auto: "
                            "the device when a block's inputs and outputs take at most a quarter of its free memory")
    strategy: Literal["random", "domain", "diversity", "kl"] = "random"
    pool_factor: int = Field(4, ge=1, le=64, description="diversity: pool = pool_factor x num_samples windows")
    candidates: int = Field(4, ge=1, le=64, description="kl: candidate sets (seeds seed..seed+candidates-1)")
    probe_corpus: CorpusName | None = None  # kl: probe text (validation split); defaults to `corpus`
    probe_samples: int = Field(128, ge=1, le=100_000)
    probe_seq_len: int = Field(64, ge=8, le=131_072)
    # Scoring a candidate with the full stage list costs candidates x (every step); scoring with the
    # steps that set the weights (e.g. [gptq] ahead of an adaquant refinement) is a cheaper proxy.
    kl_steps: list[str] | None = Field(None, description="kl: algorithms applied to score a candidate "
                                       "(default: every step of the recipe)")
    # Mixtures of experts (compress/moe.py); no effect on a dense model.
    expert_routing: Literal["routed", "all"] = Field(
        "routed", description="each expert's statistics from the tokens routed to it, or from every calibration "
                              "token (statistics only: the outputs stay the routed ones)")
    expert_min_tokens: int = Field(16, ge=0, le=1_000_000_000, description="routed: an expert that receives fewer "
                                   "tokens in a block takes its statistics from every token (reported per expert)")

    @model_validator(mode="after")
    def _kl_steps_need_kl(self) -> "CalibrationSpec":
        if self.kl_steps is not None and self.strategy != "kl":
            raise ValueError(f"kl_steps {self.kl_steps!r} only applies to strategy kl (strategy is "
                             f"{self.strategy!r})")
        return self

    @model_validator(mode="after")
    def _kl_probe_is_held_out(self) -> "CalibrationSpec":
        if self.strategy == "kl" and self.split == "validation" and self.probe_corpus in (None, self.corpus):
            raise ValueError("strategy kl scores candidates on the validation split of the probe corpus; "
                             "calibrating on that same split would score on the calibration text. "
                             "Use split: train or another probe_corpus")
        return self


class VerifySpec(StrictModel):
    corpus: CorpusName = "bbc"
    split: Literal["validation", "test"] = "test"
    seq_len: int = Field(512, ge=8, le=131_072)
    max_windows: int | None = Field(32, ge=1)
    batch_size: int = Field(1, ge=1, le=4096)
    baseline: bool = Field(True, description="also evaluate the model before any stage")
    topics: int = Field(0, ge=0, description="BBC test articles for zero-shot topic accuracy (0: skip)")
    # lm-evaluation-harness tasks on the model in memory (compress/harness/; the `eval` extra), zero-shot
    # over local data; "hellaswag,arc_easy" or a list. Names are checked here, before any work.
    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks, e.g. [hellaswag, arc_easy, bbc_topics]")
    task_limit: int | None = Field(None, ge=1, description="score a seeded subset of this many documents per task")

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, v: Any) -> Any:
        if v is None or v == []:
            return []
        try:
            return parse_task_list(v if isinstance(v, (str, list)) else str(v), where="task list")
        except CompressError as exc:
            raise ValueError(str(exc).removeprefix("task list: ")) from None


class ExportSpec(StrictModel):
    # compress.formats: hf: float safetensors; gptq: GPTQ v1 packed int (transformers via
    # optimum+gptqmodel, vLLM); compressed-tensors: pack-quantized (vLLM), uniform schemes only.
    format: Literal[tuple(FORMATS)] = "hf"  # type: ignore[valid-type]
    dtype: DTYPES | None = None  # None keeps the model's dtype
    # What vLLM (0.26, compress/formats/vllm.py) would refuse in this export — a GPTQ scheme or shape its
    # loader or kernels do not take: warn (and record it in report.json `serving`), require (refuse the
    # export, naming the layer, the kernel and the alternative), or off.
    vllm: Literal["warn", "require", "off"] = "warn"


def _step_union():
    if not ALGORITHMS:
        raise RuntimeError("no algorithm registered")
    configs = tuple(a.config for a in ALGORITHMS.values())
    return Annotated[Union[configs], Field(discriminator="algorithm")]  # type: ignore[valid-type]


Step = _step_union()


class Stage(StrictModel):
    name: str = Field(min_length=1)
    steps: list[Step] = Field(min_length=1)  # type: ignore[valid-type]


class Recipe(StrictModel):
    version: Literal[1] = RECIPE_VERSION
    model: ModelSpec  # required: no model is assumed
    calibration: CalibrationSpec | None = None
    # Empty only for measuring a model as it is (run_recipe without an export); compress.plan refuses
    # an empty recipe that exports (compress validate, compress run): it would write an unchanged copy.
    stages: list[Stage] = Field(default_factory=list)
    verify: VerifySpec | None = None
    export: ExportSpec = Field(default_factory=ExportSpec)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        return {"id": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _stage_names_unique(self) -> "Recipe":
        names = [s.name for s in self.stages]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {dup}")
        return self

    @model_validator(mode="after")
    def _kl_steps_in_recipe(self) -> "Recipe":
        c = self.calibration
        if c is None or c.kl_steps is None:
            return self
        present = self.algorithms()
        missing = [a for a in c.kl_steps if a not in present]
        if missing or not c.kl_steps:
            raise ValueError(f"calibration.kl_steps {c.kl_steps!r}: "
                             + (f"{missing} not among the recipe's steps {present}" if missing
                                else "empty (leave it out to score with every step)"))
        return self

    @classmethod
    def _error_text(cls, exc: ValidationError) -> str:
        # Recipe(...) built in Python reads as validate_recipe's and the CLI's errors do.
        return describe_validation_error(exc, "recipe", _describe)

    def algorithms(self) -> list[str]:
        """Every step's algorithm, in run order."""
        return [step.algorithm for s in self.stages for step in s.steps]

    def needs_calibration(self) -> bool:
        return any(ALGORITHMS[a].requires_calibration for a in self.algorithms())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(err: dict) -> str:
    if err["loc"] == ("model",) and err["type"] == "missing":  # pydantic's "Field required" says less
        return (f"model: the recipe names no model: give `model:` a zoo id ({', '.join(ZOO)}), a model folder "
                f"or a hub id")
    if err["type"] == "union_tag_not_found":
        return f"{format_loc(err['loc'])}: a step needs `algorithm:` (one of {', '.join(sorted(ALGORITHMS))})"
    return describe_error(err)


def validate_recipe(data: dict, *, origin: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(describe_validation_error(exc, origin, _describe)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data = read_recipe_dict(path)
    if overrides:
        apply_overrides(data, overrides)
    return validate_recipe(data, origin=str(path))
