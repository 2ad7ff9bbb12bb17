"""The one speculative-decoding loop, over a small decoder protocol (batch 1).

Every path — a target and drafter on transformers' own forward with a dynamic cache
(``EagerDecoder``), on static caches with compiled steps and CUDA graphs (``fast.FastDecoder``),
on our block engine (``engine_decoders``), and the self-drafter that shares the target's first
blocks (``selfspec``) — runs the rounds below; only the decoders differ.

Protocol
- a **decoder** (the target, or a drafter stepping one model): ``length`` (tokens whose KV it
  holds), ``decoder(ids, keep) -> float32 logits [keep, V]`` of the last ``keep`` fed positions,
  ``rewind(n)`` (forget all but the first n tokens), ``reset()``, ``device``; optionally
  ``context`` (its longest sequence) and ``pad_to`` support (``decoder(ids, keep, pad_to=P)``:
  the pass runs with P rows, the extra rows being padding whose results are thrown away).
- a **drafter**: ``length``, ``rewind``, ``reset`` and ``draft(feed, budget, rule) -> (tokens [k],
  q rows or None)``; ``as_drafter`` wraps a decoder into one that drafts a step at a time.

A round: the drafter proposes up to γ tokens (fewer near the end, or when confidence stopping
says so); the target scores its pending tokens plus all drafts in ONE call; the longest
acceptable prefix is kept plus one target token (``speculative.verify_round``); both sides
rewind to the committed tokens. The prompt minus its last token is prefilled before the first
round, on both sides, so every round is one target call of (pending + drafts) rows and the
target alone (``run_target``) sees the same shapes: a prefill, then one call per token.

Exactness. Greedy output equals the target's own greedy decoding whenever the verify call's
rows are computed as the target-alone steps compute them. In float32 on the CPU that holds to
rounding; in bf16 on a GPU a (γ+1)-row GEMM can round differently from a 1-row one and flip a
near-tie. ``pad_verify=True`` pads every verify call to γ+1 rows, and ``run_target(pad_to=γ+1)``
decodes the target alone through the same (γ+1)-row kernels (row 0 real, the rest padding):
both then compute every committed token's logits with identical kernels on identical inputs, so
the outputs are identical by construction (the "matched" reference of draft-bench).

Timing without host syncs: ``RoundClock`` records CUDA events at phase boundaries (drafting,
verification) and reads them once at the end; on the CPU it reads the clock directly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch

from compress.draft.speculative import (MODES, Calibrator, SpecResult, _check_positive, _cut_at_eos, _eos_set,
                                        accept_greedy, as_prompt, check_gamma, process_logits, verify_round)
from compress.errors import CompressError


@dataclass
class DraftRule:
    """How a round drafts: greedy or sampled (temperature, top-p), and confidence stopping."""

    sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    generator: torch.Generator | None = None
    threshold: float | None = None
    calibrator: Calibrator | None = None

    def stop(self, probs: torch.Tensor) -> bool:
        """True if drafting should stop after a draft drawn from ``probs`` (host sync)."""
        if self.threshold is None:
            return False
        conf = probs.max().reshape(1)
        if self.calibrator is not None:
            conf = self.calibrator(conf)
        return float(conf.reshape(-1)[0]) < self.threshold


def draft_by_steps(step, first_feed: torch.Tensor, budget: int, rule: DraftRule, device,
                   vocab_map: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Up to ``budget`` drafts from ``step(feed) -> last-position logits``; ``vocab_map`` [N] maps a
    trimmed head's N logits to vocabulary ids (its sampled q rows are scattered to the full vocabulary
    by the caller through ``q_rows`` holding (probs, map)). Stops after a draft whose (calibrated)
    confidence is below the rule's threshold; that draft is still verified."""
    drafts: list[torch.Tensor] = []
    q_rows: list[torch.Tensor] = []
    for j in range(budget):
        logits = step(first_feed if j == 0 else drafts[-1].reshape(1))
        if rule.sample:
            probs = process_logits(logits, rule.temperature, rule.top_p)
            idx = torch.multinomial(probs.to(device), 1, generator=rule.generator)[0]
        else:  # greedy: the argmax of the logits; probabilities only for a confidence stop
            idx = logits.argmax().to(device)
            probs = None if rule.threshold is None else torch.softmax(logits.float(), -1)
        drafts.append(idx if vocab_map is None else vocab_map.index_select(0, idx.reshape(1))[0])
        if rule.sample:
            q_rows.append(probs.to(device) if vocab_map is None else (probs.to(device), vocab_map))
        if probs is not None and rule.stop(probs):
            break
    tokens = torch.stack(drafts) if drafts else torch.zeros(0, dtype=torch.long, device=device)
    return tokens, (q_rows if rule.sample else None)


