"""Speculative decoding's rules: the result record, input checks and the acceptance maths (batch 1).

The loop itself is compress/draft/loop.py (one loop for every decoder); this module says what a
round accepts. One *round*: the drafter proposes up to γ tokens; the target scores its pending
token plus all drafts in ONE call; the longest acceptable prefix of the drafts is kept plus one
token from the target (the correction at the first rejection, or a bonus token when every draft
is accepted). ``tokens_per_target_call`` = new tokens / rounds.

Acceptance
- greedy: a draft is accepted iff it equals the target's argmax, so the output is
  token-identical to the target's own greedy decoding.
- sample: exact speculative sampling (Leviathan et al. 2023, Chen et al. 2023) on the
  processed distributions (temperature, then top-p, applied to both models): accept a draft
  d with probability min(1, p(d)/q(d)); on rejection sample from norm(max(p − q, 0)); the
  bonus token is sampled from p. Every emitted token is distributed as the target's
  processed distribution.

Confidence-stopped drafting: after drafting a token whose confidence (the drafter's max
probability — of the raw softmax in greedy mode, of the processed q in sample mode —
mapped through ``calibrator`` if one is given) is below ``confidence_threshold``, drafting
stops. That token is still proposed: verifying one more token costs the target nothing at
batch 1, but no further drafter call is spent continuing a draft that is probably rejected.
Every round drafts at least one token (except a last round with one token left to produce).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from compress.errors import CompressError

Calibrator = Callable[[torch.Tensor], torch.Tensor]  # elementwise: raw confidences -> calibrated
MODES = ("greedy", "sample")


@dataclass
class SpecResult:
    tokens: torch.Tensor  # [n] new token ids (prompt excluded), on the target's device
    target_calls: int
    drafter_calls: int
    drafted: list[int] = field(default_factory=list)  # [γ] rounds that proposed a j-th draft token
    accepted: list[int] = field(default_factory=list)  # [γ] rounds whose j-th draft was accepted
    target_time_s: float = 0.0
    drafter_time_s: float = 0.0
    prefill_time_s: float = 0.0  # the prompt's prefill (both models), inside wall_time_s
    wall_time_s: float = 0.0

    @property
    def new_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def tokens_per_target_call(self) -> float:
        return self.new_tokens / self.target_calls if self.target_calls else math.nan

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted) / sum(self.drafted) if sum(self.drafted) else math.nan

    def summary(self) -> dict:
        """JSON-ready numbers (no token ids)."""
        return {"new_tokens": self.new_tokens, "target_calls": self.target_calls,
                "drafter_calls": self.drafter_calls,
                "tokens_per_target_call": self.tokens_per_target_call,
                "acceptance_rate": None if math.isnan(self.acceptance_rate) else self.acceptance_rate,
                "drafted": self.drafted, "accepted": self.accepted,
                "target_time_s": self.target_time_s, "drafter_time_s": self.drafter_time_s,
                "prefill_time_s": self.prefill_time_s,
                "wall_time_s": self.wall_time_s,
                "tokens_per_s": self.new_tokens / self.wall_time_s if self.wall_time_s else None}


# --------------------------------------------------------------------------- checks

def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def context_length(model: torch.nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def as_prompt(input_ids) -> torch.Tensor:
    """One prompt as a 1-D LongTensor; accepts a list of ids, [L] or [1, L]."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise CompressError(f"speculative decoding runs one prompt at a time (batch 1); got input_ids "
                            f"of shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise CompressError("the prompt is empty; give at least one token")
    if ids.dtype not in (torch.int64, torch.int32):
        raise CompressError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
    return ids.long()


def check_context(models: dict[str, torch.nn.Module], prompt_len: int, max_new_tokens: int) -> None:
    """Raise unless prompt + new tokens fit every model's context (max_position_embeddings)."""
    for name, model in models.items():
        ctx = context_length(model)
        if ctx is not None and prompt_len + max_new_tokens > ctx:
            raise CompressError(
                f"a prompt of {prompt_len} tokens plus {max_new_tokens} new tokens does not fit the "
                f"{name}'s context of {ctx} tokens (max_position_embeddings); use a shorter prompt "
                f"or fewer new tokens")


def check_gamma(gamma) -> int:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise CompressError(f"gamma (draft length) must be an integer >= 1, got {gamma!r}")
    return gamma


def check_same_vocabulary(target_tokenizer, drafter_tokenizer) -> None:
    """Raise unless both tokenizers map the same tokens to the same ids: speculative decoding
    passes token ids between the models, so an id must mean the same token to both."""
    from compress.data import tokenizer_fingerprint  # compress.data loads datasets (slow); only this check needs it

    if tokenizer_fingerprint(target_tokenizer) == tokenizer_fingerprint(drafter_tokenizer):
        return
    tv, dv = target_tokenizer.get_vocab(), drafter_tokenizer.get_vocab()
    if tv == dv:
        return  # only normalisation / pre-tokenisation differs: prompts are encoded by the target's
    differ = sum(1 for t in set(tv) | set(dv) if tv.get(t) != dv.get(t))
    raise CompressError(
        f"the target and drafter tokenizers differ ({len(tv)} vs {len(dv)} tokens, {differ} tokens "
        f"with different ids): speculative decoding needs a drafter that shares the target's "
        f"vocabulary; pick a drafter from the same model family")


