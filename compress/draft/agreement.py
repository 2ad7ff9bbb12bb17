"""Teacher-forced drafter evaluation: one pass of both models over the same token sequence.

The sequence is each prompt followed by the target's own greedy continuation
(``target_generate``), or — with ``max_new_tokens=0`` — the given text itself. At every scored
position i (predicting token i+1 from the prefix up to i) the target gives p_i and the drafter q_i:

- greedy agreement a_i = [argmax q_i == argmax p_i];
- overlap Σ_v min(p_i, q_i) at ``temperature``; α = its mean = 1 − mean TV(p, q), the chance
  that exact speculative sampling accepts a draft token;
- drafter confidence c_i = max q_i at temperature 1 (through ``calibrator`` if given).

τ(γ), tokens per target call, replays the greedy loop of ``speculative.py`` on the agreement
sequence of each prompt's N scored positions: a round starting at position i drafts
γ_i = min(γ, N − i − 1) tokens (never past the end), accepts the k ≤ γ_i leading agreements
a_i, a_{i+1}, …, emits k + 1 tokens (accepted drafts + the target's correction or bonus) and the
next round starts at i + k + 1. τ(γ) = Σ tokens / Σ rounds over all prompts. While drafts agree
they follow the sequence, so on the target's own greedy output this is exactly the measured loop's
pooled ``tokens_per_target_call`` (``target_self_agreement`` < 1 flags float ties between the
cached and the teacher-forced pass, where it can deviate). On given text it is the τ of a loop
forced along that text. ``tau_iid`` / ``tau_sampling_iid`` are the i.i.d. formula
(1 − a^(γ+1)) / (1 − a) with a = greedy agreement / α, for comparison.

Confidence as a predictor of acceptance: AUROC and ECE of c_i against a_i, and the stopping
threshold t that maximises the *accuracy of the stop decision* "continue drafting iff c ≥ t"
(i.e. of predicting a_i by c_i ≥ t); its τ(γ) replays the loop with ``confidence_threshold=t``
(stop after an accepted draft whose confidence is below t), which is also exact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch

from compress.draft.eager import target_generate
from compress.draft.speculative import Calibrator, as_prompt, check_context, check_gamma, model_device, pad_vocab
from compress.errors import CompressError

DEFAULT_GAMMAS = tuple(range(1, 9))


def _sequences(input_ids) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
        return [row for row in input_ids]
    if isinstance(input_ids, torch.Tensor) or (input_ids and isinstance(input_ids[0], int)):
        return [as_prompt(input_ids)]
    if not input_ids:
        raise CompressError("no prompts given")
    return [as_prompt(ids) for ids in input_ids]


@torch.inference_mode()
def _logits(model: torch.nn.Module, seq: torch.Tensor, start: int) -> torch.Tensor:
    """float32 logits [len(seq) − start, V] predicting seq[start:], one teacher-forced pass."""
    keep = seq.numel() - start + 1
    out = model(input_ids=seq.to(model_device(model))[None], use_cache=False, logits_to_keep=keep)
    return out.logits[0, -keep:-1].float()


def score_positions(target, drafter, seq: torch.Tensor, start: int, *, temperature: float = 1.0,
                    calibrator: Calibrator | None = None) -> dict[str, torch.Tensor]:
    """Per-position tensors (on the target's device) for positions predicting seq[start:]."""
    device = model_device(target)
    t_logits = _logits(target, seq, start)
    d_logits = _logits(drafter, seq, start).to(device)
    vocab = max(t_logits.shape[-1], d_logits.shape[-1])
    p, q = (pad_vocab(torch.softmax(x / temperature, -1), vocab) for x in (t_logits, d_logits))
    conf = torch.softmax(d_logits, -1).max(-1).values
    if calibrator is not None:
        conf = calibrator(conf).float()
    t_arg = t_logits.argmax(-1)
    return {"agree": d_logits.argmax(-1) == t_arg, "overlap": torch.minimum(p, q).sum(-1),
            "confidence": conf, "self_agree": t_arg == seq[start:].to(device)}


def replay_greedy_rounds(agree: Sequence[bool], gamma: int, confidence: Sequence[float] | None = None,
                         threshold: float | None = None) -> dict:
    """The greedy loop on one agreement sequence: tokens, rounds, per-draft-position counts.

    With a fixed γ every round drafts its whole budget (as the loop does). With a threshold a round
    stops drafting after a draft whose confidence is below it, accepted or not; after a rejected draft
    the loop was sure of, it drafts on until a confidence off the sequence (which one pass does not see)
    drops, so ``drafted`` counts the rest of the budget as drafted: an upper bound, never the
    optimistic count that makes a stop look cheap (on the GPU the stop chosen on that count drafted
    every position of the budget, as without it: bench/results/draft/h200-selfspec-five-f/).
    """
    n, i, rounds = len(agree), 0, 0
    drafted, accepted = [0] * gamma, [0] * gamma
    while i < n:
        budget, k = min(gamma, n - i - 1), 0
        if threshold is None:
            for j in range(budget):
                drafted[j] += 1
        for j in range(budget):
            if threshold is not None:
                drafted[j] += 1
            if not agree[i + j]:
                if threshold is not None and confidence[i + j] >= threshold:
                    for rest in range(j + 1, budget):  # drafts on, off the sequence (see above)
                        drafted[rest] += 1
                break
            accepted[j] += 1
            k += 1
            if threshold is not None and confidence[i + j] < threshold:
                break
        rounds += 1
        i += k + 1
    return {"tokens": n, "rounds": rounds, "drafted": drafted, "accepted": accepted}


def _tau(agrees: list[list[bool]], gamma: int, confs=None, threshold=None) -> float:
    runs = [replay_greedy_rounds(a, gamma, None if confs is None else c, threshold)
            for a, c in zip(agrees, confs or [None] * len(agrees))]
    return sum(r["tokens"] for r in runs) / sum(r["rounds"] for r in runs)


def tau_iid(rate: float, gamma: int) -> float:
    return gamma + 1.0 if rate >= 1 else (1 - rate ** (gamma + 1)) / (1 - rate)


def best_stop_threshold(confidence: torch.Tensor, accepted: torch.Tensor) -> tuple[float, float]:
    """(t, accuracy): t maximising the accuracy of predicting acceptance by confidence >= t
    (ties: the lowest t, which drafts more)."""
    c, order = confidence.double().cpu().sort()
    a = accepted.cpu()[order].double()
    n = c.numel()
    # threshold at c[m] continues for positions m.. : right = rejections below + acceptances from m on
    rej_below = torch.cat([torch.zeros(1, dtype=torch.float64), (1 - a).cumsum(0)])
    acc_from = torch.cat([a.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])
    right = rej_below + acc_from
    # thresholds must sit between distinct values: only cut before the first of equal confidences
    valid = torch.ones(n + 1, dtype=torch.bool)
    valid[1:n] = c[1:] != c[:-1]
    right = right.masked_fill(~valid, -1)
    m = int(right.argmax())
    # report the midpoint of the gap, so float noise between passes does not flip a decision
    if m == 0:
        t = 0.0  # always continue
    elif m == n:
        t = 1.0  # always stop (confidences are < 1 in practice)
    else:
        t = float(c[m - 1] + c[m]) / 2
    return t, float(right[m]) / n


def draft_eval(target: torch.nn.Module, drafter: torch.nn.Module, input_ids, *,
               gammas: Iterable[int] = DEFAULT_GAMMAS, temperature: float = 1.0,
               max_new_tokens: int = 128, eos_token_id=None,
               calibrator: Calibrator | None = None, n_bins: int = 15, return_events: bool = False) -> dict:
    """Drafter-vs-target agreement, α, τ(γ) and confidence quality; see the module docstring.

    ``return_events``: also return the per-position (drafter confidence, greedy acceptance) pairs
    under ``events``, e.g. to fit a confidence calibrator (``compress.draft.confidence.fit_drafter_calibrator``).

    ``input_ids``: one prompt (list of ids, [L]) or several ([B, L] or a list of them).
    ``max_new_tokens`` > 0: score the target's greedy continuation of each prompt;
    0: score each given sequence itself (positions 1..L−1).
    """
    from sklearn.metrics import roc_auc_score  # scikit-learn loads slowly; only this summary needs it

    from calibration.metrics import expected_calibration_error

    gammas = sorted({check_gamma(g) for g in gammas})
    if not gammas:
        raise CompressError("gammas is empty; give at least one draft length >= 1")
    if not temperature > 0:
        raise CompressError(f"temperature must be > 0, got {temperature}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise CompressError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    device = model_device(target)
    models = {"target": target, "drafter": drafter}
    per_seq = []
    for prompt in _sequences(input_ids):
        prompt = prompt.to(device)
        check_context(models, prompt.numel(), max_new_tokens)
        if max_new_tokens:
            new = target_generate(target, prompt, max_new_tokens, eos_token_id=eos_token_id).tokens
            seq, start = torch.cat([prompt, new]), prompt.numel()
        else:
            if prompt.numel() < 2:
                raise CompressError("scoring a given text needs sequences of at least 2 tokens")
            seq, start = prompt, 1
        per_seq.append(score_positions(target, drafter, seq, start, temperature=temperature,
                                       calibrator=calibrator))

    agrees = [s["agree"].tolist() for s in per_seq]
    confs = [s["confidence"].tolist() for s in per_seq]
    agree = torch.cat([s["agree"] for s in per_seq]).cpu()
    conf = torch.cat([s["confidence"] for s in per_seq]).cpu()
    overlap = torch.cat([s["overlap"] for s in per_seq]).double()
    a, alpha = float(agree.double().mean()), float(overlap.mean())
    g_max = gammas[-1]
    runs = [replay_greedy_rounds(x, g_max) for x in agrees]
    drafted = [sum(r["drafted"][j] for r in runs) for j in range(g_max)]
    accepted = [sum(r["accepted"][j] for r in runs) for j in range(g_max)]
    both_classes = 0 < int(agree.sum()) < agree.numel()
    threshold, stop_acc = best_stop_threshold(conf, agree)
    events = {"events": {"confidence": conf.tolist(), "accepted": agree.tolist()}} if return_events else {}
    return {
        **events,
        "sequences": len(per_seq),
        "positions": int(agree.numel()),
        "mode": "target_greedy_continuation" if max_new_tokens else "given_text",
        "target_self_agreement": (float(torch.cat([s["self_agree"] for s in per_seq]).double().mean())
                                  if max_new_tokens else None),
        "greedy_agreement": a,
        "alpha": alpha,
        "temperature": temperature,
        "tau": {g: _tau(agrees, g) for g in gammas},
        "tau_iid": {g: tau_iid(a, g) for g in gammas},
        "tau_sampling_iid": {g: tau_iid(alpha, g) for g in gammas},
        "acceptance_by_draft_position": {
            "gamma": g_max, "drafted": drafted, "accepted": accepted,
            "rate": [x / d if d else None for x, d in zip(accepted, drafted)]},
        "mean_confidence": float(conf.mean()),
        "confidence_auroc": float(roc_auc_score(agree.numpy(), conf.numpy())) if both_classes else None,
        "confidence_ece": expected_calibration_error(conf, agree, n_bins=n_bins),
        "stop_threshold": {
            "criterion": "accuracy of 'continue drafting iff confidence >= threshold'",
            "threshold": threshold, "accuracy": stop_acc,
            "tau": {g: _tau(agrees, g, confs, threshold) for g in gammas}},
    }


def read_prompts(path: str, max_prompts: int | None = None) -> list[str]:
    """Prompts from a .jsonl file (a 'text' field per line) or a .txt file (blank-line separated)."""
    from compress.data.corpora import documents

    p = Path(path).expanduser()
    if not p.is_file():
        raise CompressError(f"prompt file {path!r} does not exist")
    if p.suffix == ".jsonl":
        texts = [d.text for d in documents(str(p))]
    else:
        try:
            raw = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise CompressError(f"{path} is not UTF-8 text ({e}); re-encode it as UTF-8") from None
        texts = [t.strip("\n") for t in raw.replace("\r\n", "\n").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CompressError(f"{path} holds no prompts (non-empty blank-line separated paragraphs, "
                            f"or .jsonl lines with a 'text' field)")
    return texts[:max_prompts] if max_prompts else texts


def parse_gammas(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; each a draft length >= 1."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CompressError(f"--gammas must be comma-separated integers >= 1, got {text!r}") from None
    if not values:
        raise CompressError(f"--gammas is empty ({text!r}); give e.g. 1,2,3,4,5,6,7,8")
    return [check_gamma(g) for g in values]
