"""Training exit heads by distillation, and choosing the exit depth, draft length and stop threshold.

Distillation (DistillSpec's lesson: match the target's distribution, not the data): on windows of
the training text the frozen target runs once per window, its outputs kept for every step that draws
the window (teacher.py; with ``teacher_cache: off``, once per batch); each
candidate exit depth k has its own head reading h_k, trained to minimise the cross-entropy of its
trimmed-vocabulary distribution against the target's next-token distribution restricted to the
same ids, Σ_v p_target(v) · −log q_head(v) (mass outside the trimmed vocabulary cannot be drafted
and carries no gradient). The text is corpus windows, or (self-distillation, generations.py) the
target's own greedy continuations of their prompts, the loss then on the continuation positions.
All heads share the target's outputs, so a sweep over depths costs little more than one head. The
target's weights never change, so greedy speculative output stays the target's own.

Held-out evaluation (windows of another split), per head: greedy agreement (head argmax, mapped
to vocabulary ids, equals the target's), α = Σ min(p, q) over the full vocabulary, τ(γ) by
replaying the greedy loop on each window's agreement sequence, and how well the head's confidence
predicts acceptance (AUROC, ECE). The depth and γ are chosen by the cost model
speedup ≈ τ(γ) / (v + γ·c(k)) with c(k) = (k + 1)/L + a fixed overhead (a draft step runs k target
blocks plus one head block, then the trimmed LM head; at batch 1 a step's cost follows its kernel
count, measured in bench/results/draft/) and v = 1 (verification runs the deep blocks on γ+1 rows: at
batch 1 about one step; a deep head adds its catch-up).
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibration.metrics import expected_calibration_error
from compress.draft.agreement import replay_greedy_rounds
from compress.draft.selfspec.head import ExitHead
from compress.draft.selfspec.teacher import TeacherCache, place, target_outputs, teacher_outputs, teacher_probs
from compress.errors import CompressError

log = logging.getLogger(__name__)


def _rope_tables(target, length: int, device, dtype):
    cos, sin = target.model.rotary_emb(torch.zeros(1, device=device, dtype=dtype),
                                       torch.arange(length, device=device)[None])
    return cos[0], sin[0]


def _depths(heads) -> list[int]:
    """The blocks whose output the heads read: their exit blocks and their mid layers."""
    return sorted({h.exit_layer for h in heads.values()} |
                  {h.mid_layer for h in heads.values() if h.mid_layer is not None})


def _unrolled(head, hidden: dict, cos, sin, final, steps: int) -> list[torch.Tensor]:
    mid = None if head.mid_layer is None else hidden[head.mid_layer]
    return head.forward_unrolled(hidden[head.exit_layer], cos, sin, final, steps, mid=mid)


def _drafts_loss(head, hidden: dict, cos, sin, final, p, mask, unroll: int,
                 argmax_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy against the target's distribution ``p``, averaged over a round's first ``unroll``
    drafts (deep context; a shallow head's drafts are all its first): step s counts at positions
    p >= s − 1, where its round begins inside the window. ``argmax_weight`` w mixes in the cross-entropy
    on the target's most likely id of the head's vocabulary: (1 − w)·soft + w·hard. Greedy verification
    accepts a draft on that id alone; the soft term spends the head's capacity on the whole ranking."""
    steps = _unrolled(head, hidden, cos, sin, final, unroll if head.context == "deep" else 1)
    top = p.argmax(-1, keepdim=True) if argmax_weight else None  # [B, T, 1]
    total = 0.0
    for s, logits in enumerate(steps, start=1):
        logp = F.log_softmax(logits, -1)
        ce = -(p * logp).sum(-1)  # [B, T]
        if top is not None:
            ce = (1 - argmax_weight) * ce - argmax_weight * logp.gather(-1, top)[..., 0]
        w = torch.ones_like(ce) if mask is None else mask.clone()
        w[:, :s - 1] = 0
        total = total + (ce * w).sum() / w.sum().clamp(min=1)
    return total / len(steps)


