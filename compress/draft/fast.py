"""Fast batch-1 decoding: static KV caches and a compiled decode step, for target and drafter.

:class:`FastDecoder` owns one model's KV cache and feeds it tokens; ``fast_target_generate``
and ``fast_speculative_generate`` are ``target_generate`` / ``speculative_generate`` (same
rounds, same acceptance rules, same :class:`SpecResult`) on decoders. With ``compile=False``
the same code runs eagerly, which is what the CPU tests check for token identity.

Static cache (transformers ``StaticCache``, 5.17 and 5.23 alike): every layer preallocates
[1, kv_heads, max_cache_len, head_dim] and writes new keys/values at its own length counter
(``StaticLayer.cumulative_length``, a device tensor with a fixed address). Attention runs over
all ``max_cache_len`` slots with a causal mask built from the query positions, so slots past the
current length are never seen. Speculative decoding's "crop" is therefore a position reset:
:meth:`FastDecoder.rewind` sets every layer's counter back, and the next forward overwrites the
rejected slots in place. Positions are passed explicitly (``position_ids``) from our own count.

Pruned models with per-layer KV head counts: StaticCache layers allocate lazily, from the
first key/value states they receive (never from the config's head count; we never call
``early_initialization``), so every layer gets its own shape; the first call (the prefill)
always runs eagerly, so this allocation happens outside any compiled graph. A cache whose
layers are not plain full-attention ``StaticLayer`` s (sliding windows, another transformers
version) falls back to ``DynamicCache`` with a log line.

Compile (``compile=True``): ``torch.compile(model.__call__)`` with ``dynamic=False`` and
inductor's default mode; on CUDA each compiled step shape is then recorded once as a CUDA graph
of our own (``graphs="manual"``, the default there): static input-id and position buffers, the
static cache's tensors, one replay per step. cudagraph trees (mode "reduce-overhead",
``graphs="trees"``) gave the same kernels, but their per-call Python (guards over every cache
tensor, input checks) kept a 1.5B model's step at ~3.3 ms on an H100 against ~1 ms of weight
traffic. A capture that fails falls back to the compiled step without graphs, with a log line.
Only the ``step_shapes`` (tokens fed, logits kept) go through it, each its own graph: (1, 1)
for plain decoding, (1, 1) and (2, 1) for the drafter, (γ+1, γ+1) for a full verification
(``decoder_pair``). Everything else — prefills, the shorter verifications of a last round or of
confidence-stopped drafts — runs eagerly on the same cache (correct, just slower), so compile
time stays at a few graphs per model.
:meth:`FastDecoder.warmup` compiles and records every step shape before anything is timed.
Recording a step runs it first (warm-up, on a side stream, as CUDA graphs require) and so
writes into the cache past the current length; the decoder rewinds its counters before the
capture and the replay, and the replay overwrites those slots. CUDA graphs reuse their output
buffers, so logits are cloned right after each replay (with cudagraph trees every call also
starts with ``torch.compiler.cudagraph_mark_step_begin()``).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterable, Sequence

import torch

from compress.draft.loop import run_speculative, run_target
from compress.draft.speculative import Calibrator, SpecResult, _check_positive, model_device
from compress.errors import CompressError

log = logging.getLogger(__name__)

# dynamo keeps every compiled graph of nn.Module.__call__ under one code object (and guards on each
# cache's tensors by identity): target + drafter step shapes, several decoders per process
_RECOMPILE_LIMIT = 64


def make_static_cache(model: torch.nn.Module, max_cache_len: int):
    """A StaticCache of ``max_cache_len`` slots whose lengths we can reset, or None (and why).

    Version-tolerant: transformers 5.x takes ``StaticCache(config=, max_cache_len=)``; 4.x also
    wanted batch size, device and dtype up front (and tracked positions differently: refused)."""
    from transformers import StaticCache  # transformers loads slowly; only a static cache needs it here

    try:
        cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:
        p = next(model.parameters())
        cache = StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_cache_len,
                            device=p.device, dtype=p.dtype)
    layers = getattr(cache, "layers", None)
    if not layers:
        return None, "this transformers StaticCache has no per-layer objects"
    kinds = {type(layer).__name__ for layer in layers}
    if kinds != {"StaticLayer"}:
        return None, f"cache layers are {sorted(kinds)}, not plain full-attention StaticLayer"
    if not all(hasattr(layer, "cumulative_length") for layer in layers):
        return None, "StaticLayer has no cumulative_length counter to reset"
    return cache, None


@contextmanager
def _normal_tensors():
    """no_grad, and never inference mode (even inside a caller's): the cache is allocated by the
    first call and updated in place by later calls and rewinds, which inference tensors forbid
    outside inference mode; one mode for every call keeps them all legal."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # new name (torch >= 2.6), old name
        if hasattr(cfg, name) and getattr(cfg, name) < _RECOMPILE_LIMIT:
            setattr(cfg, name, _RECOMPILE_LIMIT)


class FastDecoder:
    """One model's batch-1 decoding state: a KV cache, its length, an (optionally compiled) step.

    ``decoder(ids, keep)`` feeds ``ids`` [n] after the ``decoder.length`` cached tokens and
    returns float32 logits [keep, V] of the last ``keep`` positions; ``rewind(n)`` forgets
    everything after the first n tokens. Per-call seconds (CUDA synchronized) are kept in
    ``stats`` by step length, prefills apart; ``eager_steps`` counts decode steps that ran
    uncompiled because their shape is not one of ``step_shapes``.
    """

    def __init__(self, model: torch.nn.Module, max_cache_len: int, *, static: bool = True,
                 compile: bool = False, step_shapes: Iterable[tuple[int, int]] = ((1, 1),),
                 compile_mode: str | None = None, compile_backend: str = "inductor", graphs: str | None = None,
                 name: str = "model", timed: bool = True):
        _check_positive("max_cache_len", max_cache_len)
        self.model, self.name = model, name
        self.device = model_device(model)
        ctx = getattr(model.config, "max_position_embeddings", None)
        # no slot past the context is ever usable; __call__ says so if a sequence needs one
        self.max_cache_len = min(max_cache_len, ctx) if ctx else max_cache_len
        self.context = self.max_cache_len
        # timed: synchronize around every call and keep per-shape seconds in `stats`; off, calls are
        # asynchronous (the loop's RoundClock times phases with CUDA events instead)
        self.timed = timed
        self.step_shapes = {(int(n), int(k)) for n, k in step_shapes}
        self.eager_steps = 0
        self.cache, self.static = None, False
        if static:
            self.cache, why = make_static_cache(model, self.max_cache_len)
            self.static = self.cache is not None
            if not self.static:
                log.info("%s: static KV cache unavailable (%s); using DynamicCache", name, why)
        if self.cache is None:
            from transformers import DynamicCache  # as above
            self.cache = DynamicCache(config=model.config)
        self.positions = torch.arange(self.max_cache_len, device=self.device)
        self.length = 0
        self.compiled = None
        cuda = self.device.type == "cuda"
        if graphs not in (None, "manual", "trees"):
            raise CompressError(f"graphs must be 'manual', 'trees' or None, got {graphs!r}")
        if graphs is None and compile and cuda and compile_backend == "inductor":
            if compile_mode is None and self.static:
                graphs = "manual"
            elif compile_mode in (None, "reduce-overhead", "max-autotune"):  # inductor records these itself
                graphs = "trees"
        if graphs == "manual" and not (compile and cuda and self.static):
            raise CompressError(f"{name}: graphs='manual' needs compile=True, a CUDA model and a static cache")
        self.graph_mode = graphs if compile and cuda else None
        self.graph_error: str | None = None
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None
        if compile:
            if not self.static:
                log.info("%s: compiling without a static cache: every new length recompiles; expect it slow", name)
            raise_recompile_limit()
            mode = compile_mode or ("reduce-overhead" if self.graph_mode == "trees" else None)
            self.compiled = torch.compile(model.__call__, mode=mode, backend=compile_backend,
                                          dynamic=False, fullgraph=False)
        self.stats: dict[str, list] = {}  # "prefill" or "step{n}" -> [calls, seconds]
        self.seconds = 0.0

    @property
    def cudagraphs(self) -> bool:
        """Whether compiled steps replay CUDA graphs (ours or inductor's)."""
        return self.graph_mode is not None

    # ------------------------------------------------------------------ state

    def rewind(self, length: int) -> None:
        """Keep the first ``length`` cached tokens (no-op if fewer are cached)."""
        if length >= self.length:
            return
        if self.static:
            with _normal_tensors():
                self._set_length(length)
        else:
            self.cache.crop(length - self.length)  # negative = remove from the end (5.17 and 5.23)
        self.length = length

    def reset(self) -> None:
        self.rewind(0)

    def kv_heads(self) -> list[int]:
        """Per-layer KV heads the cache holds (after the first call), e.g. to check a pruned model."""
        return [int(layer.keys.shape[1]) for layer in self.cache.layers if getattr(layer, "keys", None) is not None]

    # ------------------------------------------------------------------ forward

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, ids: torch.Tensor, keep: int = 1, pad_to: int | None = None) -> torch.Tensor:
        """float32 logits of the last ``keep`` of ``ids``; ``pad_to`` P: the pass runs with P rows, the
        rows past ``ids`` repeating its last id (padding whose KV later calls overwrite)."""
        with _normal_tensors():
            real = int(ids.numel())
            if pad_to is not None and pad_to > real:
                ids = torch.cat([ids.to(self.device), ids[-1:].to(self.device).expand(pad_to - real)])
                return self._forward(ids, ids.numel() - real + keep)[:keep]
            return self._forward(ids, keep)

    def _forward(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        n = int(ids.numel())
        if n < 1 or not 1 <= keep <= n:
            raise CompressError(f"{self.name}: feed at least one token and keep 1..{n} positions (keep={keep})")
        if self.length + n > self.max_cache_len:
            raise CompressError(f"{self.name}: {self.length} cached + {n} new tokens exceed the cache of "
                                f"{self.max_cache_len}; size the decoder for prompt + new tokens")
        # a call at length 0 (a prefill, and the call that allocates the cache) runs eagerly
        step = self.compiled is not None and self.length > 0 and (n, keep) in self.step_shapes
        if self.compiled is not None and self.length > 0 and not step:
            self.eager_steps += 1
        fn = self.compiled if step else self.model
        kwargs = dict(input_ids=ids.to(self.device).reshape(1, n),
                      position_ids=self.positions[self.length:self.length + n].unsqueeze(0),
                      past_key_values=self.cache, use_cache=True, logits_to_keep=keep)
        graph = self._graph(n, keep, kwargs) if step and self.graph_mode == "manual" else None
        if self.timed:
            self._sync()
        start = time.perf_counter()
        if graph is not None:
            g, static_ids, static_pos, static_logits = graph
            static_ids.copy_(kwargs["input_ids"])
            static_pos.copy_(kwargs["position_ids"])
            g.replay()
            logits = static_logits[0, -keep:].float().clone()
        else:
            if step and self.graph_mode == "trees":
                torch.compiler.cudagraph_mark_step_begin()
            out = fn(**kwargs)
            logits = out.logits[0, -keep:].float().clone()  # before the next replay overwrites the buffer
        self.length += n
        if not self.timed:
            return logits
        self._sync()
        elapsed = time.perf_counter() - start
        key = f"step{n}" if self.length > n else "prefill"
        calls = self.stats.setdefault(key, [0, 0.0])
        calls[0] += 1
        calls[1] += elapsed
        self.seconds += elapsed
        return logits

    def _graph(self, n: int, keep: int, kwargs: dict):
        """The recorded CUDA graph of step shape (n, keep), capturing it on first use; None (and the
        compiled step without graphs from then on) if capture fails."""
        if (n, keep) in self._graphs:
            return self._graphs[(n, keep)]
        length = self.length
        static = dict(kwargs, input_ids=kwargs["input_ids"].clone(), position_ids=kwargs["position_ids"].clone())
        try:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile + lazy CUDA state, outside the capture
                    self.compiled(**static)
                    self._set_length(length)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                out = self.compiled(**static)
            self._set_length(length)
        except Exception as exc:  # noqa: BLE001 - any capture failure: run the compiled step without graphs
            self._set_length(length)
            self.graph_mode, self.graph_error = None, f"{type(exc).__name__}: {exc}"
            log.warning("%s: CUDA graph capture failed (%s); running the compiled step without graphs",
                        self.name, self.graph_error)
            return None
        self._graphs[(n, keep)] = (g, static["input_ids"], static["position_ids"], out.logits)
        return self._graphs[(n, keep)]

    def _set_length(self, length: int) -> None:
        """Put every static layer's counter at ``length``, in place: compiled steps and recorded
        graphs read these addresses."""
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(length)

    def step_seconds(self, lengths: Iterable[int] | None = None) -> float | None:
        """Mean seconds of the decode steps (not prefills) of the given lengths (all if None)."""
        rows = [v for k, v in self.stats.items() if k.startswith("step")
                and (lengths is None or int(k[4:]) in set(lengths))]
        calls = sum(r[0] for r in rows)
        return sum(r[1] for r in rows) / calls if calls else None

    def clear_stats(self) -> None:
        self.stats, self.seconds, self.eager_steps = {}, 0.0, 0

    def warmup(self, repeats: int = 3) -> None:
        """Run each step shape ``repeats`` times (compiling, then recording CUDA graphs) after a
        short dummy prefill, then reset; stats are cleared."""
        prefill = max(1, min(8, self.max_cache_len - max(n for n, _ in self.step_shapes)))
        for n, keep in sorted(self.step_shapes):
            for _ in range(repeats):
                self.reset()
                self(torch.zeros(prefill, dtype=torch.long), 1)
                self(torch.zeros(n, dtype=torch.long), keep)
        self.reset()
        self.clear_stats()


# --------------------------------------------------------------------------- decoding


def fast_target_generate(decoder: FastDecoder, input_ids, max_new_tokens: int, *,
                         eos_token_id: int | Iterable[int] | None = None, pad_to: int | None = None) -> SpecResult:
    """The target alone on a decoder (compress/draft/loop.py's ``run_target``)."""
    return run_target(decoder, input_ids, max_new_tokens, eos_token_id=eos_token_id, pad_to=pad_to)


def fast_speculative_generate(target: FastDecoder, drafter: FastDecoder, input_ids, *, max_new_tokens: int,
                              gamma: int, mode: str = "greedy", temperature: float = 1.0,
                              top_p: float | None = None, confidence_threshold: float | None = None,
                              calibrator: Calibrator | None = None, seed: int = 0,
                              eos_token_id: int | Iterable[int] | None = None,
                              pad_verify: bool = False) -> SpecResult:
    """Speculative decoding on decoders: compress/draft/loop.py's one loop."""
    return run_speculative(target, drafter, input_ids, max_new_tokens=max_new_tokens, gamma=gamma, mode=mode,
                           temperature=temperature, top_p=top_p, confidence_threshold=confidence_threshold,
                           calibrator=calibrator, seed=seed, eos_token_id=eos_token_id, pad_verify=pad_verify)


def cache_len_for(prompt_lens: Sequence[int], max_new_tokens: int, multiple: int = 64) -> int:
    """Static cache slots for every prompt, rounded up to ``multiple``. Longest prompt + new tokens
    is enough for both loops: a round drafts at most the tokens still to produce minus one, so
    neither model is ever fed past position prompt + max_new_tokens − 1."""
    need = max(prompt_lens) + max_new_tokens
    return -(-need // multiple) * multiple


def decoder_pair(target, drafter, max_cache_len: int, gamma: int, *, compile: bool = False,
                 static: bool = True, warmup: bool = True, verify_lengths: Iterable[int] | None = None,
                 **kw) -> tuple[FastDecoder, FastDecoder]:
    """Target and drafter decoders sized alike, compiled (and warmed up) for the step shapes of
    plain decoding and of full speculative rounds: target 1 and γ+1 tokens, drafter 1 and 2.
    ``verify_lengths``: every target verify length to compile (confidence-stopped rounds verify
    k+1 ≤ γ+1 tokens), instead of γ+1 alone."""
    lengths = {gamma + 1} if verify_lengths is None else {int(n) for n in verify_lengths}
    t = FastDecoder(target, max_cache_len, static=static, compile=compile,
                    step_shapes={(1, 1)} | {(n, n) for n in lengths}, name="target", **kw)
    d = FastDecoder(drafter, max_cache_len, static=static, compile=compile, step_shapes=((1, 1), (2, 1)),
                    name="drafter", **kw)
    if compile and warmup:
        t.warmup()
        d.warmup()
    return t, d

