"""What the packed-integer exports (``gptq``, ``compressed-tensors``) share: the quantized linears
of a run and their checks, the float rest of the state dict, config.json with a
``quantization_config``, and rebuilding a float model from a packed checkpoint.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import CompressError
from compress.formats.pruned import build_pruned_model
from compress.layout import find_block_list
from compress.moe import split_experts
from compress.quantize.solvers import QuantResult, row_chunks

WEIGHTS_NAME = "model.safetensors"


def quantized_linears(model: nn.Module, quant: dict[str, QuantResult],
                      fmt: str) -> dict[str, tuple[nn.Linear, QuantResult]]:
    """The quantized linears of a run (``RunState.quant``), checked against the model.

    Refuses an empty set, a name the model lacks, a non-linear, and a weight that
    no longer equals the dequantized levels (a later step changed it, so the
    packed levels would describe a different model)."""
    if not quant:
        raise CompressError(f"export format {fmt!r} packs quantized weights, but no step quantized any: "
                            f"run rtn or gptq before exporting format {fmt}")
    modules = dict(model.named_modules())
    out: dict[str, tuple[nn.Linear, QuantResult]] = {}
    for name, res in quant.items():
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            what = "is not in the model" if m is None else f"is a {type(m).__name__}, not a Linear"
            raise CompressError(f"export {fmt}: quantized module {name} {what}")
        if tuple(res.qweight.shape) != tuple(m.weight.shape):
            raise CompressError(f"export {fmt}: {name} has weight {tuple(m.weight.shape)} but its quantized "
                                f"levels are {tuple(res.qweight.shape)}; a later step changed the layer")
        if not on_grid(m.weight.detach(), res):
            raise CompressError(f"export {fmt}: the weight of {name} is no longer on its quantization grid "
                                "(a step after the quantizing one changed it); quantize last, or export format hf")
        out[name] = (m, res)
    return out


def on_grid(weight: torch.Tensor, res: QuantResult) -> bool:
    """Whether ``weight`` still equals its dequantized levels: checked on the weight's device (an export of a
    model on the GPU does not copy every weight to the host for it), a slice of rows at a time."""
    res = res.to(weight.device)
    # Far below half a quantization step, far above float rounding.
    base = 1e-3 * res.scales.float().abs().max()
    eps = torch.finfo(weight.dtype).eps
    for rows in row_chunks(tuple(weight.shape)):
        deq = res.dequantize(rows).to(weight.dtype).float()
        if not bool(((weight[rows].float() - deq).abs() <= base + eps * deq.abs()).all()):
            return False
    return True


def block_list_of(model: nn.Module, names: list[str], fmt: str) -> str:
    """The ModuleList of decoder blocks (``model.layers``) that holds every quantized linear.

    GPTQ/compressed-tensors loaders quantize linears inside the repeated blocks;
    anything else (lm_head, a vision tower) would be loaded as float and miss its weight.
    The blocks are the model's decoder stack (``compress.layout.find_block_list``), so the
    expert lists nested inside a block (``model.layers.0.mlp.experts``) are not taken for it."""
    blocks = find_block_list(model)
    outside = [name for name in names if not re.match(rf"{re.escape(blocks)}\.\d+\.", name)]
    if outside:
        raise CompressError(
            f"export {fmt}: {outside[0]} is quantized but lies outside the model's decoder blocks ({blocks}); "
            f"serving loaders only quantize linears inside the blocks ({blocks}.N.*). "
            "Leave it out of the quantize step (e.g. ignore: [lm_head]) or export format hf")
    return blocks


def float_linears_in_blocks(model: nn.Module, block_list: str, quantized: dict) -> list[str]:
    """Linears inside the decoder blocks that stay in float (loaders must be told)."""
    prefix = re.compile(rf"{re.escape(block_list)}\.\d+\.")
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and prefix.match(n) and n not in quantized]


def float_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict minus ``skip``, floats cast to ``dtype``, on the CPU.

    Tied weights are written once, as transformers' save_pretrained does: with
    ``tie_word_embeddings`` the output embedding shares storage with the input one
    and only the input embedding is stored (the loader re-ties)."""
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        out_emb = model.get_output_embeddings()
        if out_emb is not None and out_emb.weight is model.get_input_embeddings().weight:
            tied = {n + ".weight" for n, m in model.named_modules() if m is out_emb}
    out = {}
    for name, t in model.state_dict().items():
        if name in skip or name in tied:
            continue
        t = t.detach().cpu()
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def export_dtype(spec: Any, fmt: str, allowed: tuple[str, ...]) -> torch.dtype:
    name = getattr(spec, "dtype", None) or "float16"
    if name not in allowed:
        raise CompressError(f"export {fmt}: dtype {name!r} is not supported; allowed: {', '.join(allowed)}")
    return getattr(torch, name)