def distill_heads(target, train: torch.Tensor, specs: dict[str, tuple], *, steps: int,
                  batch_size: int = 8, lr: float = 3e-4, weight_decay: float = 0.0, warmup: int = 20,
                  seed: int = 0, progress: bool = True, unroll: int = 1,
                  loss_mask: torch.Tensor | None = None, teacher_cache: str = "auto",
                  tf32: bool = True, probe: Callable[[dict], dict] | None = None,
                  probe_every: int = 0, argmax_weight: float = 0.0) -> tuple[dict[str, ExitHead], dict]:
    """Heads ``{name: (exit_layer, vocab_map[, context[, mid_layer[, init[, lm_rows]]]])}`` (``ExitHead``'s arguments)
    trained jointly on windows ``train`` [N, T].

    ``loss_mask`` [N, T] bool: the positions the loss averages over (None: all, the mean over the
    batch's every position as always). ``unroll``: a deep-context head's loss is the mean over a
    round's first ``unroll`` drafts (``ExitHead.forward_unrolled``), so it learns to draft from its own
    states as well as from the target's. ``teacher_cache``: ``auto`` runs the target over the windows
    once and keeps what the steps read (teacher.py), ``off`` runs it every step; the same numbers either
    way. ``tf32``: on CUDA the heads' float32 products run on TF32 tensor cores (10 bits of mantissa
    in a product's inputs; the target states the heads read are bf16, 8 bits).

    ``probe(heads) -> dict``, called after every ``probe_every`` steps and the last, gives the history's
    ``learning_curve`` (e.g. ``agreement_probe``); it reads no training randomness, so the heads are the
    same with or without it, and its time (``probe_seconds``) is not training time. ``argmax_weight``:
    the share of the loss on the target's top id (``_drafts_loss``)."""
    if unroll < 1:
        raise CompressError(f"unroll must be >= 1, got {unroll}")
    if not 0.0 <= argmax_weight <= 1.0:
        raise CompressError(f"argmax_weight must be in [0, 1], got {argmax_weight}")
    if steps < 1:
        raise CompressError(f"steps must be >= 1, got {steps}")
    if train.dim() != 2 or train.shape[0] == 0:
        raise CompressError("the training text gave no windows")
    if loss_mask is not None and (loss_mask.shape != train.shape or not loss_mask.any(1).all()):
        raise CompressError(f"the loss mask must be [N, T] = {tuple(train.shape)} with a position in every row, "
                            f"got {tuple(loss_mask.shape)}")
    device = next(target.parameters()).device
    dtype = next(target.parameters()).dtype
    heads = {name: ExitHead(target, spec[0], spec[1], *spec[2:]).to(device) for name, spec in specs.items()}
    depths = _depths(heads)
    deep = any(h.context == "deep" for h in heads.values())
    params = [p for h in heads.values() for p in h.trainable()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    cos, sin = _rope_tables(target, train.shape[1], device, dtype)
    gen = torch.Generator().manual_seed(seed)
    losses = {k: deque(maxlen=20) for k in heads}  # the final loss is the last 20 steps' mean
    curve, probe_seconds = [], 0.0
    start = time.perf_counter()  # the cache's build counts: it is training time
    where = place(target, train, depths, teacher_cache)
    cache = None if where is None else TeacherCache.build(target, train, depths, where, batch_size=batch_size,
                                                          progress=progress)
    # heads over one vocabulary (k1 and k1-mid: the same trimmed ids) share one teacher distribution a step
    vocab_of = {k: tuple(h.vocab_map.tolist()) for k, h in heads.items()}
    rows = {ids: target.lm_head.weight.detach()[torch.tensor(ids, device=device)] for ids in set(vocab_of.values())}
    precision = torch.get_float32_matmul_precision()
    if tf32 and device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        for step in tqdm(range(steps), desc="exit heads", unit="step", disable=not progress):
            idx = torch.randint(0, train.shape[0], (batch_size,), generator=gen)
            hidden, normed, lse = (teacher_outputs(target, train[idx].to(device), depths, check=step == 0)
                                   if cache is None else cache.take(idx, device))
            final = normed if deep else None
            mask = None if loss_mask is None else loss_mask[idx].to(device=device, dtype=torch.float32)
            opt.zero_grad(set_to_none=True)
            probs = {ids: teacher_probs(normed, lse, r) for ids, r in rows.items()}  # the target's mass on the ids
            for name, head in heads.items():  # backward head by head: one head's activations at a time
                loss = _drafts_loss(head, hidden, cos, sin, final, probs[vocab_of[name]], mask, unroll, argmax_weight)
                loss.backward()
                losses[name].append(loss.detach())  # read at the end: a read per step would sync the device
                del loss
            del probs
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            if probe is not None and probe_every and ((step + 1) % probe_every == 0 or step + 1 == steps):
                if device.type == "cuda":  # the steps queued so far are training time, not the probe's
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                torch.set_float32_matmul_precision(precision)  # scored as the heads are after training
                with torch.no_grad():
                    curve.append({"step": step + 1, **probe(heads)})
                log.info("step %d: %s", step + 1, "; ".join(  # a long run's curve, readable before its end
                    f"{part} {k} {v['greedy_agreement']:.3f}" for part, hv in curve[-1].items() if part != "step"
                    for k, v in hv.items()))
                if tf32 and device.type == "cuda":
                    torch.set_float32_matmul_precision("high")
                probe_seconds += time.perf_counter() - t0
    finally:
        torch.set_float32_matmul_precision(precision)
    if device.type == "cuda":  # no step reads the device: its queued work belongs to the time
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start - probe_seconds  # with the cache's build (teacher_cache.seconds)
    teacher_info = None if cache is None else cache.describe()
    del cache, rows
    for h in heads.values():
        h.requires_grad_(False)
    log.info("exit heads %s: %d steps x %d x %d tokens in %.1f s", ", ".join(heads), steps, batch_size,
             train.shape[1], seconds)
    rows_trained = sorted(k for k, h in heads.items() if h.lm_rows_trained)
    history = {"steps": steps, "batch_size": batch_size, "seq_len": int(train.shape[1]), "lr": lr,
               **({"unroll": unroll} if deep else {}),
               **({"argmax_weight": argmax_weight} if argmax_weight else {}),
               **({"lm_rows_trained": rows_trained} if rows_trained else {}),
               "seconds": round(seconds, 2), "tokens": steps * batch_size * int(train.shape[1]),
               "teacher_cache": teacher_info, "tf32": bool(tf32 and device.type == "cuda"),
               **({} if loss_mask is None else {"loss_positions": round(float(loss_mask.float().mean()), 4)}),
               "final_loss": {k: float(torch.stack(list(v)).mean()) for k, v in losses.items()}}
    if curve:
        history.update(learning_curve=curve, probe_seconds=round(probe_seconds, 2))
    return heads, history


def agreement_probe(target, windows: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                    first: int | None = None) -> Callable[[dict], dict]:
    """A ``distill_heads`` probe: per named text (windows [N, T] and the kept positions, or None for all),
    each head's first-draft greedy agreement and α (expected acceptance, Σ min(p, q)) over the kept
    positions — the first ``first`` of each window's, when given."""
    def probe(heads: dict) -> dict:
        out = {}
        for name, (w, keep) in windows.items():
            events = head_events(target, heads, w, keep=keep)
            if first is not None:
                events = first_events(events, first)
            out[name] = {k: _agreement_and_alpha(ev) for k, ev in events.items()}
        return out
    return probe


def _agreement_and_alpha(ev: dict) -> dict:
    """A head's first-draft greedy agreement and α over the positions of its ``head_events``."""
    agree = torch.tensor([a for row in ev["agree"] for a in row], dtype=torch.float64)
    return {"greedy_agreement": float(agree.mean()), "alpha": float(torch.cat(ev["overlap"]).double().mean())}


@torch.no_grad()
def head_events(target, heads: dict[str, ExitHead], windows: torch.Tensor, *, batch_size: int = 4,
                keep: torch.Tensor | None = None, steps: int = 1) -> dict:
    """Per head, teacher-forced over ``windows`` [N, T]: per-window agreement sequences, confidences
    and overlaps (positions 0..T−2 predicting tokens 1..T−1; with ``keep`` [N, T] bool, only its
    positions among those — e.g. a generated sequence's continuation). These are a round's first
    drafts. A deep-context head's later drafts read its own states and agree less often: with
    ``steps`` > 1 its ``agree_steps`` holds, per window, the agreement of drafts 1..steps at every
    position (``forward_unrolled``; a replay walks them round by round, ``replay_rounds``)."""
    device = next(target.parameters()).device
    dtype = next(target.parameters()).dtype
    cos, sin = _rope_tables(target, windows.shape[1], device, dtype)
    deep = any(h.context == "deep" for h in heads.values())
    out = {k: {"agree": [], "confidence": [], "overlap": [],
               **({"agree_steps": []} if h.context == "deep" and steps > 1 else {})} for k, h in heads.items()}
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size].to(device)
        hidden, logits, normed = target_outputs(target, ids, _depths(heads))
        final = normed if deep else None
        p = torch.softmax(logits.float()[:, :-1], -1)
        t_arg = p.argmax(-1)
        for k, head in heads.items():
            many = "agree_steps" in out[k]
            all_steps = _unrolled(head, hidden, cos, sin, final, steps if many else 1)
            q_trim = torch.softmax(all_steps[0][:, :-1], -1)
            conf, idx = q_trim.max(-1)
            vmap = head.vocab_map.to(device)
            agree = vmap[idx] == t_arg
            overlap = torch.minimum(p[..., vmap], q_trim).sum(-1)  # q is zero off the trimmed ids
            later = [vmap[z[:, :-1].argmax(-1)] == t_arg for z in all_steps[1:]] if many else []
            for b in range(ids.shape[0]):
                sel = slice(None) if keep is None else keep[s + b, :-1].to(device)
                out[k]["agree"].append(agree[b][sel].cpu().tolist())
                out[k]["confidence"].append(conf[b][sel].float().cpu().tolist())
                out[k]["overlap"].append(overlap[b][sel].float().cpu())
                if many:
                    out[k]["agree_steps"].append([agree[b][sel].cpu().tolist()] +
                                                 [a[b][sel].cpu().tolist() for a in later])
    return out


