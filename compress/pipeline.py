"""Run a recipe: load, calibrate, apply the stages, verify, export. No global state."""
from __future__ import annotations

import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress.algorithms import ALGORITHMS, StepContext
from compress.export import check_out_dir, write_export
from compress.fs import write_json_atomic
from compress.models import load_model
from compress.recipe import Recipe, validate_recipe


@dataclass
class RunResult:
    model: torch.nn.Module
    tokenizer: Any
    recipe: Recipe  # fully resolved
    report: dict
    out_dir: Path | None = None
    artifacts: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from compress.errors import CompressError
        raise CompressError(f"model.device is {name!r} but CUDA is not available here; use auto or cpu")
    return torch.device(name)


def versions() -> dict:
    import transformers

    from compress import __version__
    return {"compress": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


class _Timer:
    """Wall time per phase and, on CUDA, the peak allocated device memory within each phase (the
    final move of the whole model to the device, after the stages, belongs to no phase)."""

    def __init__(self, device: torch.device | None = None):
        self.timings: dict[str, float] = {}
        self.peak_device_mb: dict[str, float] = {}
        self._cuda = device if device is not None and device.type == "cuda" else None

    @contextmanager
    def __call__(self, key: str):
        if self._cuda is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - t0, 3)
            if self._cuda is not None:
                peak = torch.cuda.max_memory_allocated(self._cuda) / 2**20
                self.peak_device_mb[key] = round(max(peak, self.peak_device_mb.get(key, 0.0)), 1)


def run_recipe(recipe: Recipe | dict, *, out_dir: str | Path | None = None, force: bool = False,
               progress: bool = True, log=print) -> RunResult:
    """Run every stage of ``recipe`` and (with ``out_dir``) export; returns the model and the report."""
    if not isinstance(recipe, Recipe):
        recipe = validate_recipe(recipe)
    if out_dir is not None:
        check_out_dir(out_dir, force=force)  # fail before the work, not after
    device = resolve_device(recipe.model.device)
    timer = _Timer(device)
    report: dict[str, Any] = {"model": {"source": recipe.model.id}, "stages": [], "versions": versions()}

    with timer("load"):
        loaded = load_model(recipe.model.id, dtype=recipe.model.dtype, device="cpu",
                            trust_remote_code=recipe.model.trust_remote_code, progress=progress)
    model, tokenizer = loaded.model, loaded.tokenizer
    report["model"].update(path=loaded.path, parameters=sum(p.numel() for p in model.parameters()),
                           dtype=recipe.model.dtype, device=str(device))
    # Layer-wise algorithms move one block at a time to the device; the rest go whole.
    if not recipe.needs_calibration():
        model.to(device)

    calib = None
    if recipe.calibration is not None or recipe.needs_calibration():
        from compress.data.selection import select_calibration_set
        from compress.recipe import CalibrationSpec
        spec = recipe.calibration or CalibrationSpec()  # defaults when a step needs data but none is given
        with timer("calibration_set"):
            selection = select_calibration_set(
                tokenizer, strategy=spec.strategy, source=spec.corpus, split=spec.split,
                num_samples=spec.num_samples, seq_len=spec.seq_len, seed=spec.seed, model=model, device=device,
                batch_size=spec.batch_size, pool_factor=spec.pool_factor, candidates=spec.candidates,
                probe_source=spec.probe_corpus, probe_samples=spec.probe_samples, probe_seq_len=spec.probe_seq_len,
                compress_fn=lambda c: _compressed_copy(model, recipe, c, tokenizer, device, spec.batch_size),
                progress=progress)
        calib = selection.calibration
        report["calibration"] = {**calib.fingerprint, "digest": calib.digest, "selection": selection.report}
        report["calibration"].pop("indices", None)  # long; the digest pins them
        if spec.strategy == "kl":
            report["calibration"]["selection"]["scored_with"] = spec.kl_steps or recipe.algorithms()
        log(f"calibration set {calib.digest} ({spec.strategy}): {spec.num_samples} x {spec.seq_len} tokens "
            f"from {spec.corpus}/{spec.split}")

    verify_text = None
    if recipe.verify is not None:
        from compress.data import corpus_text
        from compress.evaluate import window_token_ids
        v = recipe.verify
        verify_text = window_token_ids(tokenizer, corpus_text(v.corpus, v.split), v.seq_len, v.max_windows)
        if v.baseline:
            with timer("verify_baseline"):
                report["baseline"] = _verify(model, tokenizer, verify_text, v, device, progress)
            log(f"baseline: perplexity {report['baseline']['perplexity']:.3f}, ECE {report['baseline']['ece']:.4f}")

    ctx = StepContext(tokenizer=tokenizer, device=device, calibration=calib,
                      batch_size=recipe.calibration.batch_size if recipe.calibration else 8, progress=progress)
    report["stages"] = _apply_stages(model, recipe, ctx, log, timer)
    model.to(device)

    if recipe.verify is not None:
        with timer("verify"):
            report["verify"] = _verify(model, tokenizer, verify_text, recipe.verify, device, progress,
                                       calibrator=ctx.artifacts.get("calibrator"))
        if "baseline" in report:  # the before/after pair in one place, as the recipes' reports promise
            for key in ("ece", "perplexity", "accuracy", "topics_ece"):
                if key in report["baseline"]:
                    report["verify"][f"{key}_before"] = report["baseline"][key]
        log(f"verify: perplexity {report['verify']['perplexity']:.3f}, ECE {report['verify']['ece']:.4f}")
    report["timings"] = timer.timings
    if timer.peak_device_mb:
        report["peak_device_mb"] = timer.peak_device_mb

    written = None
    if out_dir is not None:
        with timer("export"):
            written = write_export(model, tokenizer, out_dir, spec=recipe.export, recipe_yaml=recipe.to_yaml(),
                                   report=report, artifacts=ctx.artifacts, force=force)
        report["timings"] = timer.timings
        write_json_atomic(written / "report.json", report)  # now with the export's own time
    return RunResult(model, tokenizer, recipe, report, written, ctx.artifacts)


