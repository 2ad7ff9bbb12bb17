"""Where a self-drafter's rounds spend their time: the speculative loop under torch.profiler, the
kernels of each of the loop's spans (draft, verify, prefill; and `target`, one target-alone decode
step) grouped by name; then, unprofiled, the loop's own c, verify/step and time split.

    python bench/self_spec_profile.py --target qwen2.5-coder-1.5b --self-spec OUT/self-spec --head k2 \
        --prompts bench/draft_bench_prompts/code.txt --max-prompts 2 --gamma 2 --device cuda --compile \
        --out results/profile.json

The loop runs as in bench/self_spec_bench.py (block engine, recorded graphs, warmed up first); the
profiler's own overhead makes its wall times no speed figure — what it gives is the split: how many
kernels a draft step and a verify pass launch, and which take the time. A span's kernels are those of
the host calls made inside it (graph replays included, where the profiler sees their kernels).

    python bench/self_spec_profile.py --target random:qwen2.5-coder-1.5b --context deep --exit-layer 2 \
        --gamma 2 --device cuda --compile --out results/profile-random.json

measures the same on random weights of a real shape with a random head: no weights to stage, costs
only (its drafts are rarely accepted, so rounds are short and catch-ups few).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.draft import loop  # noqa: E402
from compress.draft.agreement import read_prompts  # noqa: E402
from compress.draft.bench import spec_row, time_speculative, time_target, warm_prefills, warm_up  # noqa: E402
from compress.draft.decoders import cache_len, self_spec_pair, target_engine  # noqa: E402
from compress.draft.selfspec.head import ExitHead  # noqa: E402
from compress.draft.selfspec.step import load_self_spec  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.pipeline import resolve_device, versions  # noqa: E402

SPAN = "span:"


class _SpannedClock(loop.RoundClock):
    """The loop's clock, each span also a profiler range named ``span:<phase>``."""

    def start(self, phase: str) -> None:
        self._range = record_function(SPAN + phase)
        self._range.__enter__()
        super().start(phase)

    def stop(self) -> None:
        super().stop()
        self._range.__exit__(None, None, None)


def _device_us(event) -> float:
    return float(getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0) or 0)


def _kernels(event):
    """(name, microseconds) of every kernel launched under ``event`` (its descendants' too)."""
    out = [(k.name, k.duration) for k in getattr(event, "kernels", [])]
    for child in event.cpu_children:
        out += _kernels(child)
    return out


def summarise(prof, rounds: int, top: int = 15) -> dict:
    """Per span: calls, host time, device time, kernel launches and the top kernels by device time."""
    spans = defaultdict(lambda: {"calls": 0, "host_us": 0.0, "device_us": 0.0, "kernels": 0,
                                 "by_kernel": defaultdict(lambda: [0, 0.0])})
    for ev in prof.events():
        if not ev.name.startswith(SPAN):
            continue
        s = spans[ev.name[len(SPAN):]]
        s["calls"] += 1
        s["host_us"] += ev.cpu_time_total
        s["device_us"] += _device_us(ev)
        for name, us in _kernels(ev):
            s["kernels"] += 1
            s["by_kernel"][name][0] += 1
            s["by_kernel"][name][1] += us
    out = {}
    for name, s in spans.items():
        ranked = sorted(s["by_kernel"].items(), key=lambda kv: -kv[1][1])[:top]
        out[name] = {"calls": s["calls"], "host_us_per_call": round(s["host_us"] / s["calls"], 1),
                     "device_us_per_call": round(s["device_us"] / s["calls"], 1),
                     "kernels_per_call": round(s["kernels"] / s["calls"], 1),
                     "top_kernels": [{"name": k[:120], "launches": n, "us_total": round(us, 1)}
                                     for k, (n, us) in ranked]}
    return {"rounds": rounds, "spans": out}