def first_events(events: dict, n: int) -> dict:
    """``head_events`` cut to each window's first ``n`` kept positions: what a second pass with
    ``continuation_mask(..., first=n)`` gives, since a continuation's kept positions are one run from its
    prompt's end (the EOS, if any, only shortens it)."""
    if n < 1:
        raise CompressError(f"first must be >= 1 positions, got {n}")
    return {k: {key: [[s[:n] for s in w] if key == "agree_steps" else w[:n] for w in rows]
                for key, rows in ev.items()} for k, ev in events.items()}


def replay_rounds(agree_steps: list[list[bool]], gamma: int) -> dict:
    """The greedy loop on one window where draft j of a round begun at i is accepted iff
    ``agree_steps[j][i + j]`` (drafts past the evaluated steps use the last one's agreement): tokens
    and rounds, as ``replay_greedy_rounds`` counts them for step-independent drafts."""
    n, i, rounds = len(agree_steps[0]), 0, 0
    last = len(agree_steps) - 1
    while i < n:
        budget, k = min(gamma, n - i - 1), 0
        for j in range(budget):
            if not agree_steps[min(j, last)][i + j]:
                break
            k += 1
        rounds += 1
        i += k + 1
    return {"tokens": n, "rounds": rounds}


def _tau(agrees, gamma, confs=None, threshold=None) -> tuple[float, float]:
    """(tokens per round, drafts per round) of the greedy loop replayed on each sequence."""
    runs = [replay_greedy_rounds(a, gamma, None if confs is None else c, threshold)
            for a, c in zip(agrees, confs or [None] * len(agrees))]
    rounds = sum(r["rounds"] for r in runs)
    return sum(r["tokens"] for r in runs) / rounds, sum(sum(r["drafted"]) for r in runs) / rounds


