"""The GPTQ v1 export of a streamed model, written block by block.

Each finished block of the last pass becomes one shard (``ShardWriter``): its quantized linears
packed exactly as ``compress.formats.gptq`` packs them (``pack_module``), its other tensors in the
export dtype. At the end (``finish_export``) the tensors outside the blocks (embedding, final
norm, output head unless tied) are read from the source checkpoint into the first shard, one tensor
and one slice at a time (``compress.formats.safetensors_stream``), and the
folder gets ``model.safetensors.index.json``, the same ``config.json`` / ``quantize_config.json``
the in-memory export writes (``gptq_quantization_config`` over every block's specs), the
tokenizer, the recipe and the report; it is renamed into place at once (``compress.fs``).
The tensors are those of the in-memory export, bit for bit, in shards instead of one file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors.torch import save_file

from compress import __version__
from compress.checkpoint import Checkpoint
from compress.formats import EXPORT_MARKER
from compress.formats.gptq import _module_spec, check_zero_points, gptq_quantization_config, pack_module
from compress.formats.packed import quantized_linears, write_config_files
from compress.formats.safetensors_stream import save_file_streamed
from compress.fs import make_readable, replace_dir, temp_dir_beside, write_json_atomic
from compress.fs import write_atomic

INDEX_NAME = "model.safetensors.index.json"


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def tied_output_names(model: nn.Module) -> set[str]:
    """The output head's weight when it is the input embedding's (written once, as save_pretrained does)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out_emb = model.get_output_embeddings()
    if out_emb is None or out_emb.weight is not model.get_input_embeddings().weight:
        return set()
    return {n + ".weight" for n, m in model.named_modules() if m is out_emb}


class ShardWriter:
    """``(i, block, quant) -> record``: block ``i`` packed into its shard in ``folder``."""

    def __init__(self, folder: Path, layout: str, n_blocks: int, dtype: torch.dtype):
        self.folder, self.layout, self.n, self.dtype = folder, layout, n_blocks + 1, dtype

    def __call__(self, i: int, block: nn.Module, quant: dict[str, Any]) -> dict:
        prefix = f"{self.layout}.{i}."
        # On the block's device once: the grid check and the packing both run there (a block's worth at a time).
        device = next(block.parameters()).device
        local = {n[len(prefix):]: res.to(device) for n, res in quant.items()}
        quantized = quantized_linears(block, local, "gptq") if local else {}
        check_zero_points({prefix + n: v for n, v in quantized.items()})
        tensors: dict[str, torch.Tensor] = {}
        specs = {}
        for name, (linear, res) in quantized.items():
            tensors.update(pack_module(prefix + name, linear, res))
            specs[prefix + name] = _module_spec(res, linear.in_features)
        skip = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
        for name, t in block.state_dict().items():
            if name not in skip:
                t = t.detach().cpu()
                tensors[prefix + name] = (t.to(self.dtype) if t.is_floating_point() else t).contiguous()
        excluded = [prefix + n for n, m in block.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
        partial = any(linear.in_features % res.spec.group_size_for(linear.in_features)
                      for linear, res in quantized.values())
        name = shard_name(i + 2, self.n)  # shard 1 holds the tensors outside the blocks
        write_atomic(self.folder / name, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        return {"file": name, "specs": specs, "excluded": excluded, "partial": partial, "keys": sorted(tensors),
                "bytes": (self.folder / name).stat().st_size}


def finish_export(model: nn.Module, tokenizer, checkpoint: Checkpoint, manifest: dict, shards: Path, out: Path, *,
                  layout: str, model_dtype: torch.dtype, dtype: torch.dtype, tied: set[str], recipe_yaml: str,
                  report: Callable[[Path], dict]) -> Path:
    """Assemble the export folder from the block shards and rename it into place."""
    n_blocks = manifest["blocks"]
    n = n_blocks + 1
    missing = [i for i in range(n_blocks) if str(i) not in manifest["shards"]]
    if missing:
        raise RuntimeError(f"streamed export: blocks {missing[:5]} have no shard")  # a bug, not a user error
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        # The tensors outside the blocks, one at a time (the embedding and the head are the largest of the
        # model): their shapes from the skeleton, their values from the checkpoint, unmapped after each.
        rest = [(name, dtype if t.is_floating_point() else t.dtype, tuple(t.shape))
                for name, t in model.state_dict().items() if not name.startswith(layout + ".") and name not in tied]

        def convert(part: torch.Tensor, to: torch.dtype) -> torch.Tensor:
            # as loaded in memory (the model's dtype), then exported
            return part.to(model_dtype).to(to) if part.is_floating_point() else part.to(to)

        total = save_file_streamed(tmp / shard_name(1, n), rest, checkpoint.get, metadata={"format": "pt"},
                                   convert=convert, after_each=getattr(checkpoint, "close", lambda: None))
        weight_map = {name: shard_name(1, n) for name, _, _ in rest}
        specs, excluded, partial = {}, [], False
        for i in range(n_blocks):
            rec = manifest["shards"][str(i)]
            os.link(shards / rec["file"], tmp / rec["file"])  # linked: the work folder keeps it until the end
            weight_map.update({k: rec["file"] for k in rec["keys"]})
            total += rec["bytes"]
            specs.update(rec["specs"])
            excluded += rec["excluded"]
            partial = partial or rec["partial"]
        write_json_atomic(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(
            weight_map.items()))})
        qcfg = gptq_quantization_config(specs, excluded, partial)
        write_config_files(model, tokenizer, tmp, dtype, qcfg)
        (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        write_json_atomic(tmp / "report.json", report(tmp))
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": "gptq", "toolkit": "compress",
                                                     "version": __version__}, indent=2))
        make_readable(tmp)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return out