# --------------------------------------------------------------------------- distributions

def process_logits(logits: torch.Tensor, temperature: float = 1.0,
                   top_p: float | None = None) -> torch.Tensor:
    """float32 probabilities after temperature and then top-p (nucleus) truncation."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token once the more likely tokens before it already reach top_p (keeps the top one)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def pad_rows(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """``ids`` [n] padded to ``rows`` by repeating its last id (padding rows of a pass, whose results
    are thrown away)."""
    return torch.cat([ids, ids[-1:].expand(rows - ids.numel())]) if rows > ids.numel() else ids


def pad_vocab(probs: torch.Tensor, size: int) -> torch.Tensor:
    """Zero probability for ids a model's head does not have (heads padded to different sizes)."""
    extra = size - probs.shape[-1]
    return probs if extra <= 0 else torch.nn.functional.pad(probs, (0, extra))


def _greedy_prefix(target_argmax: torch.Tensor, drafts: torch.Tensor) -> tuple[int, list[int]]:
    """(accepted count n, the target's argmax ids 0..n) with ONE device-to-host read."""
    k = drafts.numel()
    both = torch.cat([target_argmax[:k + 1], drafts.to(target_argmax.dtype)]).tolist()
    wanted, drafted = both[:k + 1], both[k + 1:]
    n = next((i for i in range(k) if drafted[i] != wanted[i]), k)
    return n, wanted[:n + 1]


def verify_greedy(target_argmax: torch.Tensor, drafts: torch.Tensor) -> tuple[int, torch.Tensor]:
    """target_argmax [γ+1], drafts [γ] -> (accepted count n, next token = target_argmax[n])."""
    n, _ = _greedy_prefix(target_argmax, drafts)
    return n, target_argmax[n]


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, torch.Tensor, list[int]]:
    """Greedy acceptance in one read per round: logits [k+1, V], drafts [k] -> (n accepted, the new
    tokens [n+1] on the device, the same ids on the host). The accepted drafts equal the target's
    argmax there, so the new tokens are the argmax's first n + 1."""
    target_argmax = logits.argmax(-1)
    n, host = _greedy_prefix(target_argmax, drafts)
    return n, target_argmax[:n + 1], host


def verify_sampled(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative sampling, batched over leading dims.

    p [..., γ+1, V] target probabilities, q [..., γ, V] drafter probabilities the drafts
    [..., γ] were sampled from. Returns (accepted count [...], next token [...]): the next token
    is drawn from norm(max(p − q, 0)) at the first rejection, or from p[γ] (the bonus) when all
    drafts are accepted — q is padded with a zero row so both cases are one formula.
    """
    gamma, vocab = drafts.shape[-1], p.shape[-1]
    p_d = p[..., :gamma, :].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_d = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(p_d.shape, generator=generator, device=p.device)
    accept = u * q_d < p_d  # u < p/q: probability min(1, p/q)
    n = accept.long().cumprod(-1).sum(-1)
    idx = n[..., None, None].expand(*n.shape, 1, vocab)
    q_pad = torch.cat([q, q.new_zeros(*q.shape[:-2], 1, vocab)], dim=-2)
    p_n, q_n = p.gather(-2, idx).squeeze(-2), q_pad.gather(-2, idx).squeeze(-2)
    resid = (p_n - q_n).clamp_min(0.0)
    mass = resid.sum(-1, keepdim=True)
    # mass 0 means p == q where it was drawn: a rejection there had probability 0; fall back to p
    resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p_n)
    nxt = torch.multinomial(resid.reshape(-1, vocab), 1, generator=generator).reshape(n.shape)
    return n, nxt


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


def _cut_at_eos(new: torch.Tensor, eos: set[int], host: list[int] | None = None) -> tuple[torch.Tensor, bool]:
    """``new`` up to and including its first EOS; ``host``: the same ids already on the host (no read)."""
    if not eos:
        return new, False
    hits = [i for i, t in enumerate(new.tolist() if host is None else host) if t in eos]
    return (new[: hits[0] + 1], True) if hits else (new, False)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CompressError(f"{name} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------- decoding


@torch.inference_mode()
def verify_round(logits: torch.Tensor, q_rows: list[torch.Tensor], draft_ids: torch.Tensor, *, sample: bool,
                 temperature: float, top_p: float | None, generator) -> tuple[int, torch.Tensor]:
    """(drafts accepted, next token) from the target's k + 1 logit rows: exact rejection sampling
    against the drafter's distributions ``q_rows``, or greedy agreement."""
    if not sample:
        return verify_greedy(logits.argmax(-1), draft_ids)
    vocab = max(logits.shape[-1], q_rows[0].shape[-1] if q_rows else 0)
    p = pad_vocab(process_logits(logits, temperature, top_p), vocab)
    q = pad_vocab(torch.stack(q_rows), vocab) if q_rows else p.new_zeros(0, vocab)
    n, nxt = verify_sampled(p, q, draft_ids, generator)
    return int(n), nxt


def mean_tokens_per_target_call(results: Sequence[SpecResult]) -> float:
    """Pooled over prompts: Σ new tokens / Σ target calls."""
    return sum(r.new_tokens for r in results) / sum(r.target_calls for r in results)