# What a draft step costs besides its layers, in target steps: the trimmed LM head, the argmax and the
# round graph's small ops. Fitted to the H200 rows of Qwen2.5-Coder-1.5B (measured c = 0.189 at k = 2 and
# 0.222 at k = 3 against (k + 1) / 28 = 0.107 and 0.143; bench/results/draft/h200-selfspec-deep/):
# at batch 1 a step is paid per kernel; the layer count alone predicted 1.51x at k = 2, γ = 2 from held-out
# text (1.75x from the target's own continuations) where 1.31x (prose) and 1.39x (code) were measured.
DRAFT_OVERHEAD = 0.08


def cost_per_draft(exit_layer: int, num_layers: int) -> float:
    """c(k): a draft step's cost in target steps — k target blocks + the head block, by layer count,
    plus the fixed ``DRAFT_OVERHEAD``."""
    return (exit_layer + 1) / num_layers + DRAFT_OVERHEAD


def round_overhead(context: str, num_layers: int) -> float:
    """v − 1: a deep-context head re-runs its one layer over a round's accepted drafts (from the
    target's final states) before drafting again: about one layer's pass per round at batch 1."""
    return 1 / num_layers if context == "deep" else 0.0


def summarise_heads(events: dict, heads: dict[str, ExitHead], num_layers: int, gammas=(2, 3, 4, 5, 6)) -> dict:
    """The depth curve: per head, agreement, α, AUROC / ECE of confidence, τ(γ) and the predicted speedup."""
    from sklearn.metrics import roc_auc_score  # scikit-learn loads slowly; only this summary needs it

    curve = {}
    for k, ev in sorted(events.items()):
        agree = torch.tensor([a for row in ev["agree"] for a in row])
        conf = torch.tensor([c for row in ev["confidence"] for c in row], dtype=torch.float64)
        c = cost_per_draft(heads[k].exit_layer, num_layers)
        v = 1 + round_overhead(heads[k].context, num_layers)
        if "agree_steps" in ev:  # a deep head: each draft of a round at its own step's agreement
            taus = {}
            for g in gammas:
                runs = [replay_rounds(a, g) for a in ev["agree_steps"]]
                taus[g] = sum(r["tokens"] for r in runs) / sum(r["rounds"] for r in runs)
        else:
            taus = {g: _tau(ev["agree"], g)[0] for g in gammas}
        pred = {g: taus[g] / (v + g * c) for g in gammas}
        both = 0 < int(agree.sum()) < agree.numel()
        by_step = ({"greedy_agreement_by_draft": [
            float(torch.tensor([x for row in ev["agree_steps"] for x in row[j][j:]]).double().mean())
            for j in range(len(ev["agree_steps"][0]))]} if "agree_steps" in ev else {})
        curve[k] = {"exit_layer": heads[k].exit_layer, "vocab_size": heads[k].vocab_size,
                    "context": heads[k].context, **by_step, **_agreement_and_alpha(ev),
                    "confidence_auroc": float(roc_auc_score(agree.numpy(), conf.numpy())) if both else None,
                    "confidence_ece": expected_calibration_error(conf, agree),
                    "c_layers": c, "tau": taus, "predicted_speedup": pred,
                    "best_gamma": max(pred, key=pred.get)}
    return curve


