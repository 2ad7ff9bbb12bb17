"""Our own batch-1 forward over a llama / qwen2 / mistral causal LM, layer range by layer range.

Why not the model's own forward: self-speculation runs the target's first k blocks while
drafting and only blocks k..L while verifying, with the KV of the first k blocks written once
and reused. Transformers' forward runs all layers, derives positions and masks from its cache's
length (which differs between the shallow and the deep layers mid-round) and changes its
keyword names between 5.17 and 5.24. This module calls the model's own weights (no copy) in a
fixed order of plain tensor ops, so the same code runs on every transformers 5.x.

- ``BlockEngine(model, max_len)``: per-layer KV tensors [kv_heads, max_len, head_dim] (each layer
  its own head count, so pruned models work), rotary tables for every position, and
  ``run_layers(h, positions, start, stop)`` that writes each layer's keys/values at ``positions``
  (explicit, so "rewinding" a cache is forgetting a count: the next write overwrites the slots,
  and the causal mask is built from positions, so a slot past a row's position is never read).
- ``fuse=True`` concatenates q/k/v and gate/up into one matrix each and re-points the modules'
  weights at views of it: one GEMM instead of three (two), no extra memory, the HF model still
  works on the same storage.
- ``compile=True`` compiles the per-layer function once per (rows, layer shape) — every layer
  of a model shares the compiled code, whatever range it runs in — and ``graphs=True`` (CUDA)
  records each named step program as a CUDA graph of our own on first use (``StepGraphs``).
- Prefills run the eager layers (no prompt length compiles anything); with graphs they are padded
  to one of a few row counts (``prefill_bucket``) and replayed as graphs of those eager layers.

Numerics: a token's hidden state depends on the row count M of the pass that computed it only
through the kernels that M selects (GEMM tiling, attention blocking); rows of one pass never mix.
So two passes of the same shape over the same cache give bit-identical rows — the basis of the
exact greedy identity of ``reference_generate`` (compress/draft/loop.py).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compress.draft.fast import raise_recompile_limit
from compress.draft.speculative import pad_rows
from compress.errors import CompressError

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("llama", "qwen2", "mistral")
GRAPH_ROWS = 16  # passes of at most this many rows are compiled and recorded; longer ones (prefills) run eager layers
PREFILL_BUCKETS = (32, 64, 128, 256, 512)  # prefill row counts recorded as graphs of the eager layers
_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "relu": F.relu}


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the HF RMSNorm: variance in float32, normalised value cast back, then the weight
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class LayerTensors:
    """One decoder layer's weights as tensors (views of the model's own parameters)."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: torch.Tensor  # [(q + 2 kv heads) * head_dim, hidden]
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    wgu: torch.Tensor  # [2 * intermediate, hidden]: gate rows, then up rows
    wd: torch.Tensor
    n_q: int
    n_kv: int