def _inputs(args, device):
    """(model, head, prompts): a real target, export and prompt file, or a random-weight target of a
    real shape with a random head (costs, not acceptance: its drafts are rarely accepted)."""
    if args.target.startswith("random:"):
        from bench.self_spec_smoke import random_model
        dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
        model = random_model(args.target.split(":", 1)[1], device, dtype)
        vocab = torch.arange(min(args.vocab, model.config.vocab_size))
        head = ExitHead(model, args.exit_layer, vocab, context=args.context).to(device)
        gen = torch.Generator().manual_seed(1)
        lens = (40, 90, 60, 75)[:args.max_prompts]
        return model, head, [torch.randint(1, model.config.vocab_size, (n,), generator=gen).to(device) for n in lens]
    if not (args.self_spec and args.prompts):
        raise SystemExit("--self-spec and --prompts are needed for a real target")
    t = load_model(args.target, dtype=args.dtype, device=device)
    prompts = [torch.tensor(t.tokenizer(x, return_attention_mask=False)["input_ids"]).to(device)
               for x in read_prompts(args.prompts, args.max_prompts)]
    head, _, _ = load_self_spec(args.self_spec, t.model, args.head)
    return t.model, head, prompts


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True,
                    help="a zoo id / folder, or random:SHAPE (bench/self_spec_smoke.py's shapes: no weights to stage)")
    ap.add_argument("--self-spec", help="a self-spec drafter export (a real target)")
    ap.add_argument("--head", default=None, help="a head of the export (default: the export's default)")
    ap.add_argument("--context", default="deep", help="random target: the random head's context")
    ap.add_argument("--exit-layer", type=int, default=2, help="random target: the random head's depth")
    ap.add_argument("--vocab", type=int, default=32768, help="random target: the random head's trimmed vocabulary")
    ap.add_argument("--prompts", help="a prompt file (a real target)")
    ap.add_argument("--max-prompts", type=int, default=2)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    model, head, prompts = _inputs(args, device)
    engine = target_engine(model, cache_len([p.numel() for p in prompts], args.max_new_tokens, args.gamma),
                           compile=args.compile)
    target, drafter = self_spec_pair(engine, head, compile=args.compile)
    kw = dict(max_new_tokens=args.max_new_tokens, gamma=args.gamma, pad_verify=True)
    warm_up(target, drafter, prompts[0], args.gamma, pad_verify=True)
    warm_prefills(target, prompts, drafter)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    real_clock, loop.RoundClock = loop.RoundClock, _SpannedClock
    try:
        with profile(activities=activities) as prof:
            runs = [loop.run_speculative(target, drafter, p, **kw) for p in prompts]
            loop.run_target(target, prompts[0], args.max_new_tokens)  # `target` spans: one per target-alone decode step
    finally:
        loop.RoundClock = real_clock
    # unprofiled, after the profile: the target alone and the loop's own split, for c and verify/step
    alone = time_target(target, prompts, args.max_new_tokens)
    row = spec_row(time_speculative(target, drafter, prompts, args.max_new_tokens, args.gamma, pad_verify=True),
                   alone, None, args.gamma)
    timed = {"target_step_ms": alone["step_ms"], "tau": row["speculative"]["tau"],
             "drafter_step_ms": row["speculative"]["drafter_step_ms"],
             **{k: row[k] for k in ("c", "verify_cost_ratio", "time_split", "speedup")}}
    print(f"unprofiled: target step {alone['step_ms']:.3f} ms; c {row['c']:.3f}, verify/step "
          f"{row['verify_cost_ratio']:.3f}, tau {timed['tau']:.2f}, split {row['time_split']}")
    result = {"command": " ".join(sys.argv), "machine": versions(), "target": args.target, "timed": timed,
              "head": args.head, "gamma": args.gamma,
              "context": head.context, "exit_layer": head.exit_layer, "prompts": len(prompts),
              "new_tokens": sum(r.new_tokens for r in runs),
              **summarise(prof, sum(r.target_calls for r in runs))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for name, s in result["spans"].items():
        print(f"{name}: {s['calls']} calls, {s['kernels_per_call']} kernels and {s['device_us_per_call']} us "
              f"of device time a call; top: {[k['name'][:40] for k in s['top_kernels'][:3]]}")
    return result


if __name__ == "__main__":
    main()
