"""draft-bench: wall-clock tokens/s of the target alone vs speculative decoding, both on the fast path.

For each prompt the target alone (``fast_target_generate``) and speculative decoding
(``fast_speculative_generate``, greedy, fixed γ) generate exactly ``max_new_tokens`` tokens (EOS
is not a stop: equal work per prompt), with static KV caches and, with ``compile``, compiled
decode steps whose every shape is compiled/recorded before timing. Reported (pooled over prompts):

- ``target_alone.tokens_per_s`` / ``speculative.tokens_per_s``: new tokens / wall seconds,
  prefill included in both; ``speedup`` = their ratio.
- ``tau``: tokens per target call of the loop; ``acceptance_rate``: accepted / drafted tokens.
- ``alpha`` (1 − TV at temperature 1), ``greedy_agreement`` and ``tau_teacher_forced`` from one
  teacher-forced pass of both models over prompt + the target's output (draft-eval's numbers).
- ``c`` = mean drafter decode step (1–2 tokens) ÷ mean target decode step (1 token, target alone),
  each call timed apart (CUDA synchronized); ``predicted_speedup`` = τ / (γ·c + 1);
  ``verify_cost_ratio`` = mean target verify call ÷ target decode step.
- ``identical``: every prompt's speculative output equals the target's own, token for token.
  On CUDA in bf16 a verify pass over γ+1 tokens can round a near-tie differently from a 1-token
  step; divergences are reported (first position per prompt), not hidden.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from compress.draft.agreement import read_prompts, replay_greedy_rounds, score_positions
from compress.draft.fast import cache_len_for, decoder_pair, fast_speculative_generate, fast_target_generate
from compress.draft.speculative import as_prompt, check_context, check_gamma
from compress.errors import CompressError

log = logging.getLogger(__name__)


def _ratio(a, b):
    return a / b if a is not None and b else None


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _teacher_forced(target, drafter, prompts, outputs, gamma: int) -> dict:
    agrees, overlaps = [], []
    for p, out in zip(prompts, outputs):
        s = score_positions(target, drafter, torch.cat([p, out.to(p.device)]), p.numel())
        agrees.append(s["agree"].tolist())
        overlaps.append(s["overlap"].double().cpu())
    flat = [a for row in agrees for a in row]
    runs = [replay_greedy_rounds(a, gamma) for a in agrees]
    return {"greedy_agreement": sum(flat) / len(flat), "alpha": float(torch.cat(overlaps).mean()),
            "tau_teacher_forced": sum(r["tokens"] for r in runs) / sum(r["rounds"] for r in runs)}


def hf_static_generate(model, prompts: Sequence[torch.Tensor], max_new_tokens: int) -> dict:
    """Cross-check: transformers' ``generate(cache_implementation="static")`` (which compiles the
    forward itself on CUDA), greedy, exactly ``max_new_tokens`` tokens per prompt."""
    kw = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              cache_implementation="static", pad_token_id=0)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    outputs, seconds = [], 0.0
    with torch.inference_mode():
        model.generate(prompts[0][None].to(device), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        for p in prompts:
            sync()
            start = time.perf_counter()
            out = model.generate(p[None].to(device), **kw)
            sync()
            seconds += time.perf_counter() - start
            outputs.append(out[0, p.numel():].tolist())
    return {"tokens_per_s": len(prompts) * max_new_tokens / seconds, "outputs": outputs}


def _cudagraph_counters() -> dict:
    """inductor's CUDA-graph counters (e.g. ``cudagraph_skips``): a compiled step that silently runs
    without graphs is launch-bound, and the timings should say so."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    return {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}