def _fused(mods: list[nn.Linear], fuse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for linears reading the same input; with ``fuse`` the modules' own
    parameters become views of it, so no memory is duplicated."""
    w = torch.cat([m.weight.detach() for m in mods], 0)
    has_bias = [m.bias is not None for m in mods]
    if any(has_bias) and not all(has_bias):
        raise CompressError("q/k/v projections where only some have a bias are not supported")
    b = torch.cat([m.bias.detach() for m in mods], 0) if all(has_bias) else None
    if fuse:
        start = 0
        for m in mods:
            n = m.weight.shape[0]
            m.weight = nn.Parameter(w[start:start + n], requires_grad=False)
            if b is not None:
                m.bias = nn.Parameter(b[start:start + n], requires_grad=False)
            start += n
    return w, b


def layer_tensors(layer: nn.Module, head_dim: int, fuse: bool) -> LayerTensors:
    attn, mlp = layer.self_attn, layer.mlp
    lins = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    bad = [type(m).__name__ for m in lins if type(m) is not nn.Linear]
    if bad:
        raise CompressError(f"the block engine runs plain nn.Linear layers; found {sorted(set(bad))} "
                            f"(use the model's own forward, compress.draft.fast.FastDecoder, for those)")
    if attn.o_proj.bias is not None or any(m.bias is not None for m in lins[4:]):
        raise CompressError("biases on o_proj or the MLP are not supported by the block engine")
    wqkv, bqkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj], fuse)
    wgu, _ = _fused([mlp.gate_proj, mlp.up_proj], fuse)
    return LayerTensors(ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                        wqkv=wqkv, bqkv=bqkv, wo=attn.o_proj.weight.detach(), wgu=wgu,
                        wd=mlp.down_proj.weight.detach(), n_q=attn.q_proj.out_features // head_dim,
                        n_kv=attn.k_proj.out_features // head_dim)


def layer_kv(h, cos, sin, ln1, wqkv, bqkv, k_cache, v_cache, slots, n_q: int, n_kv: int, head_dim: int,
             eps: float) -> torch.Tensor:
    """The first part of ``layer_forward``: writes the rows' keys and values at ``slots``; returns their
    rotated queries [n_q, M, d]. Alone, it is all a catch-up needs: rows whose outputs nobody reads,
    only their keys and values (later rows attend to them)."""
    m = h.shape[0]
    x = _rms(h, ln1, eps)
    qkv = F.linear(x, wqkv, bqkv)
    q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = _rope(q.view(m, n_q, head_dim).transpose(0, 1), cos, sin)  # [n_q, M, d]
    k = _rope(k.view(m, n_kv, head_dim).transpose(0, 1), cos, sin)
    v = v.view(m, n_kv, head_dim).transpose(0, 1)
    k_cache.index_copy_(1, slots, k)
    v_cache.index_copy_(1, slots, v)
    return q


def layer_forward(h, cos, sin, mask, ln1, ln2, wqkv, bqkv, wo, wgu, wd, k_cache, v_cache, slots,
                  n_q: int, n_kv: int, head_dim: int, eps: float, scale: float, act: str):
    """One decoder layer on rows h [M, hidden] (rotary tables cos/sin of their positions); writes
    this layer's keys and values into k_cache / v_cache [kv_heads, S, head_dim] at ``slots`` [M]
    (the rows' positions, except for tree drafts, which live in scratch slots); returns the new h.

    Grouped-query attention folds each KV head's query group into the row dimension
    ([kv, g·M, d] against [kv, S, d]), so no key/value is ever repeated."""
    m = h.shape[0]
    q = layer_kv(h, cos, sin, ln1, wqkv, bqkv, k_cache, v_cache, slots, n_q, n_kv, head_dim, eps)
    g = n_q // n_kv
    q = q.reshape(n_kv, g * m, head_dim)
    attn = F.scaled_dot_product_attention(q.unsqueeze(0), k_cache.unsqueeze(0), v_cache.unsqueeze(0),
                                          attn_mask=mask.repeat(g, 1).unsqueeze(0).unsqueeze(0), scale=scale)
    attn = attn[0].view(n_kv, g, m, head_dim).reshape(n_q, m, head_dim).transpose(0, 1).reshape(m, n_q * head_dim)
    h = h + F.linear(attn, wo)
    x = _rms(h, ln2, eps)
    gate, up = F.linear(x, wgu).chunk(2, dim=-1)
    return h + F.linear(_ACTS[act](gate) * up, wd)


def check_engine_model(model: nn.Module) -> None:
    """Raise a CompressError naming what the block engine cannot run."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise CompressError(f"the block engine supports {', '.join(SUPPORTED_TYPES)} models, not {kind!r}")
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise CompressError("sliding-window attention is not supported by the block engine")
    if getattr(cfg, "hidden_act", "silu") not in _ACTS:
        raise CompressError(f"activation {cfg.hidden_act!r} is not supported by the block engine")
    if not hasattr(getattr(model, "model", None), "layers"):
        raise CompressError("expected a causal LM with model.layers (a llama-style decoder stack)")


class BlockEngine:
    """The model's decoder stack as plain tensors plus one KV tensor pair per layer (batch 1)."""

    def __init__(self, model: nn.Module, max_len: int, *, fuse: bool = True, compile: bool | str = False):
        check_engine_model(model)
        if max_len < 1:
            raise CompressError(f"max_len must be >= 1, got {max_len}")
        cfg = model.config
        self.model, self.config, self.max_len = model, cfg, int(max_len)
        base = model.model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
        self.act = getattr(cfg, "hidden_act", "silu")
        self.scale = self.head_dim ** -0.5
        self.embed_tokens, self.norm, self.lm_head = base.embed_tokens, base.norm, model.lm_head
        with torch.no_grad():
            self.layers = [layer_tensors(layer, self.head_dim, fuse) for layer in base.layers]
            cos, sin = base.rotary_emb(torch.zeros(1, device=self.device, dtype=self.dtype),
                                       torch.arange(self.max_len, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]  # [max_len, head_dim]
        kv_heads = {t.n_kv for t in self.layers}
        if len(kv_heads) == 1:  # one tensor holds every layer's keys and values (views per layer), so
            # a draft tree's commit moves the accepted rows of all layers by one gather and one copy
            self.kv = torch.zeros(2, len(self.layers), kv_heads.pop(), self.max_len, self.head_dim,
                                  device=self.device, dtype=self.dtype)
            with torch.enable_grad():  # views made under no_grad, or by unbind, may not be written in place
                self.k = [self.kv[0, i] for i in range(len(self.layers))]  # with grad on (a caller's choice)
                self.v = [self.kv[1, i] for i in range(len(self.layers))]
        else:  # layers pruned to different KV-head counts
            self.kv = None
            self.k = [torch.zeros(t.n_kv, self.max_len, self.head_dim, device=self.device, dtype=self.dtype)
                      for t in self.layers]
            self.v = [torch.zeros_like(k) for k in self.k]
        self.slots = torch.arange(self.max_len, device=self.device)
        self._eager_layer = self._compiled_layer = layer_forward
        self._compiled_kv = layer_kv
        self._force_eager = False
        if compile:
            raise_recompile_limit()
            backend = compile if isinstance(compile, str) else "inductor"  # "eager": dynamo alone (CPU tests)
            self._compiled_layer = torch.compile(layer_forward, dynamic=False, fullgraph=True, backend=backend)
            self._compiled_kv = torch.compile(layer_kv, dynamic=False, fullgraph=True, backend=backend)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def mask(self, positions: torch.Tensor) -> torch.Tensor:
        """[M, max_len] True where slot s may be read by the row at that position (s <= position)."""
        return self.slots.unsqueeze(0) <= positions.unsqueeze(1)

    def layer_fn(self, rows: int):
        """The compiled layer for decode-sized passes, the eager one for prefills."""
        return self._compiled_layer if rows <= GRAPH_ROWS and not self._force_eager else self._eager_layer

    def kv_fn(self, rows: int):
        """``layer_kv``, compiled for decode-sized passes as ``layer_fn`` is."""
        return self._compiled_kv if rows <= GRAPH_ROWS and not self._force_eager else layer_kv

    @contextmanager
    def eager(self):
        """Run layers uncompiled inside (prefills: one-off shapes that must not compile)."""
        before, self._force_eager = self._force_eager, True
        try:
            yield
        finally:
            self._force_eager = before

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    @torch.no_grad()  # inference only; and the layers' caches are views of one tensor (see __init__)
    def run_layers(self, h: torch.Tensor, positions: torch.Tensor, start: int, stop: int, *,
                   slots: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layers [start, stop) on rows h [M, hidden] at ``positions`` [M], writing their KV at ``slots``
        (default: the positions) and reading what ``mask`` [M, max_len] allows (default: causal by
        position). Passes of up to GRAPH_ROWS rows use the compiled layer (compiled once per row
        count), longer ones eager code, so prompts of any length never trigger a compilation."""
        cos, sin = self.cos[positions], self.sin[positions]
        mask = self.mask(positions) if mask is None else mask
        slots = positions if slots is None else slots
        layer = self.layer_fn(h.shape[0])
        for i in range(start, stop):
            t = self.layers[i]
            h = layer(h, cos, sin, mask, t.ln1, t.ln2, t.wqkv, t.bqkv, t.wo, t.wgu, t.wd, self.k[i], self.v[i],
                      slots, t.n_q, t.n_kv, self.head_dim, self.eps, self.scale, self.act)
        return h

    def final(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and the full LM head: logits [M, V] in the model's dtype."""
        return self.lm_head(self.norm(h))


def prefill_bucket(rows: int, start: int, room: int) -> int | None:
    """The row count a prefill of ``rows`` rows written from ``start`` is padded to: the smallest of
    ``PREFILL_BUCKETS`` that holds it, so five recorded graphs serve every prompt length. An eager
    prefill of the 1.5B spends ~25 ms on the host launching ~1,000 small kernels (12% of a bench row's
    wall time on the H200, bench/results/draft/h200-selfspec-five-c/README.md); replayed, its kernels
    run back to back. The padding rows (the last id again, at the next positions) write keys and
    values past the prompt, which the next passes overwrite before any row reads them (positions are
    explicit; a row reads only slots at or before its own). None: no bucket fits below ``room``
    positions, or the prompt is longer than the largest: run it unpadded."""
    for b in PREFILL_BUCKETS:
        if rows <= b:
            return b if start + b <= room else None
    return None


class StepGraphs:
    """Named step programs, each recorded once per key as a CUDA graph of our own and replayed.

    ``run(key, fn, *inputs)`` calls ``fn(*inputs)``; with graphs on, the first call for ``key``
    warms ``fn`` up twice on a side stream (compilation, lazy CUDA state; with the real inputs,
    so its cache writes are the ones the real call makes) and records it; later calls copy the
    inputs into the recorded buffers and replay. Outputs are the graph's own buffers: read or
    clone them before the next replay of that key. A failed capture turns graphs off (logged)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = bool(enabled) and device.type == "cuda"
        self.device = device
        self.error: str | None = None
        self._graphs: dict = {}
        self._pool = None

    def run(self, key, fn: Callable, *inputs: torch.Tensor):
        if not self.enabled:
            return fn(*inputs)
        entry = self._graphs.get(key)
        if entry is None:
            return self._capture(key, fn, inputs)
        graph, static, out = entry
        for s, x in zip(static, inputs):
            s.copy_(x)
        graph.replay()
        return out

    def _capture(self, key, fn, inputs):
        static = [x.clone() for x in inputs]
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn(*static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = fn(*static)
            graph.replay()  # capture records without running: run it once for this call's outputs
        except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly from now on
            self.enabled, self.error = False, f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graph capture of %s failed (%s); running eagerly", key, self.error)
            return fn(*inputs)
        self._graphs[key] = (graph, static, out)
        return out


class EngineDecoder:
    """A whole model on the block engine, as compress/draft/loop.py's decoder (target or drafter).

    Rows of a call are written at positions ``length ..``; ``pad_to`` P runs the pass with P rows
    (the extra rows repeat the last id, at the next positions; later calls overwrite their KV).
    ``prefill_buckets`` (default: with graphs) pads a prefill to a bucket's rows (``prefill_bucket``)
    and replays it as a recorded graph of the eager layers (its own ``StepGraphs``: a failed capture
    there leaves the decode graphs on)."""

    def __init__(self, engine: BlockEngine, *, graphs: bool = False, name: str = "model",
                 prefill_buckets: bool | None = None):
        self.engine, self.name = engine, name
        self.device = engine.device
        self.context = engine.max_len
        self.graphs = StepGraphs(engine.device, graphs)
        self.prefill_graphs = StepGraphs(engine.device, graphs)
        self.prefill_buckets = bool(graphs) if prefill_buckets is None else bool(prefill_buckets)
        self.length = 0

    def __call__(self, ids: torch.Tensor, keep: int = 1, pad_to: int | None = None) -> torch.Tensor:
        ids = ids.to(self.device).reshape(-1)
        real = ids.numel()
        if pad_to is not None:
            ids = pad_rows(ids, pad_to)
        n = ids.numel()
        if not 1 <= keep <= real:
            raise CompressError(f"{self.name}: feed at least one token and keep 1..{real} positions (keep={keep})")
        if self.length + n > self.engine.max_len:
            raise CompressError(f"{self.name}: {self.length} cached + {n} new tokens exceed the engine's "
                                f"{self.engine.max_len} positions; size it for prompt + new tokens (+ γ when padding)")
        positions = self.engine.slots[self.length:self.length + n]  # a view: no kernel launch per step
        first = real - keep  # the kept rows: real - keep .. real - 1

        def states(ids_, pos_):
            return self.engine.run_layers(self.engine.embed(ids_), pos_, 0, self.engine.num_layers)

        def program(ids_, pos_):
            # the head over every row, then the kept ones: a row's logits must not depend on how many
            # rows are kept (a 1-row GEMM can round differently from an n-row one)
            return self.engine.final(states(ids_, pos_)).float()[first:real]

        if self.length > 0 and n <= GRAPH_ROWS:
            logits = self.graphs.run(("full", n, first, real), program, ids, positions).clone()
            self.length += n
            return logits
        # a prefill is bucketed; a padded call (pad_to: a verify pass and its matched reference) keeps its rows
        bucket = (prefill_bucket(n, self.length, self.engine.max_len)
                  if self.prefill_buckets and not (pad_to and n <= GRAPH_ROWS) else None)
        with self.engine.eager():  # a prefill: the eager layers, so no prompt length compiles anything
            if bucket is None:
                logits = program(ids, positions)
            else:  # padded to its bucket and replayed
                h = self.prefill_graphs.run(("prefill", bucket), states, pad_rows(ids, bucket),
                                            self.engine.slots[self.length:self.length + bucket])
                logits = self.engine.final(h[first:real]).float()
        self.length += n
        return logits

    def rewind(self, length: int) -> None:
        self.length = min(self.length, length)

    def reset(self) -> None:
        self.length = 0
