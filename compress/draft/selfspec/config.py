"""The ``self_spec`` step's typed config, and its registration with the ``self-spec`` export format.

Plain pydantic: the recipe schema is built from it without importing torch; the step and the
format's writer are named (``step.py``) and imported when they first run. The step leaves the
target unchanged and produces exit heads (``Fact.DRAFTER_HEADS``), which the ``self-spec`` export
writes — that export holds no model, so it has no model loader.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator, model_validator

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
    exit_layers: list[int] = Field(default_factory=lambda: [4], min_length=1,
                                   description="one head per depth k (the target blocks the drafter shares); 0 "
                                               "(no shared block: the head reads the token's embedding) needs "
                                               "context: deep")
    vocab_size: int | None = Field(32768, ge=16, description="trimmed LM head size; null for the full vocabulary")
    full_vocab_layers: list[int] = Field(default_factory=list, description="extra full-vocabulary heads")
    train_corpora: list[CorpusName] = Field(default_factory=lambda: ["stdlib"], min_length=1)
    train_windows: int = Field(1024, ge=1, description="windows of seq_len tokens per corpus (train split)")
    eval_windows: int = Field(24, ge=2, description="held-out windows per corpus (validation split)")
    exclude_prompts: list[str] = Field(default_factory=list,
                                       description="prompt files (blank-line separated) whose documents are kept out "
                                                   "of training: a benchmark's prompts must be unseen text")
    seq_len: int = Field(512, ge=16, le=8192)
    train_source: Literal["corpus", "generations", "mixed"] = Field(
        "corpus", description="what the heads are distilled on: corpus windows (seq_len tokens each); "
                              "generations: the target's own greedy continuations (generate_tokens) of the first "
                              "prompt_tokens of each training window (self-distillation, as Medusa-2 and EAGLE), "
                              "the text the drafter meets at decode time; mixed: both, every corpus window and its "
                              "continuation in one pool")
    generation_prompts: Literal["window_starts", "unit_ends", "units"] = Field(
        "window_starts", description="where the generations' prompts come from: window_starts, the first "
                                     "prompt_tokens of each training window; unit_ends, the prompt_tokens of text "
                                     "ending where a unit ends, as a user's prompt does (after a function's or "
                                     "class's docstring in Python source, after a paragraph in other text); units, "
                                     "the unit alone, as the draft bench's prompts are (a function's header and "
                                     "docstring, dedented; an article's title and first paragraph), of up to "
                                     "prompt_tokens tokens, each continued to seq_len tokens in all. unit_ends and "
                                     "units: train_windows of them per corpus (eval_windows for the held-out "
                                     "generations)")
    prompt_tokens: int | None = Field(None, ge=1, description="prompt length of the generations (training with "
                                      "train_source: generations or mixed, and the held-out generations); null: "
                                      "seq_len // 4")
    generate_tokens: int | None = Field(None, ge=1, le=8192, description="greedy tokens generated per prompt; null: "
                                        "seq_len - prompt_tokens (a sequence as long as a corpus window)")
    generate_batch_size: int = Field(32, ge=1, description="prompts continued together (KV cache, one batch at a "
                                                           "time)")
    generation_cache: bool = Field(True, description="keep the target's continuations in COMPRESS_CACHE/generations "
                                   "and read them back when the target, dtype, device type, torch and transformers, "
                                   "prompts, length and batch size are the same (generation_cache.py)")
    eval_generations: bool = Field(True, description="also report the depth curve on the target's greedy "
                                                     "continuations of the held-out windows' prompts")
    eval_first_tokens: int | None = Field(128, ge=1, description="with eval_generations, the same curve again on "
                                          "each continuation's first N tokens (a draft bench's length: long "
                                          "greedy continuations settle into repeats); null skips it")
    learning_curve_every: int = Field(0, ge=0, description="every N training steps (and the last), each head's "
                                      "first-draft agreement and alpha on the held-out continuations and on as many "
                                      "training ones, each cut to eval_first_tokens (training.learning_curve: does "
                                      "acceptance still climb, and does the training text pull away from the "
                                      "held-out?); 0: off. Needs eval_generations")
    context: Literal["shallow", "deep"] = Field(
        "shallow", description="what the exit heads read: shallow, the state after the exit block only (Kangaroo); "
                               "deep, also the target's final state of the previous position, which verification "
                               "has computed (EAGLE's features on the shared prefix; head.py)")
    head_init: Literal["auto", "last", "next"] = Field(
        "auto", description="the target block each head starts as: last, whose output the final norm and LM head "
                            "read; next, block k itself (the one the head stands in for), whose input is the h_k "
                            "the head reads (at depth 0 the token's embedding); auto: next at depth 0, last deeper")
    lm_rows: Literal["frozen", "trained"] = Field(
        "frozen", description="the heads' trimmed LM-head rows: frozen, the target's (re-gathered at load time); "
                              "trained, starting as the target's and trained with the head, then saved with it "
                              "(vocab_size x hidden more per head file): capacity a draft does not pay for")
    unroll: int = Field(3, ge=1, le=8, description="deep context: drafts of a round trained together (the later ones "
                                                   "read the head's own states, as at decode time)")
    shallow_layers: list[int] = Field(default_factory=list, description="deep context: extra shallow heads (named "
                                      "k<N>-shallow) trained on the same batches, for comparison")
    mid_layers: list[int] = Field(default_factory=list, description="deep context: extra deep heads (named k<N>-mid) "
                                  "that also read the target's state after block mid_depth of the previous position "
                                  "(EAGLE-3's middle layer), trained on the same batches, for comparison")
    mid_depth: int | None = Field(None, ge=2, description="the block whose output the k<N>-mid heads read; null: "
                                                          "half the target's blocks")
    steps: int = Field(600, ge=1)
    teacher_cache: Literal["auto", "off"] = Field(
        "auto", description="auto: the target runs over the training text once and the steps read what it gave "
                            "(on the device, else the host, where it fits; teacher.py); off: the target runs every step")
    tf32: bool = Field(True, description="on CUDA, the heads' float32 training products on TF32 tensor cores")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0, le=1)
    argmax_weight: float = Field(0.0, ge=0, le=1, description="share of the loss on the target's most likely token "
                                 "(hard cross-entropy) beside its whole distribution (soft): greedy verification "
                                 "accepts on that token alone")
    gammas: list[int] = Field(default_factory=lambda: [2, 3, 4, 5, 6], min_length=1)
    gamma: int | None = Field(None, description="the draft length the export ships (one of gammas); null: the one "
                                                "with the best predicted speedup on the held-out continuations' first "
                                                "eval_first_tokens (on the corpus windows without eval_generations)")
    calibrator: Literal["platt", "isotonic", "temperature", "hcal"] | None = "platt"
    seed: int = 0

    @field_validator("exit_layers", "full_vocab_layers", "shallow_layers", "mid_layers")
    @classmethod
    def _not_negative(cls, v: list[int]) -> list[int]:
        bad = [k for k in v if k < 0]
        if bad:
            raise ValueError(f"exit layers must be >= 0 (blocks the drafter runs), got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _depth_zero_is_deep(self) -> "SelfSpecConfig":
        # at depth 0 the drafter runs no block: a head there reads the token's embedding, and only a deep
        # head also reads what the target made of the context (EAGLE's head, on the target's embedding)
        zero = 0 in self.exit_layers or 0 in self.full_vocab_layers
        if 0 in self.shallow_layers or (zero and self.context != "deep"):
            raise ValueError("exit layer 0 (no shared block: the head reads the token's embedding) needs context: "
                             "deep; a shallow head there is a bigram table")
        return self

    @model_validator(mode="after")
    def _curve_needs_held_out(self) -> "SelfSpecConfig":
        if self.learning_curve_every and not self.eval_generations:
            raise ValueError(f"learning_curve_every ({self.learning_curve_every}) scores the heads on the held-out "
                             f"continuations during training: set eval_generations: true, or learning_curve_every: 0")
        return self

    @model_validator(mode="after")
    def _shallow_beside_deep(self) -> "SelfSpecConfig":
        if self.shallow_layers and self.context != "deep":
            raise ValueError("shallow_layers adds shallow heads beside deep ones: set context: deep, or list the "
                             "depths in exit_layers")
        if self.mid_layers and self.context != "deep":
            raise ValueError("mid_layers adds deep heads that also read a middle block: set context: deep")
        if self.mid_depth is not None and not self.mid_layers:
            raise ValueError(f"mid_depth ({self.mid_depth}) is for the heads of mid_layers, and there are none")
        return self

    @model_validator(mode="after")
    def _generation_lengths(self) -> "SelfSpecConfig":
        if self.prompt_tokens is not None and self.prompt_tokens >= self.seq_len:
            raise ValueError(f"prompt_tokens ({self.prompt_tokens}) must be below seq_len ({self.seq_len}): a "
                             f"prompt is the first prompt_tokens of a seq_len-token window")
        if self.generation_prompts == "units" and self.generate_tokens is not None:
            raise ValueError(f"generate_tokens ({self.generate_tokens}): with generation_prompts: units each prompt "
                             f"is continued to seq_len ({self.seq_len}) tokens in all; leave generate_tokens unset")
        p, g = self.generation_shape
        if p + g > 8192:
            raise ValueError(f"generate_tokens: prompt_tokens + generate_tokens = {p} + {g} exceeds 8192 tokens")
        if self.train_source == "mixed" and p + g != self.seq_len:
            raise ValueError(f"train_source: mixed pools corpus windows and continuations of one length: "
                             f"prompt_tokens + generate_tokens = {p} + {g} must equal seq_len ({self.seq_len})")
        return self

    @model_validator(mode="after")
    def _gamma_scored(self) -> "SelfSpecConfig":
        # the curve and the stop's replay score only the listed draft lengths
        if self.gamma is not None and self.gamma not in self.gammas:
            raise ValueError(f"gamma ({self.gamma}) must be one of gammas {self.gammas}: only those are scored")
        return self

    @property
    def generation_shape(self) -> tuple[int, int]:
        """(prompt tokens, generated tokens) of a generated sequence, defaults resolved."""
        p = self.seq_len // 4 if self.prompt_tokens is None else self.prompt_tokens
        return p, self.seq_len - p if self.generate_tokens is None else self.generate_tokens

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