def draft_bench(target, drafter, prompts, *, gamma: int = 4, max_new_tokens: int = 128, compile: bool = False,
                static: bool = True, hf_baseline: bool = False, confidence_threshold: float | None = None,
                calibrator=None) -> dict:
    """Time the target alone and speculative decoding on the same prompts; see the module docstring.

    ``confidence_threshold``: confidence-stopped drafting (``calibrator`` maps raw drafter
    confidences first); every verify length 1..γ+1 is then compiled, not only γ+1."""
    check_gamma(gamma)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise CompressError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not prompts:
        raise CompressError("no prompts given")
    device = next(target.parameters()).device
    prompts = [as_prompt(p).to(device) for p in prompts]
    for p in prompts:
        check_context({"target": target, "drafter": drafter}, p.numel(), max_new_tokens)
    stop = dict(confidence_threshold=confidence_threshold, calibrator=calibrator)
    graphs_before = _cudagraph_counters()
    t, d = decoder_pair(target, drafter, cache_len_for([p.numel() for p in prompts], max_new_tokens),
                        gamma, compile=compile, static=static,
                        verify_lengths=range(1, gamma + 2) if confidence_threshold is not None else None)
    # untimed pass of both loops: first-call allocations and lazy cache init stay out of the timings
    fast_target_generate(t, prompts[0], min(8, max_new_tokens))
    fast_speculative_generate(t, d, prompts[0], max_new_tokens=min(8, max_new_tokens), gamma=gamma, **stop)

    alone, spec, rows = [], [], []
    step_t = {"calls": 0, "s": 0.0}
    verify = {"calls": 0, "s": 0.0}
    step_d = {"calls": 0, "s": 0.0}
    eager = {"target": 0, "drafter": 0}  # compiled decoders: timed steps whose shape ran uncompiled
    for i, p in enumerate(prompts):
        t.clear_stats()
        base = fast_target_generate(t, p, max_new_tokens)
        s1 = t.stats.get("step1", [0, 0.0])
        step_t["calls"] += s1[0]
        step_t["s"] += s1[1]
        t.clear_stats()
        d.clear_stats()
        res = fast_speculative_generate(t, d, p, max_new_tokens=max_new_tokens, gamma=gamma, **stop)
        eager["target"] += t.eager_steps
        eager["drafter"] += d.eager_steps
        for dec, acc in ((t, verify), (d, step_d)):
            for k, (calls, secs) in dec.stats.items():
                if k.startswith("step"):
                    acc["calls"] += calls
                    acc["s"] += secs
        alone.append(base)
        spec.append(res)
        a, b = base.tokens.tolist(), res.tokens.tolist()
        rows.append({"prompt": i, "prompt_tokens": p.numel(),
                     "alone_tokens_per_s": base.new_tokens / base.wall_time_s,
                     "spec_tokens_per_s": res.new_tokens / res.wall_time_s,
                     "tau": res.tokens_per_target_call, "identical": a == b,
                     "first_divergence": _first_divergence(a, b)})
    n_alone, s_alone = sum(r.new_tokens for r in alone), sum(r.wall_time_s for r in alone)
    n_spec, s_spec = sum(r.new_tokens for r in spec), sum(r.wall_time_s for r in spec)
    target_calls = sum(r.target_calls for r in spec)
    drafted = [sum(x) for x in zip(*(r.drafted for r in spec))]
    accepted = [sum(x) for x in zip(*(r.accepted for r in spec))]
    tau = n_spec / target_calls
    t_step = _ratio(step_t["s"], step_t["calls"])
    d_step = _ratio(step_d["s"], step_d["calls"])
    v_step = _ratio(verify["s"], verify["calls"])
    c = _ratio(d_step, t_step)
    result = {
        "gamma": gamma, "max_new_tokens": max_new_tokens, "prompts": len(prompts),
        "device": str(device), "dtype": str(next(target.parameters()).dtype).replace("torch.", ""),
        "compile": compile, "static_cache": {"target": t.static, "drafter": d.static},
        "eager_steps": eager if compile else None,
        "cuda_graphs": {"target": t.graph_mode, "drafter": d.graph_mode,
                        "capture_errors": [e for e in (t.graph_error, d.graph_error) if e]},
        "cudagraph_counters": {k: v - graphs_before.get(k, 0) for k, v in _cudagraph_counters().items()},
        "confidence_threshold": confidence_threshold, "calibrator": None if calibrator is None else (
            calibrator.describe() if hasattr(calibrator, "describe") else repr(calibrator)),
        "target_alone": {"tokens_per_s": n_alone / s_alone, "new_tokens": n_alone, "wall_s": s_alone,
                         "step_ms": None if t_step is None else 1e3 * t_step},
        "speculative": {"tokens_per_s": n_spec / s_spec, "new_tokens": n_spec, "wall_s": s_spec,
                        "tau": tau, "target_calls": target_calls,
                        "drafter_calls": sum(r.drafter_calls for r in spec),
                        "acceptance_rate": sum(accepted) / sum(drafted) if sum(drafted) else None,
                        "drafted": drafted, "accepted": accepted,
                        "target_time_s": sum(r.target_time_s for r in spec),
                        "drafter_time_s": sum(r.drafter_time_s for r in spec),
                        "drafter_step_ms": None if d_step is None else 1e3 * d_step,
                        "target_verify_ms": None if v_step is None else 1e3 * v_step},
        "c": c,
        "verify_cost_ratio": _ratio(v_step, t_step),
        "speedup": (n_spec / s_spec) / (n_alone / s_alone),
        "predicted_speedup": None if c is None else tau / (gamma * c + 1),
        "identical": all(r["identical"] for r in rows),
        "identical_prompts": sum(r["identical"] for r in rows),
        **_teacher_forced(target, drafter, prompts, [r.tokens for r in alone], gamma),
        "per_prompt": rows,
    }
    if not result["identical"]:
        log.warning("draft-bench: speculative output differs from the target alone on %d of %d prompts "
                    "(float near-ties; see per_prompt.first_divergence)", len(rows) - result["identical_prompts"],
                    len(rows))
    if hf_baseline:
        hf = hf_static_generate(target, prompts, max_new_tokens)
        result["hf_static_generate"] = {
            "tokens_per_s": hf["tokens_per_s"],
            "identical_to_fast_target": all(o == r.tokens.tolist() for o, r in zip(hf["outputs"], alone))}
    return result