def write_model_files(model: nn.Module, tokenizer, folder: Path, tensors: dict, dtype: torch.dtype,
                      quantization_config: dict, metadata_format: str) -> None:
    """model.safetensors, config.json (with ``quantization_config``), generation config, tokenizer."""
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": metadata_format})
    write_config_files(model, tokenizer, folder, dtype, quantization_config)


def write_config_files(model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype,
                       quantization_config: dict) -> None:
    """Everything of a packed export but its weights (a streamed export writes those in shards)."""
    config = copy.deepcopy(model.config)
    config.dtype = dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    data = json.loads(config.to_json_string(use_diff=True))
    data["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def build_float_model(path: str | Path, dtype: torch.dtype):
    """The architecture of ``config.json`` in float, without its quantization_config."""
    from transformers import AutoConfig  # transformers (slow to import) only when an export is read

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # build plain nn.Linear layers; we dequantize ourselves
    model = build_pruned_model(config, dtype)  # per-layer sizes where the config lists them
    split_experts(model)  # a mixture of experts was exported per expert (compress.moe)
    return model


def load_rest(model: nn.Module, tensors: dict[str, torch.Tensor], dequantized: set[str], path, fmt: str) -> None:
    """Load the float tensors and check that every parameter got a value."""
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise CompressError(f"{path}: the {fmt} export has tensors the model does not: {unexpected[:5]}")
    dtype = next(model.parameters()).dtype
    model.load_state_dict({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()},
                          strict=False)
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
        out_emb = model.get_output_embeddings()
        tied = {n + ".weight" for n, m in model.named_modules() if m is out_emb}
    missing = sorted(expected - set(tensors) - dequantized - tied)
    if missing:
        raise CompressError(f"{path}: the {fmt} export lacks tensors: {missing[:5]}")


def read_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of an export: ``model.safetensors``, or the shards its index names (streamed)."""
    index = Path(path) / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(str(Path(path) / WEIGHTS_NAME))
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(load_file(str(Path(path) / shard)))
    return tensors


def load_tokenizer(path):
    from transformers import AutoTokenizer  # transformers (slow to import) only when an export is read

    return AutoTokenizer.from_pretrained(path)


def load_packed_model(path: str, fmt: str, packed_suffix: str, dequantize_one, *, dtype: torch.dtype, device):
    """Float model from an export: every ``{name}{packed_suffix}`` tensor names a packed linear whose
    weight ``dequantize_one(name, linear, tensors)`` rebuilds (popping the tensors it uses);
    every other tensor loads as is."""
    model = build_float_model(path, dtype)
    tensors = read_tensors(path)
    modules = dict(model.named_modules())
    dequantized = set()
    for key in [k for k in tensors if k.endswith(packed_suffix)]:
        name = key[: -len(packed_suffix)]
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise CompressError(f"{path}: packed weights for {name}, which is not a Linear of this model")
        w = dequantize_one(name, linear, tensors)
        with torch.no_grad():
            linear.weight.copy_(w.to(dtype))
        dequantized.add(name + ".weight")
    if not dequantized:
        raise CompressError(f"{path}: a {fmt} export without any packed linear")
    load_rest(model, tensors, dequantized, path, fmt)
    return model.to(device).eval(), load_tokenizer(path)


