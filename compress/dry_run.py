"""``compress run --dry-run``: what a recipe would do and what it would cost, without doing it.

The recipe is checked as ``compress validate`` checks it (schema, step order, targets against the
model's structure) and the output folder as ``compress run`` would; then the plan is printed: the
model's size (parameters from its safetensors headers, bytes on disk and in memory at the recipe's
dtype), the calibration set's tokens, each step with its settings and the modules it targets, the
verify tokens (and whether the float baseline is cached) and the export. Nothing is loaded, no
model is fetched, nothing is written.
"""
from __future__ import annotations

from pathlib import Path

from compress.algorithms import ALGORITHMS
from compress.baseline_cache import baseline_fingerprint, cached_baseline
from compress.export import check_out_dir
from compress.models import ZOO
from compress.plan import check_plan
from compress.recipe import CalibrationSpec, Recipe
from compress.sizes import DTYPE_BYTES, human_bytes, local_model_dir, safetensors_elements, weights_on_disk
from compress.structure import model_structure
from compress.targets import match_names

_LAYERWISE = "the calibration set, block by block"
_ALL_SETTINGS_UP_TO = 8  # a step config with more fields shows only those the recipe set


def plan_run(recipe: Recipe, *, out_dir: str | Path | None, force: bool = False,
             reuse_baseline: bool = True) -> dict:
    """The plan of ``run_recipe(recipe, out_dir=...)`` as plain data; raises what the run would
    raise before any work (a bad step order, targets matching nothing, an existing ``out_dir``)."""
    if out_dir is not None:
        check_out_dir(out_dir, force=force)
    structure, note = model_structure(recipe.model.id, trust_remote_code=recipe.model.trust_remote_code)
    check_plan(recipe, structure, exports=out_dir is not None)
    folder = local_model_dir(recipe.model.id)
    model: dict = {"id": recipe.model.id, "dtype": recipe.model.dtype, "device": recipe.model.device,
                   "folder": str(folder) if folder else None, "note": note or None,
                   "stream": recipe.model.stream is not None}
    if folder is not None:
        params = safetensors_elements(folder)
        model.update(parameters=params, disk_bytes=weights_on_disk(folder),
                     memory_bytes=params * DTYPE_BYTES[recipe.model.dtype])
    elif recipe.model.id in ZOO:
        model["fetch_bytes"] = ZOO[recipe.model.id].size  # fetched (and converted) first

    calibration = None
    if recipe.calibration is not None or recipe.needs_calibration():
        c = recipe.calibration or CalibrationSpec()
        calibration = {"corpus": c.corpus, "split": c.split, "strategy": c.strategy, "windows": c.num_samples,
                       "seq_len": c.seq_len, "tokens": c.num_samples * c.seq_len}
        if c.strategy == "diversity":
            calibration["selection_tokens"] = c.pool_factor * c.num_samples * c.seq_len  # the pool, embedded
        if c.strategy == "kl":
            calibration["candidates"] = c.candidates  # each: the steps on a copy, then the probe
            calibration["selection_tokens"] = (c.candidates + 1) * c.probe_samples * c.probe_seq_len

    steps = []
    for si, stage in enumerate(recipe.stages):
        for ki, step in enumerate(stage.steps):
            alg = ALGORITHMS[step.algorithm]
            where = f"stages[{si}].steps[{ki}]"
            settings = step.model_dump(mode="json", exclude={"algorithm", "targets", "ignore"})
            if len(settings) > _ALL_SETTINGS_UP_TO:  # a long config (s2ft): what the recipe changed
                settings = step.model_dump(mode="json", exclude_defaults=True,
                                           exclude={"algorithm", "targets", "ignore"})
            modules = None
            if structure is not None and alg.takes_targets:
                modules = len(match_names(structure.linears, step.targets, step.ignore, where=where))
            data = (_LAYERWISE if alg.requires_calibration
                    else f"{step.corpus}/{step.split}" if hasattr(step, "corpus") and hasattr(step, "split")
                    else "its own data" if hasattr(step, "corpus") else "no data")
            steps.append({"where": where, "stage": stage.name, "algorithm": alg.name, "settings": settings,
                          "modules": modules, "data": data})

    verify = None
    if recipe.verify is not None:
        v = recipe.verify
        verify = {"corpus": v.corpus, "split": v.split, "windows": v.max_windows, "seq_len": v.seq_len,
                  "tokens": v.max_windows * v.seq_len if v.max_windows else None, "topics": v.topics,
                  "baseline": "off"}
        if v.baseline:
            fingerprint = baseline_fingerprint(folder, dtype=recipe.model.dtype,
                                               device_type=_device_type(recipe.model.device), verify=v)
            hit = reuse_baseline and cached_baseline(fingerprint) is not None
            verify["baseline"] = "cached" if hit else "evaluated"
    return {"model": model, "calibration": calibration, "steps": steps, "verify": verify,
            "export": {"format": recipe.export.format, "out": str(out_dir) if out_dir is not None else None},
            "forward_tokens": _forward_tokens(calibration, steps, verify)}