def plot_bench(result: dict, path: str | Path) -> None:
    """Two panels: tokens/s per prompt (target alone vs speculative), acceptance by draft position."""
    import matplotlib
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
    ax2.set_title(f"γ={result['gamma']}  τ={spec['tau']:.2f}  α={result['alpha']:.2f}  "
                  f"c={'n/a' if c is None else f'{c:.2f}'}")
    fig.suptitle(f"{result.get('target', 'target')} ← {result.get('drafter', 'drafter')}  "
                 f"({result['device']}, {result['dtype']}, compile={result['compile']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draft_bench_sources(target: str, drafter: str, prompts: str, *, gamma: int = 4, max_new_tokens: int = 128,
                        max_prompts: int | None = None, device="cpu", dtype="float32", int4_drafter: bool = False,
                        compile: bool = False, hf_baseline: bool = False, confidence_threshold: float | None = None,
                        out: str | None = None) -> dict:
    """``draft_bench`` on models given as zoo ids / directories / exports and a prompt file;
    writes ``draft_bench.json`` and ``draft_bench.png`` into ``out`` when given."""
    from compress.draft.speculative import check_same_vocabulary
    from compress.models import load_model
    from compress.pipeline import versions

    check_gamma(gamma)
    texts = read_prompts(prompts, max_prompts)
    t = load_model(target, dtype=dtype, device=device)
    d = load_model(drafter, dtype=dtype, device=device)
    check_same_vocabulary(t.tokenizer, d.tokenizer)
    int4 = None
    if int4_drafter:
        from compress.draft.int4 import int4_linears_from_gptq
        int4 = int4_linears_from_gptq(d.model, d.path)
    ids = [t.tokenizer(p, return_attention_mask=False)["input_ids"] for p in texts]
    # a calibrator fitted on drafter acceptance (target "drafter") maps confidences before the threshold;
    # token-level calibrators answer a different question (is the drafter right about the text)
    calibrator = d.calibrator if d.calibrator is not None and getattr(d.calibrator, "target", None) == "drafter" else None
    result = draft_bench(t.model, d.model, ids, gamma=gamma, max_new_tokens=max_new_tokens, compile=compile,
                         hf_baseline=hf_baseline, confidence_threshold=confidence_threshold, calibrator=calibrator)
    dev = torch.device(device)
    machine = {"device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "torch_threads": torch.get_num_threads(), **versions()}
    result = {"target": target, "drafter": drafter, "prompts_file": prompts,
              "int4_drafter": None if int4 is None else {"linears": len(int4["converted"]),
                                                          "kept_float": len(int4["kept_float"])},
              "machine": machine, **result}
    if out:
        folder = Path(out).expanduser()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "draft_bench.json").write_text(json.dumps(result, indent=2) + "\n")
        plot_bench(result, folder / "draft_bench.png")
    return result
