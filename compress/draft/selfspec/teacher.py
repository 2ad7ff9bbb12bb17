"""The frozen target's outputs over the training text, computed once for every step that draws it.

``distill_heads`` draws ``batch_size`` windows a step from N; over a run each window is drawn
steps · batch_size / N times (the Qwen recipe: 3,000 × 16 / 7,566 ≈ 6.3). The target is frozen, so
its outputs on a window never change, yet each draw ran all its blocks and a float32 softmax over its
full vocabulary again — by the H200 runs' step times (127–163 ms with one head, ~53 ms more per further
head) about half of a one-head step, though never timed apart. The cache keeps, per window position, what
the heads read (the states after their exit and mid blocks, the final norm's output) and the
log-normaliser of the target's logits over the full vocabulary; a head's teacher distribution on its
own ids is then one product with those ids' LM rows, p(v) = exp(final · W_v − lse): the same numbers
as the full softmax restricted to the ids, for a fraction of the work.

Where it lives (``where="auto"``): on the training device when it takes at most half of that device's
free memory, else in host memory when it takes at most half of what is available there, else nowhere
(each step runs the target, as before). The recipe's text with one mid layer: 3 × 7,566 × 512 × 1,536
bf16 numbers, 36 GB — on an H200, not on a 24 GB card.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.draft.selfspec.head import forward_with_final
from compress.errors import CompressError
from compress.host_memory import available_bytes

log = logging.getLogger(__name__)

PLACES = ("auto", "off")


def cache_bytes(target, windows: torch.Tensor, depths: list[int]) -> int:
    """What the cache of ``windows`` [N, T] holds: a state per depth and the final norm's output, in the
    target's dtype, and a float32 log-normaliser, per position."""
    p = next(target.parameters())
    positions = windows.numel()
    return positions * (target.config.hidden_size * p.element_size() * (len(depths) + 1) + 4)


def place(target, windows: torch.Tensor, depths: list[int], where: str = "auto") -> torch.device | None:
    """The device the cache goes to, or None (no cache: ``where="off"``, or it fits nowhere)."""
    if where not in PLACES:
        raise CompressError(f"teacher_cache must be one of {', '.join(PLACES)}, got {where!r}")
    if where == "off":
        return None
    need = cache_bytes(target, windows, depths)
    device = next(target.parameters()).device
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if need <= free // 2:
            return device
    host = available_bytes()
    if host is not None and need <= host // 2:
        return torch.device("cpu")
    log.warning("teacher cache off: %.1f GB of target outputs fit neither the device nor the host; each step "
                "runs the target", need / 1e9)
    return None


class TeacherCache:
    """The target's states after ``depths``, its final norm's output and the log-normaliser of its logits,
    per position of ``windows`` [N, T], on ``device`` (``build``)."""

    def __init__(self, states: dict[int, torch.Tensor], final: torch.Tensor, lse: torch.Tensor, seconds: float):
        self.states, self.final, self.lse, self.seconds = states, final, lse, seconds

    @property
    def device(self) -> torch.device:
        return self.final.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.states.values(), self.final, self.lse))

    @classmethod
    def build(cls, target, windows: torch.Tensor, depths: list[int], device: torch.device, *,
              batch_size: int = 16, progress: bool = True) -> "TeacherCache":
        run_on = next(target.parameters()).device
        n, t = windows.shape
        dtype, hidden = next(target.parameters()).dtype, target.config.hidden_size
        states = {k: torch.empty(n, t, hidden, dtype=dtype, device=device) for k in depths}
        final = torch.empty(n, t, hidden, dtype=dtype, device=device)
        lse = torch.empty(n, t, dtype=torch.float32, device=device)
        start = time.perf_counter()
        for s in tqdm(range(0, n, batch_size), desc="teacher outputs", unit="batch", disable=not progress):
            got, normed, norm = teacher_outputs(target, windows[s:s + batch_size].to(run_on), depths, check=s == 0)
            for k in depths:
                states[k][s:s + batch_size] = got[k].to(device)
            final[s:s + batch_size] = normed.to(device)
            lse[s:s + batch_size] = norm.to(device)
            del got, normed, norm
        if run_on.type == "cuda":  # the copies and products are queued: the time is theirs too
            torch.cuda.synchronize(run_on)
        cache = cls(states, final, lse, time.perf_counter() - start)
        log.info("teacher cache: %d windows x %d positions, %.1f GB on %s in %.1f s", n, t, cache.nbytes / 1e9,
                 device, cache.seconds)
        return cache

    def take(self, idx: torch.Tensor, device: torch.device) -> tuple[dict[int, torch.Tensor], torch.Tensor,
                                                                       torch.Tensor]:
        """The states, final norm outputs and log-normalisers of windows ``idx``, on ``device``."""
        at = idx.to(self.device)
        return ({k: v[at].to(device) for k, v in self.states.items()}, self.final[at].to(device),
                self.lse[at].to(device))

    def describe(self) -> dict:
        return {"device": str(self.device), "gb": round(self.nbytes / 1e9, 2), "seconds": round(self.seconds, 2)}


@torch.no_grad()
def target_outputs(target, ids: torch.Tensor, depths: list[int]
                   ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The target on ``ids`` [B, T]: its states after ``depths``, its logits and its final norm's output at
    every position (what a deep-context head is fed)."""
    out, normed = forward_with_final(target, input_ids=ids, output_hidden_states=True, use_cache=False)
    return {k: out.hidden_states[k] for k in depths}, out.logits, normed


def teacher_outputs(target, ids: torch.Tensor, depths: list[int], check: bool = False
                    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """What training reads of the target on ``ids`` [B, T]: its states after ``depths``, its final norm's
    output and the float32 log-normaliser of its logits over the full vocabulary. ``check``: first confirm
    that its logits are its LM head applied to that output, which ``teacher_probs`` takes them to be."""
    states, logits, normed = target_outputs(target, ids, depths)
    if check:
        if getattr(target.lm_head, "bias", None) is not None:
            raise CompressError("exit-head training recomputes the target's logits as final · W: an LM head with "
                                "a bias is not supported")
        first = logits[:1].float()  # one window says it: a scale or a cap applies to every position
        with torch.no_grad():
            diff = float((F.linear(normed[:1], target.lm_head.weight).float() - first).abs().max())
        # 2% of the largest logit: far above bf16's rounding (a product of another shape may differ by an ulp,
        # 0.4-0.8% of a value), far below a scale or a soft cap
        if diff > 0.02 * float(first.abs().max()) + 1e-4:
            raise CompressError(f"the target's logits differ from its LM head applied to its final norm's output "
                                f"by up to {diff:.3g} (scaled or capped logits?): exit-head training does not "
                                f"support this model")
    return states, normed, torch.logsumexp(logits.float(), -1)


def teacher_probs(final: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The target's next-token probabilities on the ids whose LM rows are ``rows`` [V', H]: float32 [B, T, V']."""
    return torch.exp(F.linear(final, rows).float() - lse.unsqueeze(-1))
