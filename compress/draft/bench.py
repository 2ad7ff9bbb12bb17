"""draft-bench: wall-clock tokens/s of the target alone vs speculative decoding, side by side.

Every row runs compress/draft/loop.py's one loop on decoders prepared once (static caches,
compiled steps and CUDA graphs on GPU with ``compile``) after a warm-up that records every
shape the timed runs use. Each prompt generates exactly ``max_new_tokens`` tokens (EOS is not a
stop: equal work per prompt). Reported (pooled over prompts):

- ``target_alone.tokens_per_s`` (one-row steps: the fastest way to run the target alone) and
  ``speculative.tokens_per_s``: new tokens / wall seconds, prefill included in both;
  ``speedup`` = their ratio.
- ``tau``: tokens per target call; ``acceptance_rate``: accepted / drafted tokens; ``alpha``
  (1 − TV at temperature 1), ``greedy_agreement``, ``tau_teacher_forced``: one teacher-forced pass
  of both over prompt + the target's output (draft-eval's numbers).
- ``c`` = drafting time per drafted token ÷ the target-alone step; ``verify_cost_ratio`` =
  verification time per round ÷ the target-alone step; ``time_split``: shares of the speculative
  wall time spent drafting, verifying, in prefill and in bookkeeping (the rest: host work between
  the device's phases — sampling, acceptance, the sync that reads it). Phases are timed with CUDA
  events, so measuring adds no host sync; ``predicted_speedup`` = τ / (v + γ·c).
- ``identical`` / ``identical_prompts``: the speculative output equals the *matched* target-alone
  reference (the target alone through the verify pass's kernels, loop.py's module docstring) —
  exact by construction; ``identical_to_fast``: the same against the one-row target alone, where a
  bf16 near-tie can round differently (first divergence per prompt reported, not hidden).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from compress.draft.agreement import replay_greedy_rounds, score_positions
from compress.draft.loop import DraftRule, as_drafter, run_speculative, run_target
from compress.draft.speculative import SpecResult, as_prompt, check_gamma
from compress.errors import CompressError

log = logging.getLogger(__name__)


def _ratio(a, b):
    return a / b if a is not None and b else None


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def teacher_forced(target, drafter, prompts, outputs, gamma: int) -> dict:
    """Greedy agreement, α and τ(γ) of ``drafter`` (a model: ``model(input_ids=...)``) on prompt + output."""
    agrees, overlaps = [], []
    for p, out in zip(prompts, outputs):
        s = score_positions(target, drafter, torch.cat([p, out.to(p.device)]), p.numel())
        agrees.append(s["agree"].tolist())
        overlaps.append(s["overlap"].double().cpu())
    flat = [a for row in agrees for a in row]
    runs = [replay_greedy_rounds(a, gamma) for a in agrees]
    return {"greedy_agreement": sum(flat) / len(flat), "alpha": float(torch.cat(overlaps).mean()),
            "tau_teacher_forced": sum(r["tokens"] for r in runs) / sum(r["rounds"] for r in runs)}


def median_run(run, repeats: int = 1):
    """``run()`` ``repeats`` times; the run of median wall time. A row times ~1,000 tokens in ~2 s, where a
    few ms of host or clock jitter show (up to 0.18× between processes on the H200,
    bench/results/draft/h200-selfspec-five-c/README.md); the median of a few runs of each prompt damps it.
    The runs must decode the same tokens (greedy, or sampling with its seed): else a CompressError."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise CompressError(f"repeats must be an integer >= 1, got {repeats!r}")
    runs = [run() for _ in range(repeats)]
    if any(r.tokens.tolist() != runs[0].tokens.tolist() for r in runs[1:]):
        raise CompressError("repeated runs of one prompt decoded different tokens: the decoding is not "
                            "deterministic, so its timings cannot be pooled")
    return sorted(runs, key=lambda r: r.wall_time_s)[(repeats - 1) // 2]


def time_target(decoder, prompts: Sequence[torch.Tensor], max_new_tokens: int, *, pad_to: int | None = None,
                repeats: int = 1) -> dict:
    """The target alone on every prompt (each the median of ``repeats`` runs): outputs, tokens/s and the
    mean decode-step seconds."""
    runs = [median_run(lambda: run_target(decoder, p, max_new_tokens, pad_to=pad_to), repeats) for p in prompts]
    n, wall = sum(r.new_tokens for r in runs), sum(r.wall_time_s for r in runs)
    steps, step_s = sum(r.target_calls for r in runs), sum(r.target_time_s for r in runs)
    return {"runs": runs, "tokens_per_s": n / wall, "new_tokens": n, "wall_s": wall,
            "step_ms": 1e3 * step_s / steps, "prefill_s": sum(r.prefill_time_s for r in runs),
            "pad_to": pad_to}


def time_speculative(target, drafter, prompts, max_new_tokens: int, gamma: int, *, repeats: int = 1, **kw) -> dict:
    """Speculative decoding of every prompt, each the median of ``repeats`` runs (``median_run``)."""
    runs = [median_run(lambda: run_speculative(target, drafter, p, max_new_tokens=max_new_tokens, gamma=gamma, **kw),
                       repeats) for p in prompts]
    return {"runs": runs}


def warm_prefills(target, prompts, drafter=None) -> None:
    """Prefill every prompt once, untimed. A prefill runs eagerly at the prompt's own length, and the
    first pass at a new length pays one-time costs (allocator growth, kernel selection: 35-100 ms a
    prompt on an H200) that would otherwise land in whichever loop is timed first — the H200 run of
    2026-12-02 charged them to the target alone (bench/results/draft/h200-selfspec/README.md). With
    prefill buckets (engine.prefill_bucket) this records each bucket's graphs. A drafter also drafts
    one token after the prefill: a deep self-spec head catches up over the prompt there."""
    drafter = None if drafter is None else as_drafter(drafter)
    with torch.no_grad():
        for p in prompts:
            if p.numel() < 2:
                continue
            if drafter is not None:
                drafter.reset()
                drafter.prefill(p[:-1])
            target.reset()
            target(p[:-1], 1)
            if drafter is not None:
                drafter.draft(p[drafter.length:], 1, DraftRule())


def warm_up(target, drafter, prompt: torch.Tensor, gamma: int, **kw) -> None:
    """Record every shape the timed runs use: short runs whose last rounds draft every budget 0..γ."""
    for n in range(1, gamma + 2):
        run_speculative(target, drafter, prompt, max_new_tokens=n, gamma=gamma, **kw)
    run_speculative(target, drafter, prompt, max_new_tokens=4 * (gamma + 1), gamma=gamma, **kw)
    record = getattr(drafter, "record_catch_ups", None)  # a self-drafter's deep head: counts runs may miss
    if record is not None:
        record(gamma)


def spec_row(spec: dict, alone: dict, matched: dict | None, gamma: int) -> dict:
    """One row of numbers from a speculative run and the target-alone runs on the same prompts."""
    runs: list[SpecResult] = spec["runs"]
    n, wall = sum(r.new_tokens for r in runs), sum(r.wall_time_s for r in runs)
    rounds, drafts = sum(r.target_calls for r in runs), sum(r.drafter_calls for r in runs)
    draft_s, verify_s = sum(r.drafter_time_s for r in runs), sum(r.target_time_s for r in runs)
    prefill_s = sum(r.prefill_time_s for r in runs)
    drafted = [sum(x) for x in zip(*(r.drafted for r in runs))]
    accepted = [sum(x) for x in zip(*(r.accepted for r in runs))]
    step_s = alone["step_ms"] / 1e3
    c = _ratio(_ratio(draft_s, drafts), step_s)
    v = _ratio(_ratio(verify_s, rounds), step_s)
    tau = n / rounds
    ref = matched or alone
    per_prompt = []
    for i, (r, a, f) in enumerate(zip(runs, ref["runs"], alone["runs"])):
        got = r.tokens.tolist()
        per_prompt.append({"prompt": i, "spec_tokens_per_s": r.new_tokens / r.wall_time_s,
                           "alone_tokens_per_s": f.new_tokens / f.wall_time_s, "tau": r.tokens_per_target_call,
                           "identical": got == a.tokens.tolist(), "identical_to_fast": got == f.tokens.tolist(),
                           "first_divergence": first_divergence(got, a.tokens.tolist()),
                           "first_divergence_from_fast": first_divergence(got, f.tokens.tolist())})
    return {
        "gamma": gamma,
        "speculative": {"tokens_per_s": n / wall, "new_tokens": n, "wall_s": wall, "tau": tau, "target_calls": rounds,
                        "drafter_calls": drafts, "acceptance_rate": _ratio(sum(accepted), sum(drafted)),
                        "drafted": drafted, "accepted": accepted, "draft_s": draft_s, "verify_s": verify_s,
                        "prefill_s": prefill_s, "drafter_step_ms": None if c is None else 1e3 * draft_s / drafts,
                        "target_verify_ms": 1e3 * verify_s / rounds},
        "speedup": (n / wall) / alone["tokens_per_s"],
        "c": c, "verify_cost_ratio": v,
        "predicted_speedup": None if c is None else tau / (v + gamma * c),
        "time_split": {"draft": draft_s / wall, "verify": verify_s / wall, "prefill": prefill_s / wall,
                       "bookkeeping": max(wall - draft_s - verify_s - prefill_s, 0.0) / wall},
        "identical": all(p["identical"] for p in per_prompt),
        "identical_prompts": sum(p["identical"] for p in per_prompt),
        "identical_to_fast_prompts": sum(p["identical_to_fast"] for p in per_prompt),
        "reference": "matched" if matched is not None else "fast",
        "per_prompt": per_prompt,
    }


def hf_static_generate(model, prompts: Sequence[torch.Tensor], max_new_tokens: int, assistant=None,
                       **kw) -> dict:
    """Cross-checks with transformers' own ``generate``, greedy, exactly ``max_new_tokens`` tokens a
    prompt: ``cache_implementation="static"`` (compiled on CUDA) without an assistant, or assisted
    generation with ``assistant`` (its defaults unless ``kw`` says otherwise)."""
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    if assistant is None:
        gen["cache_implementation"] = "static"
    else:
        gen.update(assistant_model=assistant, **kw)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    outputs, seconds = [], 0.0
    with torch.inference_mode():
        model.generate(prompts[0][None].to(device), **{**gen, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        for p in prompts:
            sync()
            start = time.perf_counter()
            out = model.generate(p[None].to(device), **gen)
            sync()
            seconds += time.perf_counter() - start
            outputs.append(out[0, p.numel():].tolist())
    return {"tokens_per_s": len(prompts) * max_new_tokens / seconds, "outputs": outputs}


def _cudagraph_counters() -> dict:
    try:
        from torch._dynamo.utils import counters  # private and version-dependent: guarded
    except ImportError:
        return {}
    return {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}


def draft_bench(target, drafter, prompts, *, gamma: int = 4, max_new_tokens: int = 128,
                confidence_threshold: float | None = None, calibrator=None, teacher_drafter=None,
                target_model=None, hf_baseline: bool = False, matched: bool = True, tree: bool = False,
                repeats: int = 1) -> dict:
    """Time the target alone (decoder ``target``) and speculative decoding with ``drafter`` (a decoder
    or a drafter) on the same prompts; see the module docstring. ``teacher_drafter`` / ``target_model``:
    the two as models, for the teacher-forced numbers (skipped when absent). ``tree``: the self-drafter
    pair drafts its static tree (γ is the tree's depth; the matched reference pads to the tree's rows).
    ``repeats``: every timed prompt is the median of that many runs (``median_run``)."""
    pad = gamma + 1
    if tree:
        gamma, pad = target.tree.max_depth, target.tree.size + 1
    check_gamma(gamma)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise CompressError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not prompts:
        raise CompressError("no prompts given")
    prompts = [as_prompt(p).to(target.device) for p in prompts]
    stop = (dict(tree=True) if tree else
            dict(confidence_threshold=confidence_threshold, calibrator=calibrator, pad_verify=matched))
    graphs_before = _cudagraph_counters()
    warm_up(target, drafter, prompts[0], gamma, **stop)
    warm_prefills(target, prompts, drafter)
    run_target(target, prompts[0], 4)
    if matched:
        run_target(target, prompts[0], 4, pad_to=pad)
    alone = time_target(target, prompts, max_new_tokens, repeats=repeats)
    ref = time_target(target, prompts, max_new_tokens, pad_to=pad, repeats=repeats) if matched else None
    spec = time_speculative(target, drafter, prompts, max_new_tokens, gamma, repeats=repeats, **stop)
    row = spec_row(spec, alone, ref, gamma)
    result = {"gamma": gamma, "max_new_tokens": max_new_tokens, "prompts": len(prompts), "device": str(target.device),
              "repeats": repeats,
              "confidence_threshold": confidence_threshold,
              "calibrator": None if calibrator is None else (
                  calibrator.describe() if hasattr(calibrator, "describe") else repr(calibrator)),
              "target_alone": {k: alone[k] for k in ("tokens_per_s", "new_tokens", "wall_s", "step_ms", "prefill_s")},
              "matched_reference": None if ref is None else {k: ref[k] for k in ("tokens_per_s", "step_ms", "pad_to")},
              **row,
              "cudagraph_counters": {k: v - graphs_before.get(k, 0) for k, v in _cudagraph_counters().items()}}
    if teacher_drafter is not None and target_model is not None:
        result.update(teacher_forced(target_model, teacher_drafter, prompts, [r.tokens for r in alone["runs"]], gamma))
    if not result["identical"]:
        log.warning("draft-bench: speculative output differs from the reference on %d of %d prompts",
                    len(prompts) - result["identical_prompts"], len(prompts))
    if hf_baseline and target_model is not None:
        hf = hf_static_generate(target_model, prompts, max_new_tokens)
        result["hf_static_generate"] = {
            "tokens_per_s": hf["tokens_per_s"],
            "identical_to_fast_target": all(o == r.tokens.tolist() for o, r in zip(hf["outputs"], alone["runs"]))}
    return result


def plot_bench(result: dict, path: str | Path) -> None:
    """Two panels: tokens/s per prompt (target alone vs speculative), acceptance by draft position."""
    import matplotlib  # slow to import; only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["per_prompt"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["alone_tokens_per_s"] for r in rows], width=0.4, label="target alone")
    ax1.bar([i + 0.2 for i in x], [r["spec_tokens_per_s"] for r in rows], width=0.4, label="speculative")
    ax1.set_xlabel("prompt")
    ax1.set_ylabel("tokens / s")
    ax1.set_xticks(list(x))
    ax1.legend()
    ax1.set_title(f"speedup {result['speedup']:.2f}x (predicted {result['predicted_speedup'] or float('nan'):.2f}x)")
    spec = result["speculative"]
    rates = [a / d if d else 0.0 for a, d in zip(spec["accepted"], spec["drafted"])]
    ax2.bar([j + 1 for j in range(len(rates))], rates)
    ax2.set_ylim(0, 1)
    ax2.set_xticks([j + 1 for j in range(len(rates))])
    ax2.set_xlabel("draft position")
    ax2.set_ylabel("accepted / drafted")
    c = result["c"]
    ax2.set_title(f"γ={result['gamma']}  τ={spec['tau']:.2f}  α={result.get('alpha', float('nan')):.2f}  "
                  f"c={'n/a' if c is None else f'{c:.2f}'}")
    fig.suptitle(f"{result.get('target', 'target')} ← {result.get('drafter', 'drafter')}  "
                 f"({result['device']}, {result.get('dtype', '')}, compile={result.get('compile')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_bench(result: dict, out) -> None:
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "draft_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_bench(result, folder / "draft_bench.png")