class StepDrafter:
    """A decoder used as a drafter: one decoder call per draft."""

    def __init__(self, decoder, vocab_map: torch.Tensor | None = None):
        self.decoder, self.vocab_map = decoder, vocab_map

    @property
    def length(self) -> int:
        return self.decoder.length

    @property
    def device(self):
        return self.decoder.device

    def prefill(self, ids: torch.Tensor) -> None:
        self.decoder(ids, 1)

    def draft(self, feed, budget, rule):
        return draft_by_steps(lambda f: self.decoder(f, 1)[0], feed, budget, rule, self.device, self.vocab_map)

    def rewind(self, length: int) -> None:
        self.decoder.rewind(length)

    def reset(self) -> None:
        self.decoder.reset()


def as_drafter(obj):
    return obj if hasattr(obj, "draft") else StepDrafter(obj)


class RoundClock:
    """Seconds per phase ("draft", "verify", "target") without a host sync per call: CUDA events
    on a GPU (summed by ``totals()``, which synchronizes once), the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._spans: dict[str, list] = {}
        self._open: tuple[str, object] | None = None

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def start(self, phase: str) -> None:
        self._open = (phase, self._now())

    def stop(self) -> None:
        phase, begin = self._open
        self._spans.setdefault(phase, []).append((begin, self._now()))
        self._open = None

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(a.elapsed_time(b) for a, b in v) / 1e3 for k, v in self._spans.items()}
        return {k: sum(b - a for a, b in v) for k, v in self._spans.items()}

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self._spans.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_fits(decoders: dict, prompt_len: int, max_new_tokens: int, slack: int = 0) -> None:
    for name, dec in decoders.items():
        ctx = getattr(dec, "context", None)
        if ctx is not None and prompt_len + max_new_tokens + slack > ctx:
            raise CompressError(
                f"a prompt of {prompt_len} tokens plus {max_new_tokens} new tokens does not fit the "
                f"{name}'s context of {ctx} tokens; use a shorter prompt or fewer new tokens")


@torch.no_grad()  # not inference mode: compiled decoders guard on it, and their caches are updated in place
def run_target(decoder, input_ids, max_new_tokens: int, *, eos_token_id: int | Iterable[int] | None = None,
               pad_to: int | None = None, clock: RoundClock | None = None) -> SpecResult:
    """The target alone, greedy: prefill the prompt minus its last token, then one call per token.

    ``pad_to`` P > 1: every step runs with P rows (row 0 the real token), the kernels a P-row verify
    call uses — the matched reference for exact identity (module docstring)."""
    _check_positive("max_new_tokens", max_new_tokens)
    prompt = as_prompt(input_ids).to(decoder.device)
    _check_fits({"target": decoder}, prompt.numel(), max_new_tokens, (pad_to or 1) - 1)
    eos = _eos_set(eos_token_id)
    clock = clock or RoundClock(decoder.device)
    decoder.reset()
    _sync(decoder.device)
    start = time.perf_counter()
    if prompt.numel() > 1:
        clock.start("prefill")
        decoder(prompt[:-1], 1)
        clock.stop()
    out: list[torch.Tensor] = []
    feed = prompt[-1:]
    while len(out) < max_new_tokens:
        clock.start("target")
        if pad_to and pad_to > 1:
            length = decoder.length
            logits = decoder(feed, 1, pad_to=pad_to)
            decoder.rewind(length + 1)
        else:
            logits = decoder(feed, 1)
        tok = logits[0].argmax()
        clock.stop()
        out.append(tok)
        if eos and int(tok) in eos:
            break
        feed = tok.reshape(1)
    tokens = torch.stack(out)
    _sync(decoder.device)
    wall = time.perf_counter() - start
    spans = clock.totals()
    return SpecResult(tokens=tokens, target_calls=len(out), drafter_calls=0,
                      target_time_s=spans.get("target", 0.0), prefill_time_s=spans.get("prefill", 0.0),
                      wall_time_s=wall)


@torch.no_grad()
def run_speculative(target, drafter, input_ids, *, max_new_tokens: int, gamma: int, mode: str = "greedy",
                    temperature: float = 1.0, top_p: float | None = None,
                    confidence_threshold: float | None = None, calibrator: Calibrator | None = None,
                    seed: int = 0, eos_token_id: int | Iterable[int] | None = None,
                    pad_verify: bool = False, tree: bool = False) -> SpecResult:
    """Generate ``max_new_tokens`` tokens (fewer if an EOS comes) by speculative decoding; see the
    module docstring. ``pad_verify``: verify with γ+1 rows every round (exact-identity mode).
    ``tree``: draft the target's static tree each round (a self-drafter built with one,
    compress/draft/selfspec/tree.py; greedy only; γ is then the tree's depth)."""
    _check_positive("max_new_tokens", max_new_tokens)
    if tree:
        if mode != "greedy" or confidence_threshold is not None:
            raise CompressError("tree drafting is greedy without confidence stopping")
        if getattr(target, "tree", None) is None or not hasattr(drafter, "draft_tree"):
            raise CompressError("tree drafting needs a self-drafter pair built with a draft tree")
        gamma = target.tree.max_depth
    check_gamma(gamma)
    if mode not in MODES:
        raise CompressError(f"unknown speculative mode {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "sample" and not temperature > 0:
        raise CompressError(f"temperature must be > 0 for sampling, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise CompressError(f"top_p must be in (0, 1], got {top_p}")
    if confidence_threshold is not None and not 0 <= confidence_threshold <= 1:
        raise CompressError(f"confidence_threshold must be in [0, 1], got {confidence_threshold}")
    drafter = as_drafter(drafter)
    device = target.device
    prompt = as_prompt(input_ids).to(device)
    _check_fits({"target": target, "drafter": drafter}, prompt.numel(), max_new_tokens,
                gamma if pad_verify or tree else 0)
    sample = mode == "sample"
    rule = DraftRule(sample=sample, temperature=temperature, top_p=top_p,
                     generator=torch.Generator(device=device).manual_seed(seed) if sample else None,
                     threshold=confidence_threshold, calibrator=calibrator)
    eos = _eos_set(eos_token_id)
    clock = RoundClock(device)
    target.reset()
    drafter.reset()
    _sync(device)
    start = time.perf_counter()
    if prompt.numel() > 1:  # the drafter first: a self-drafter's shallow pass serves the target's prefill
        clock.start("prefill")
        drafter.prefill(prompt[:-1])
        target(prompt[:-1], 1)
        clock.stop()
    seq, n_prompt = prompt, prompt.numel()
    drafted, accepted = [0] * gamma, [0] * gamma
    target_calls = drafter_calls = 0
    while seq.numel() - n_prompt < max_new_tokens:
        if tree:  # k = the tree's depth drafted, n of them accepted
            proposed, n, host = _tree_round(target, drafter, seq, clock)
            k = gamma
        else:
            budget = min(gamma, max_new_tokens - (seq.numel() - n_prompt) - 1)  # never draft past the end
            clock.start("draft")
            draft_ids, q_rows = drafter.draft(seq[drafter.length:], budget, rule)
            clock.stop()
            k = int(draft_ids.numel())
            clock.start("verify")
            feed = torch.cat([seq[target.length:], draft_ids])
            if pad_verify:
                logits = target(feed, k + 1, pad_to=gamma + feed.numel() - k)
            else:
                logits = target(feed, k + 1)
            clock.stop()
            if sample:
                n, nxt = verify_round(logits, _full_q(q_rows, logits.shape[-1]), draft_ids, sample=True,
                                      temperature=temperature, top_p=top_p, generator=rule.generator)
                proposed, host = torch.cat([draft_ids[:n], nxt.reshape(1)]), None
            else:  # the round's one host read: accepted count and new ids together
                n, proposed, host = accept_greedy(logits, draft_ids)
        target_calls, drafter_calls = target_calls + 1, drafter_calls + k
        for j in range(k):
            drafted[j] += 1
            accepted[j] += j < n
        # a tree's path can run past the end; a linear round never drafts past it
        room = max_new_tokens - (seq.numel() - n_prompt)
        new, stop = _cut_at_eos(proposed[:room], eos, None if host is None else host[:room])
        seq = torch.cat([seq, new])
        target.rewind(seq.numel() - 1)
        drafter.rewind(seq.numel() - 1)
        if stop:
            break
    _sync(device)
    wall = time.perf_counter() - start
    spans = clock.totals()
    return SpecResult(tokens=seq[n_prompt:], target_calls=target_calls, drafter_calls=drafter_calls,
                      drafted=drafted, accepted=accepted, target_time_s=spans.get("verify", 0.0),
                      drafter_time_s=spans.get("draft", 0.0), prefill_time_s=spans.get("prefill", 0.0),
                      wall_time_s=wall)


def _tree_round(target, drafter, seq: torch.Tensor, clock: RoundClock) -> tuple[torch.Tensor, int, list[int]]:
    """One tree round: the whole tree drafted, then verified, accepted and committed on the device;
    the host reads the path's length and tokens (the round's one sync). Returns (path tokens + the
    target's next one, the path's length, the same tokens on the host)."""
    clock.start("draft")
    nodes = drafter.draft_tree(seq[drafter.length:])
    clock.stop()
    clock.start("verify")
    verified = target.verify_tree(seq[target.length:], nodes)
    clock.stop()
    new = target.accept_tree(verified.tolist())
    return torch.tensor(new, device=seq.device), len(new) - 1, new


def _full_q(q_rows, vocab: int):
    """Sampled drafter rows as full-vocabulary distributions (a trimmed head's rows scattered)."""
    if not q_rows:
        return q_rows or []
    out = []
    for row in q_rows:
        if isinstance(row, tuple):
            probs, vmap = row
            full = probs.new_zeros(max(vocab, int(vmap.max()) + 1))
            row = full.scatter(0, vmap, probs)
        out.append(row)
    return out