def _forward_tokens(calibration: dict | None, steps: list[dict], verify: dict | None) -> int | None:
    """Tokens the run puts through the model in calibration and verify passes: the calibration set
    once per layer-wise step, the selection's own passes, verify once, and once more for a baseline
    not cached. Training steps' and recalibration's own data are not counted. None when verify
    scores a whole split (its size is known only once tokenized)."""
    total = 0
    if calibration is not None:
        layerwise = sum(s["data"] == _LAYERWISE for s in steps)
        total += calibration["tokens"] * layerwise + calibration.get("selection_tokens", 0)
    if verify is not None:
        if verify["tokens"] is None:
            return None
        total += verify["tokens"] * (2 if verify["baseline"] == "evaluated" else 1)
    return total


def _device_type(device: str) -> str:
    if device != "auto":
        return device.split(":")[0]
    import torch  # only to resolve `auto`, as the run would

    return "cuda" if torch.cuda.is_available() else "cpu"


def format_plan(plan: dict, recipe_path: str) -> str:
    m = plan["model"]
    lines = [f"{recipe_path}: valid; a dry run: nothing loaded, nothing written"]
    if "parameters" in m:
        lines.append(f"model        {m['id']}: {m['parameters'] / 1e6:,.1f}M parameters; "
                     f"{human_bytes(m['disk_bytes'])} on disk, {human_bytes(m['memory_bytes'])} "
                     + ("as " if m.get("stream") else "in memory as ")
                     + f"{m['dtype']} (device {m['device']})"
                     + ("; streamed: one block in memory at a time" if m.get("stream") else ""))
    else:
        fetch = f"; fetching downloads {human_bytes(m['fetch_bytes'])} first" if "fetch_bytes" in m else ""
        lines.append(f"model        {m['id']}: size unknown here ({m['note'] or 'not a local folder'}){fetch}")
    c = plan["calibration"]
    if c is not None:
        extra = ""
        if c["strategy"] == "diversity":
            extra = f"; choosing them embeds a pool of {c['selection_tokens']:,} tokens"
        if c["strategy"] == "kl":
            extra = (f"; choosing them runs the steps on {c['candidates']} candidate copies and scores "
                     f"{c['selection_tokens']:,} probe tokens")
        lines.append(f"calibration  {c['windows']} x {c['seq_len']} = {c['tokens']:,} tokens of "
                     f"{c['corpus']}/{c['split']} ({c['strategy']}){extra}")
    lines.append(f"steps        {len(plan['steps'])}")
    for s in plan["steps"]:
        settings = ", ".join(f"{k}={v}" for k, v in s["settings"].items()) or "default settings"
        on = f" on {s['modules']} linears" if s["modules"] is not None else ""
        lines.append(f"  {s['where']} [{s['stage']}] {s['algorithm']}{on}: {settings}; data: {s['data']}")
    v = plan["verify"]
    if v is not None:
        size = (f"{v['windows']} x {v['seq_len']} = {v['tokens']:,} tokens" if v["tokens"]
                else f"every {v['seq_len']}-token window")
        topics = f" and {v['topics']} BBC-topic articles" if v["topics"] else ""
        lines.append(f"verify       {size}{topics} of {v['corpus']}/{v['split']}, after the stages; "
                     f"float baseline: {v['baseline']}")
    if plan["forward_tokens"] is not None:
        lines.append(f"cost         about {plan['forward_tokens']:,} tokens through the model in calibration and "
                     f"verify passes (training and recalibration data not counted)")
    e = plan["export"]
    lines.append(f"export       {e['format']} -> {e['out']}" if e["out"] else "export       none")
    return "\n".join(lines)