def _apply_stages(model, recipe: Recipe, ctx: StepContext, log, timer=None) -> list[dict]:
    ctx.keep_float_weights = any(ALGORITHMS[step.algorithm].uses_float_weights
                                 for s in recipe.stages for step in s.steps)
    reports = []
    for si, stage in enumerate(recipe.stages):
        stage_report = {"name": stage.name, "steps": []}
        with timer(f"stage:{stage.name}") if timer else nullcontext():
            for ki, step in enumerate(stage.steps):
                ctx.where = f"stages[{si}].steps[{ki}] ({step.algorithm})"
                t0 = time.perf_counter()
                log(f"stage {stage.name!r}: {step.algorithm}")
                result = ALGORITHMS[step.algorithm].apply(model, step, ctx)
                stage_report["steps"].append({"algorithm": step.algorithm, "config": step.model_dump(mode="json"),
                                              "seconds": round(time.perf_counter() - t0, 3), **result})
        reports.append(stage_report)
    return reports


def _compressed_copy(model, recipe: Recipe, calib, tokenizer, device, batch_size) -> torch.nn.Module:
    """KL-guided selection: the recipe's stages (only ``calibration.kl_steps`` if given) applied to a
    copy, with one candidate set."""
    import copy
    keep = recipe.calibration.kl_steps if recipe.calibration else None
    if keep is not None:
        stages = [s.model_copy(update={"steps": [st for st in s.steps if st.algorithm in keep]})
                  for s in recipe.stages]
        recipe = recipe.model_copy(update={"stages": [s for s in stages if s.steps]})
    clone = copy.deepcopy(model)
    ctx = StepContext(tokenizer=tokenizer, device=device, calibration=calib, batch_size=batch_size, progress=False)
    _apply_stages(clone, recipe, ctx, log=lambda *_: None)
    return clone


def _verify(model, tokenizer, windows, spec, device, progress, calibrator=None) -> dict:
    """Perplexity / NLL / ECE on the verify windows (and BBC topics), through a recalibrate step's
    calibrator where it applies (tokens or topics target); the raw numbers then sit under ``uncalibrated``."""
    from compress.evaluate import evaluate_windows, on_device
    target = calibrator.target if calibrator is not None else None
    with on_device(model, device):  # a layer-wise stage may keep the model on the CPU until it runs
        out = evaluate_windows(model, windows, batch_size=spec.batch_size, device=device, progress=progress,
                               calibrator=calibrator if target == "tokens" else None)
        out.update(corpus=spec.corpus, split=spec.split)
        if spec.topics:
            from compress.tasks import bbc_topic_examples, topic_accuracy
            topics = topic_accuracy(model, tokenizer, bbc_topic_examples("test", max_examples=spec.topics),
                                    device=device, batch_size=8, progress=progress,
                                    calibrator=calibrator if target == "topics" else None)
            out.update(accuracy=topics["accuracy"], topics_ece=topics["ece"],
                       topics={k: topics[k] for k in ("examples", "ece", "uncalibrated") if k in topics})
    if calibrator is not None:
        out["calibrator"] = calibrator.describe()
    return out
