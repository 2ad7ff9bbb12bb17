"""``run_recipe`` for a recipe with ``model.stream``: the model is never loaded whole.

The same steps as the in-memory run (``compress.stages.apply_stages``), on a skeleton whose
blocks a ``StreamSource`` reads, and an export written block by block (``compress.stream_export``).
A mixture of experts is split on the skeleton as a loaded model is (``compress.moe.split_experts``);
the checkpoint is read under the split model's names (``compress.checkpoint_names``).
What needs the whole model is refused before any work (``compress.plan.check_stream``).

Under torchrun (``compress.distributed``) every rank streams the blocks and shares the runner's work
as in memory; rank 0 alone speaks, writes the work folder (``compress.stream``) and the export,
and removes the work folder; the other ranks wait for it at the end.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from compress.algorithms import StepContext
from compress.checkpoint import Checkpoint, skeleton
from compress.checkpoint_names import ModelCheckpoint
from compress.distributed import current, gather_json, is_main, rank_device, wait_for_main
from compress.errors import CompressError
from compress.export import check_out_dir
from compress.models import load_tokenizer, parse_dtype, resolve_model_dir
from compress.moe import split_experts
from compress.plan import PASSES_BY_STEP, check_plan
from compress.recipe import CalibrationSpec, Recipe, validate_recipe
from compress.runner import BLOCK_SOURCE
from compress.runtime import resolve_device, versions
from compress.sizes import size_change, weights_on_disk
from compress.stream import StreamSource, block_layout_path, fingerprint, work_dir_for
from compress.stream_export import ShardWriter, finish_export, tied_output_names
from compress.structure import remember_structure, structure_of


def run_streaming(recipe: Recipe | dict, *, out_dir: str | Path, force: bool = False, progress: bool = True,
                  log=print, calibration=None, checkpoint: Checkpoint | None = None, on_block=None):
    """Compress ``recipe``'s model block by block into ``out_dir`` (see the module docstring);
    returns a ``compress.stages.RunResult`` whose model is the skeleton (no weights).

    ``calibration``: a ready ``CalibrationSet`` instead of the recipe's (the scale benchmark feeds
    random token ids to a checkpoint that has no tokenizer). ``checkpoint``: where the tensors come
    from instead of the model folder's safetensors (anything with ``keys``, ``get``, ``in``: the
    benchmark generates a 70B-shaped model from a seed). ``on_block(pass_index, i)``: called once
    block ``i`` of a pass is written (the benchmark's per-block clock; tests interrupt there)."""
    from compress.stages import PhaseTimer, RunResult, apply_stages, configure_model

    if not isinstance(recipe, Recipe):
        recipe = validate_recipe(recipe)
    out = check_out_dir(out_dir, force=force).resolve()
    device = rank_device(resolve_device(recipe.model.device))  # under torchrun: this rank's GPU
    if not is_main():  # rank 0 speaks (compress.distributed)
        log, progress = (lambda *_: None), False
    dtype = parse_dtype(recipe.model.dtype)
    timer = PhaseTimer(device)
    report: dict[str, Any] = {"model": {"source": recipe.model.id, "stream": recipe.model.stream.model_dump()},
                              "stages": [], "versions": versions()}
    if current() is not None:
        report["distributed"] = current().describe()
    with timer("load"):
        folder = resolve_model_dir(recipe.model.id, progress=progress)
        stored = checkpoint if checkpoint is not None else Checkpoint(folder)
        model = skeleton(folder, dtype, trust_remote_code=recipe.model.trust_remote_code)
        split_experts(model)  # a mixture of experts: per-expert linears, as a model loaded whole has them
        checkpoint = ModelCheckpoint(stored, model)  # read by the model's names, whatever the stored layout
        configure_model(model, recipe)
        structure = structure_of(model)
        check_plan(recipe, structure, exports=True)
        remember_structure(folder, structure)
        layout = block_layout_path(model)
        tied = tied_output_names(model)
        blocks = model.get_submodule(layout)
        _materialise_outside(model, blocks, checkpoint, dtype, tied, device)
        checkpoint.close()  # the blocks are read one at a time from here (StreamSource.acquire)
        tokenizer = load_tokenizer(folder) if calibration is None else None
    report["model"].update(path=folder, parameters=sum(p.numel() for p in model.parameters()),
                           dtype=recipe.model.dtype, device=str(device))
    size_before = {"memory_bytes": None, "disk_bytes": weights_on_disk(folder)}

    if calibration is None:
        spec = recipe.calibration or CalibrationSpec()
        from compress.data.selection import select_calibration_set

        with timer("calibration_set"):
            calibration = select_calibration_set(
                tokenizer, strategy=spec.strategy, source=spec.corpus, split=spec.split,
                num_samples=spec.num_samples, seq_len=spec.seq_len, seed=spec.seed, progress=progress).calibration
    report["calibration"] = {**calibration.fingerprint, "digest": calibration.digest}
    report["calibration"].pop("indices", None)

    export_dtype = getattr(torch, recipe.export.dtype or "float16")
    if export_dtype != torch.float16:
        raise CompressError(f"export gptq: dtype {recipe.export.dtype!r} is not supported; allowed: float16")
    work = work_dir_for(out)
    passes = sum(PASSES_BY_STEP.get(a, 1) for a in recipe.algorithms())
    key = fingerprint(recipe.to_yaml(), (Path(folder) / "config.json").read_bytes(), sorted(stored.keys()),
                      calibration.digest, versions())
    source = StreamSource(model, checkpoint, work, dtype=dtype, fingerprint=key, total_passes=passes,
                          resume=recipe.model.stream.resume,
                          write_shard=ShardWriter(work / "export", layout, len(blocks), export_dtype))
    resumed = source.resumed
    if resumed:
        done = sum(f >= 0 for f in source.manifest["finished"])
        log(f"resuming the streamed run in {work}: {done} of {len(blocks)} blocks written by an earlier run")
    if on_block is not None:
        source.done = _observed(source, on_block)
    model.__dict__[BLOCK_SOURCE] = source
    ctx = StepContext(tokenizer=tokenizer, device=device, calibration=calibration,
                      batch_size=recipe.calibration.batch_size if recipe.calibration else 8, progress=progress,
                      activations=recipe.calibration.activations if recipe.calibration else "auto")
    ctx.state.quant, ctx.state.float_weight = source.quant, source.float_weight
    report["stages"] = apply_stages(model, recipe, ctx, log, timer)
    report["stream"] = {"work_dir": str(work), "resumed": resumed, "passes": passes, "blocks": len(blocks),
                        "seconds": {k: round(v, 3) for k, v in source.seconds.items()}}
    if current() is not None:  # each rank's own times and peak memory (the rest of the report: rank 0's)
        report["distributed"]["ranks"] = gather_json({"timings": timer.timings, "peak_host_mb": timer.peak_host_mb,
                                                      "peak_device_mb": timer.peak_device_mb})
    if recipe.export.vllm != "off":  # compress.formats.vllm reads every layer's result at once: not here yet
        report["serving"] = {"vllm": "not checked: a streamed export (run `compress eval` or vLLM on it)"}
        log("export.vllm: the vLLM load check is not run on a streamed export yet")
    report["timings"] = timer.timings
    if timer.peak_device_mb:
        report["peak_device_mb"] = timer.peak_device_mb
    report["peak_host_mb"] = timer.peak_host_mb

    def final_report(tmp: Path) -> dict:
        timer.stop()
        report["size"] = size_change(size_before, {"memory_bytes": None,
                                                   "disk_bytes": weights_on_disk(tmp, recursive=True)})
        report["timings"] = timer.timings
        report["peak_host_mb"] = timer.peak_host_mb
        return report

    written = None
    if is_main():
        timer.start("export")
        written = finish_export(model, tokenizer, checkpoint, source.manifest, work / "export", out, layout=layout,
                                model_dtype=dtype, dtype=export_dtype, tied=tied, recipe_yaml=recipe.to_yaml(),
                                report=final_report)
        shutil.rmtree(work, ignore_errors=True)
    wait_for_main()  # the other ranks, until rank 0 has written the export
    del model.__dict__[BLOCK_SOURCE]
    return RunResult(model, tokenizer, recipe, report, written, ctx.state)


def _materialise_outside(model, blocks, checkpoint: Checkpoint, dtype, tied: set[str], device) -> None:
    """The parameters outside the blocks that the capture runs (embedding, norms), from the checkpoint, on
    the compute device: the embedding is the largest tensor a streamed run keeps (1 GB for an 8B Llama,
    2 GB for a 70B), and on the host it held that much of the run's memory from the first capture to the
    end. The output head stays on meta (nothing before the last block reads it)."""
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if module is blocks or module is head or any(b is module for b in blocks.modules()):
            continue
        own = [k for k, p in module._parameters.items() if p is not None]
        if own:
            for leaf in own:
                key = f"{name}.{leaf}" if name else leaf
                if key in tied:
                    continue
                t = checkpoint.get(key)
                module._parameters[leaf] = torch.nn.Parameter(
                    (t.to(dtype) if t.is_floating_point() else t).to(device), requires_grad=False)


def _observed(source: StreamSource, on_block):
    done = source.done

    def wrapped(i, block, reports=None, experts=None):
        done(i, block, reports, experts)
        on_block(source.pass_index, i)
    return wrapped
