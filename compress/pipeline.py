"""Run a recipe: load, calibrate, apply the stages, verify, export. No global state.

Resuming an interrupted run: in memory, the stages run and the export is written at the end, so an
interrupted run starts over — except the float baseline, which is cached across runs
(``compress/baseline_cache.py``). A streamed run (``model.stream``, ``compress/stream_run.py``)
writes every block as it finishes and resumes at the first block not written (``compress/stream.py``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from compress.algorithms import StepContext
from compress.baseline_cache import baseline_fingerprint, cached_baseline, fingerprint_key, store_baseline
from compress.data import corpus_text
from compress.data.selection import select_calibration_set
from compress.distributed import current, gather_json, is_main, rank_device, wait_for_main
from compress.errors import CompressError
from compress.evaluate import window_token_ids
from compress.export import check_out_dir, write_export
from compress.harness.catalog import check_lm_eval_installed
from compress.measure import verify
from compress.models import load_model
from compress.plan import check_plan
from compress.recipe import CalibrationSpec, Recipe, validate_recipe
from compress.sizes import module_bytes, size_change, weights_on_disk
# resolve_device and versions live in compress.runtime; they are imported here too, where callers
# have always found them.
from compress.runtime import resolve_device, versions
from compress.stages import PhaseTimer, RunResult, apply_stages, configure_model
from compress.structure import remember_structure, structure_of

__all__ = ["RunResult", "resolve_device", "run_recipe", "versions"]


def run_recipe(recipe: Recipe | dict, *, out_dir: str | Path | None = None, force: bool = False,
               progress: bool = True, log=print, reuse_baseline: bool = True) -> RunResult:
    """Run every stage of ``recipe`` and (with ``out_dir``) export; returns the model and the report.

    ``reuse_baseline``: take verify's float baseline from the cache when an earlier run of the same
    model and verify settings stored it (``compress/baseline_cache.py``); it is stored either way."""
    if not isinstance(recipe, Recipe):
        recipe = validate_recipe(recipe)
    if recipe.model.stream is not None:  # one block at a time, never the whole model (compress/stream.py)
        if out_dir is None:
            raise CompressError("model.stream writes the compressed model as it goes: give an output folder")
        from compress.stream_run import run_streaming

        return run_streaming(recipe, out_dir=out_dir, force=force, progress=progress, log=log)
    if out_dir is not None:
        check_out_dir(out_dir, force=force)  # fail before the work, not after
    if recipe.verify is not None and recipe.verify.tasks:
        check_lm_eval_installed("verify.tasks")  # before loading the model (check_plan runs after)
    device = rank_device(resolve_device(recipe.model.device))  # under torchrun: this rank's GPU
    if not is_main():  # under torchrun, rank 0 speaks, evaluates and exports (compress.distributed)
        log, progress = (lambda *_: None), False
    timer = PhaseTimer(device)
    report: dict[str, Any] = {"model": {"source": recipe.model.id}, "stages": [], "versions": versions()}
    if current() is not None:
        report["distributed"] = current().describe()

    with timer("load"):
        loaded = load_model(recipe.model.id, dtype=recipe.model.dtype, device="cpu",
                            trust_remote_code=recipe.model.trust_remote_code, progress=progress)
    model, tokenizer = loaded.model, loaded.tokenizer
    configure_model(model, recipe)
    structure = structure_of(model)
    check_plan(recipe, structure, exports=out_dir is not None)  # order and targets, before any work
    remember_structure(loaded.path, structure)  # so that validating a recipe for this model builds nothing
    report["model"].update(path=loaded.path, parameters=sum(p.numel() for p in model.parameters()),
                           dtype=recipe.model.dtype, device=str(device))
    size_before = {"memory_bytes": module_bytes(model),
                   "disk_bytes": weights_on_disk(loaded.path) if Path(loaded.path).is_dir() else None}
    # Layer-wise algorithms move one block at a time to the device; the rest go whole.
    if not recipe.needs_calibration():
        model.to(device)

    calib = None
    if recipe.calibration is not None or recipe.needs_calibration():
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

    verify_windows = None
    if recipe.verify is not None:
        v = recipe.verify
        verify_windows = window_token_ids(tokenizer, corpus_text(v.corpus, v.split), v.seq_len, v.max_windows)
        if v.baseline and is_main():
            fingerprint = baseline_fingerprint(loaded.path, dtype=recipe.model.dtype, device_type=device.type,
                                               verify=v)
            cached = cached_baseline(fingerprint) if reuse_baseline else None
            if cached is not None:
                report["baseline"] = cached
                log(f"baseline (cached from an earlier run): perplexity {cached['perplexity']:.3f}, "
                    f"ECE {cached['ece']:.4f}")
            else:
                with timer("verify_baseline"):
                    report["baseline"] = verify(model, tokenizer, verify_windows, v, device, progress,
                                                desc="baseline")
                store_baseline(fingerprint, report["baseline"])
                log(f"baseline: perplexity {report['baseline']['perplexity']:.3f}, "
                    f"ECE {report['baseline']['ece']:.4f}")
            if fingerprint is not None:
                report["baseline_cache"] = {"hit": cached is not None, "key": fingerprint_key(fingerprint)}
    wait_for_main()  # the other ranks, while rank 0 evaluates the baseline

    ctx = StepContext(tokenizer=tokenizer, device=device, calibration=calib,
                      batch_size=recipe.calibration.batch_size if recipe.calibration else 8, progress=progress,
                      activations=recipe.calibration.activations if recipe.calibration else "auto")
    report["stages"] = apply_stages(model, recipe, ctx, log, timer)
    if current() is not None:  # each rank's own times and peak memory so far (the rest of the report: rank 0's)
        report["distributed"]["ranks"] = gather_json({"timings": timer.timings, "peak_host_mb": timer.peak_host_mb,
                                                      "peak_device_mb": timer.peak_device_mb})
    model.to(device)

    if recipe.verify is not None and is_main():
        with timer("verify"):
            report["verify"] = verify(model, tokenizer, verify_windows, recipe.verify, device, progress,
                                      calibrator=ctx.state.calibrator, desc="verify")
        if "baseline" in report:  # the before/after pair in one place, as the recipes' reports promise
            for key in ("ece", "perplexity", "accuracy", "topics_ece", "tasks"):
                if key in report["baseline"]:
                    report["verify"][f"{key}_before"] = report["baseline"][key]
        log(f"verify: perplexity {report['verify']['perplexity']:.3f}, ECE {report['verify']['ece']:.4f}")
    report["timings"] = timer.timings
    if timer.peak_device_mb:
        report["peak_device_mb"] = timer.peak_device_mb
    report["peak_host_mb"] = timer.peak_host_mb
    if not timer.host_per_phase:
        report["peak_host_per_phase"] = False  # each figure: the process's peak up to that phase's end
    report["size"] = size_change(size_before, {"memory_bytes": module_bytes(model)})

    written = None
    if out_dir is not None and is_main():
        def final_report(folder: Path) -> dict:
            # Called by the export once the weights are in ``folder``, so that report.json, written
            # once, carries the export's own time, peak memory and size on disk.
            timer.stop()
            after = {**report["size"]["after"], "disk_bytes": weights_on_disk(folder, recursive=True)}
            report["size"] = size_change(size_before, after)
            return report

        timer.start("export")
        written = write_export(model, tokenizer, out_dir, spec=recipe.export, recipe_yaml=recipe.to_yaml(),
                               report=final_report, state=ctx.state, force=force, progress=progress)
    wait_for_main()  # the other ranks, until rank 0 has written the export
    return RunResult(model, tokenizer, recipe, report, written, ctx.state)


def _compressed_copy(model, recipe: Recipe, calib, tokenizer, device, batch_size) -> torch.nn.Module:
    """KL-guided selection: the recipe's stages (only ``calibration.kl_steps`` if given) applied to a
    copy, with one candidate set."""
    keep = recipe.calibration.kl_steps if recipe.calibration else None
    if keep is not None:
        stages = [s.model_copy(update={"steps": [st for st in s.steps if st.algorithm in keep]})
                  for s in recipe.stages]
        recipe = recipe.model_copy(update={"stages": [s for s in stages if s.steps]})
    clone = copy.deepcopy(model)
    ctx = StepContext(tokenizer=tokenizer, device=device, calibration=calib, batch_size=batch_size, progress=False)
    apply_stages(clone, recipe, ctx, log=lambda *_: None)
    return clone
