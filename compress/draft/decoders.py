"""Choosing the decoders for a target and a drafter (models already loaded: the CLI loads them).

- The target, and a float drafter of a llama / qwen2 / mistral family, run on our block engine
  (compress/draft/engine.py): fused projections, a per-layer step compiled once per row count,
  every decode shape a CUDA graph of our own on GPU.
- A drafter whose linears are int4 kernels (``compress.quantize.int4``) or of another family runs
  on its own forward with a static cache (``fast.FastDecoder``), compiled the same way.
- A self-spec head (``selfspec``) shares the target's engine: ``SelfSpecPair``'s two views.
"""
from __future__ import annotations

import torch

from compress.draft.engine import BlockEngine, EngineDecoder, check_engine_model
from compress.draft.fast import FastDecoder
from compress.draft.selfspec.pair import SelfSpecPair
from compress.errors import CompressError


def engine_ok(model) -> bool:
    try:
        check_engine_model(model)
    except CompressError:
        return False
    return all(type(m) is torch.nn.Linear for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"))


def _compile_args(compile: bool | str) -> dict:
    if compile is False:
        return {"compile": False}
    return {"compile": True, "compile_backend": compile if isinstance(compile, str) else "inductor"}


def target_engine(model, max_len: int, *, compile: bool | str = False) -> BlockEngine:
    return BlockEngine(model, max_len, compile=compile)


def model_decoder(model, max_len: int, *, compile: bool | str = False, engine: BlockEngine | None = None,
                  name: str = "model", step_shapes=((1, 1), (2, 1))):
    """A decoder for a whole model: the block engine where it runs, else the model's own forward."""
    cuda = next(model.parameters()).device.type == "cuda"
    graphs = compile is not False and cuda
    if engine is not None or engine_ok(model):
        return EngineDecoder(engine or BlockEngine(model, max_len, compile=compile), graphs=graphs, name=name)
    dec = FastDecoder(model, max_len, compile=compile is not False, step_shapes=step_shapes, name=name,
                      timed=False, **{k: v for k, v in _compile_args(compile).items() if k != "compile"})
    if compile is not False:
        dec.warmup()
    return dec


def self_spec_pair(engine: BlockEngine, head, *, compile: bool | str = False, tree=None,
                   fuse_head: bool | None = None):
    """(target, drafter) views of a self-spec head on the target's engine (``tree``: a static draft
    tree, compress/draft/selfspec/tree.py, whose scratch slots take the engine's last positions;
    ``fuse_head``: a greedy round's head step compiled as one program, SelfSpecPair; needs ``compile``.
    None: on where the round runs as CUDA graphs (compile on a GPU), where it saved 0.017-0.019 of a
    target step per draft on an H100, bench/results/draft/h100-selfspec-five-h/; off elsewhere)."""
    if fuse_head and compile is False:
        raise CompressError("fuse_head compiles the head step: it needs compile (True or a backend name)")
    graphs = compile is not False and engine.device.type == "cuda"
    if fuse_head is None:
        fuse_head = graphs
    pair = SelfSpecPair(engine, head, graphs=graphs, tree=tree, fuse_head=compile if fuse_head else False)
    return pair.target, pair.drafter


def cache_len(prompt_lens, max_new_tokens: int, gamma: int, multiple: int = 64) -> int:
    """Positions for every prompt + new tokens + a padded verify pass (γ rows past the end)."""
    need = max(prompt_lens) + max_new_tokens + gamma + 1
    return -(-need // multiple) * multiple
