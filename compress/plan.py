"""A recipe's steps checked in order against what each declares (``compress.state.Fact``) — before
any work, and without torch.

Rules, for each step in run order:
  - its targets match some linear of the model (when the model's structure is known);
  - what it *needs* an earlier step produced — module by module for per-module facts when the
    structure is known (``adaquant`` needs quantized levels for each of its targets);
  - it does not *invalidate* what an earlier step produced (a step that changes the weights after
    ``gptq`` would leave packed levels of another model; after ``recalibrate``, a calibrator fitted
    on another model);
  - a fact an export ships one of (the calibrator) is produced once.
and at the end, the export format's needs are met (``gptq`` packs quantized levels).

Errors name the step(s) by YAML path and algorithm.
"""
from __future__ import annotations

from compress.algorithms import ALGORITHMS
from compress.errors import CompressError, RecipeError
from compress.formats import get_format
from compress.harness.catalog import check_lm_eval_installed
from compress.state import Fact
from compress.structure import Structure
from compress.targets import match_names

# Where a producer of the fact stands in a recipe, for "put X before ...".
_MADE_IN = {Fact.QUANTIZED: "the quantization stage", Fact.FLOAT_WEIGHTS: "the quantization stage",
            Fact.ADAPTER: "the s2ft step", Fact.CALIBRATOR: "the recalibrate step",
            Fact.DRAFTER_HEADS: "the self_spec step", Fact.ROTATED: "the rotate step"}


def check_plan(recipe, structure: Structure | None = None, *, exports: bool = True) -> None:
    """Raise a RecipeError naming the first step (and the earlier one it clashes with) whose place in
    ``recipe`` cannot work; with ``structure``, targets are matched and needs checked per module.
    ``exports``: the run writes an export (``compress run`` always does), so it must change something."""
    if exports and not recipe.stages:
        raise RecipeError("stages: the recipe has no stage, so it would export an unchanged copy of the model: give "
                          "`stages:` at least one stage with one step (to evaluate a model as it is, use "
                          "`compress eval`)")
    if recipe.model.stream is not None:
        check_stream(recipe)
    produced: dict[Fact, str] = {}  # fact -> the last step that produced it ("stages[0].steps[1] (gptq)")
    per_module: dict[Fact, set[str]] = {f: set() for f in Fact if f.per_module}
    for si, stage in enumerate(recipe.stages):
        for ki, step in enumerate(stage.steps):
            alg = ALGORITHMS[step.algorithm]
            where = f"stages[{si}].steps[{ki}] ({alg.name})"
            modules = None
            if structure is not None and alg.takes_targets:
                try:
                    modules = match_names(structure.linears, step.targets, step.ignore, where=where)
                except CompressError as exc:  # no module matched, or a bad regular expression
                    raise RecipeError(str(exc)) from None
            for fact in _in_order(alg.needs):
                _check_need(fact, where, modules, produced, per_module)
            for fact in _in_order(alg.invalidates):
                if fact in produced:
                    raise RecipeError(f"{where} comes after {produced[fact]}, which produced {fact.what} for the "
                                      f"model as it was; {alg.name} changes the model; put {alg.name} before "
                                      f"{_MADE_IN[fact]}")
            for fact in _in_order(alg.produces):
                if fact.one_per_recipe and fact in produced:
                    raise RecipeError(f"{where}: {produced[fact]} already fitted a calibrator; a recipe ships one "
                                      f"(put a single {alg.name} step after the compressing steps)")
                produced[fact] = where
                if fact.per_module:
                    per_module[fact].update(modules if modules is not None else ["*"])
    if recipe.verify is not None and recipe.verify.tasks:
        check_lm_eval_installed("verify.tasks")  # the names were checked with the schema
    fmt = get_format(recipe.export.format)
    for fact in _in_order(fmt.needs):
        if fact not in produced:
            raise RecipeError(f"export.format {fmt.name} packs {fact.what}, but no step produces them: "
                              f"run {_producers(fact)} before exporting format {fmt.name}, or export format hf")


def _in_order(facts) -> list[Fact]:
    return sorted(facts, key=list(Fact).index)


def _check_need(fact: Fact, where: str, modules, produced, per_module) -> None:
    have = per_module.get(fact, set())
    if fact.per_module and modules is not None and "*" not in have:
        missing = [m for m in modules if m not in have]
        if missing and fact is Fact.QUANTIZED:
            raise RecipeError(f"{where}: module {missing[0]} has no quantization result; run rtn or gptq first "
                              f"(an earlier step of the same recipe that targets it)")
        if missing:
            raise RecipeError(f"{where}: no float weight was kept for module {missing[0]}; run rtn or gptq first "
                              f"in the same recipe (run_recipe keeps float weights for steps that use them)")
    elif fact not in produced:
        raise RecipeError(f"{where} needs {fact.what}, which no earlier step produces; run {_producers(fact)} first")


def _producers(fact: Fact) -> str:
    """The algorithms that produce ``fact`` from nothing (not those that refine it), for advice."""
    names = [a.name for a in ALGORITHMS.values() if fact in a.produces and fact not in a.needs]
    return " or ".join(names) if names else "a step that produces it"


# Steps that work one decoder block at a time (compress/stream.py can run them streamed). Anything
# else needs the whole model at once: NIRVANA and the other pruners score every block together
# (gradients through the whole network), s2ft trains through it, recalibrate and self_spec fit on
# its outputs.
STREAMING_STEPS = ("rtn", "gptq", "gptq_mixed", "adaquant", "bias_correction")
PASSES_BY_STEP = {"gptq_mixed": 2}  # walks over the blocks per step (its probe, then its solve); others: one


def check_stream(recipe) -> None:
    """``model.stream``: every step layer-wise, a GPTQ export, nothing that needs the whole model."""
    for si, stage in enumerate(recipe.stages):
        for ki, step in enumerate(stage.steps):
            where = f"stages[{si}].steps[{ki}] ({step.algorithm})"
            if step.algorithm not in STREAMING_STEPS:
                raise RecipeError(f"{where}: {step.algorithm} needs the whole model at once, so it cannot run on a "
                                  f"streamed model (model.stream); streaming runs the layer-wise steps "
                                  f"{', '.join(STREAMING_STEPS)}. Drop model.stream (the model is then loaded "
                                  f"whole) or the step")
            if getattr(step, "asymmetric", False):
                # GPTAQ's float twin runs beside every block; a resumed stream skips finished blocks without
                # advancing it, so the float inputs it pairs would be the wrong ones
                raise RecipeError(f"{where}: asymmetric (GPTAQ) is not supported on a streamed model yet; drop "
                                  f"model.stream or asymmetric")
            if step.algorithm == "gptq_mixed" and step.sensitivity == "loss":
                raise RecipeError(f"{where}: sensitivity loss measures the whole model's loss per candidate; on a "
                                  f"streamed model use sensitivity: layer")
    if recipe.export.format != "gptq":
        raise RecipeError(f"export.format {recipe.export.format}: a streamed model is written block by block in "
                          f"the GPTQ v1 layout; use export.format gptq (or drop model.stream)")
    if recipe.verify is not None:
        raise RecipeError("verify: evaluating needs the whole model, which a streamed run never holds; drop verify "
                          "and evaluate the export afterwards (compress eval OUT_DIR)")
    c = recipe.calibration
    if c is not None and c.strategy not in ("random", "domain"):
        raise RecipeError(f"calibration.strategy {c.strategy}: it runs the whole model to choose the windows; a "
                          f"streamed run takes strategy random or domain")