# What a confidence stop adds to a draft, in target steps: the round reads each draft's confidence on
# the host, so it cannot run as one fused CUDA graph. Fitted to the H200 rows of Qwen2.5-Coder-1.5B's
# k1 head with and without the stop (c 0.24-0.38 against 0.12-0.14, +0.12 to +0.24 a draft over eight
# rows; bench/results/draft/h200-selfspec-five-e/ and -five-f/): the median, rounded.
STOP_READ_OVERHEAD = 0.16


def choose_threshold(agrees, confs, gamma: int, c: float, candidates=None,
                     read_cost: float = STOP_READ_OVERHEAD) -> dict:
    """The stopping threshold with the highest predicted speedup τ_t / (1 + c_t · drafts per round) on
    held-out sequences, where a stop's draft costs ``c + read_cost`` and a replay counts the drafts after
    a rejection as drafted (``replay_greedy_rounds``); ``None`` (fixed γ, draft cost ``c``) competes too.
    A stop wins only where it cuts enough drafts to pay for reading every one."""
    candidates = candidates or [round(0.05 * i, 2) for i in range(1, 20)]
    tau0, drafts0 = _tau(agrees, gamma)
    best = {"threshold": None, "tau": tau0, "drafts_per_round": drafts0, "predicted_speedup": tau0 / (1 + c * drafts0)}
    table = [dict(best)]
    for t in candidates:
        tau, drafts = _tau(agrees, gamma, confs, t)
        row = {"threshold": t, "tau": tau, "drafts_per_round": drafts,
               "predicted_speedup": tau / (1 + (c + read_cost) * drafts)}
        table.append(row)
        if row["predicted_speedup"] > best["predicted_speedup"]:
            best = row
    return {**best, "table": table}
