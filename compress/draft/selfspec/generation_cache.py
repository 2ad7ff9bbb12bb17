"""The target's greedy continuations, kept across runs (``COMPRESS_CACHE/generations``).

Continuing a recipe's prompts is the one part of its text that costs GPU time (the Qwen recipe: ~3,800
prompts to 512 tokens, minutes on an H200), and greedy decoding makes it a pure function of the
target, the prompts and how they were batched. A second run with other training settings (steps,
heads, a crash after the generations) reads them back instead. The key pins everything the tokens
depend on:

  - the target (``target_fingerprint``: shapes and a hash of weight slices), its dtype and the device
    type (CPU and CUDA kernels round differently, and a near-tie can flip a greedy token);
  - the versions of torch and transformers (the kernels and the model code);
  - every prompt's ids, the sequence length, the batch size and the pad id (``greedy_fill``'s inputs);
  - ``CODE_VERSION``, raised whenever ``greedy_fill`` changes what it generates.

One safetensors file per key (the sequences as int32, the prompt lengths), written to a temporary name and
renamed; a file that does not read back as the key's shapes is ignored and rewritten. Deleting the folder
only costs the next run its generations.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from compress.cache import cache_dir
from compress.draft.selfspec.head import target_fingerprint
from compress.fs import write_atomic

log = logging.getLogger(__name__)

CODE_VERSION = 1


def generation_key(target, prompts: list[torch.Tensor], length: int, batch_size: int, pad_id: int = 0) -> str:
    """The sha256 naming the continuations ``greedy_fill(target, prompts, length, batch_size=...)`` gives."""
    import transformers  # loaded already: the target is a transformers model

    p = next(target.parameters())
    meta = {"code": CODE_VERSION, "target": target_fingerprint(target), "dtype": str(p.dtype),
            "device": p.device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "length": int(length), "batch_size": int(batch_size), "pad_id": int(pad_id), "prompts": len(prompts)}
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for prompt in prompts:
        ids = prompt.detach().to("cpu", torch.int64).reshape(-1)
        h.update(int(ids.numel()).to_bytes(8, "little"))
        h.update(ids.numpy().tobytes())
    return h.hexdigest()


def _path(key: str, folder: Path | None) -> Path:
    return (folder or cache_dir("generations")) / f"{key}.safetensors"


def load_generations(key: str, rows: int, length: int, folder: Path | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sequences [rows, length] int64, prompt lengths [rows]) kept under ``key``, or None."""
    path = _path(key, folder)
    if not path.is_file():
        return None
    try:
        got = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        log.warning("generation cache: %s does not read (%s); generating again", path, exc)
        return None
    seqs, lens = got.get("sequences"), got.get("prompt_lengths")
    if seqs is None or lens is None or tuple(seqs.shape) != (rows, length) or tuple(lens.shape) != (rows,):
        log.warning("generation cache: %s holds other shapes than its key's; generating again", path)
        return None
    return seqs.long(), lens.long()


def save_generations(key: str, seqs: torch.Tensor, lens: torch.Tensor, folder: Path | None = None) -> Path:
    tensors = {"sequences": seqs.to(torch.int32).contiguous(), "prompt_lengths": lens.to(torch.int32).contiguous()}
    return write_atomic(_path(key, folder), lambda tmp: save_file(
        tensors, str(tmp), metadata={"key": key, "code_version": str(CODE_VERSION)}))
