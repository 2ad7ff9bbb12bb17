"""Where a self-drafter's rounds spend their time: the speculative loop under torch.profiler, the
kernels of each of the loop's spans (draft, verify, prefill) grouped by name.

    python bench/self_spec_profile.py --target qwen2.5-coder-1.5b --self-spec OUT/self-spec --head k2 \
        --prompts bench/draft_bench_prompts/code.txt --max-prompts 2 --gamma 2 --device cuda --compile \
        --out results/profile.json

The loop runs as in bench/self_spec_bench.py (block engine, recorded graphs, warmed up first); the
profiler's own overhead makes its wall times no speed figure — what it gives is the split: how many
kernels a draft step and a verify pass launch, and which take the time. A span's kernels are those of
the host calls made inside it (graph replays included, where the profiler sees their kernels).
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
from compress.draft.bench import warm_prefills, warm_up  # noqa: E402
from compress.draft.decoders import cache_len, self_spec_pair, target_engine  # noqa: E402
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--self-spec", required=True, help="a self-spec drafter export")
    ap.add_argument("--head", default=None, help="a head of the export (default: the export's default)")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--max-prompts", type=int, default=2)
    ap.add_argument("--gamma", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    t = load_model(args.target, dtype=args.dtype, device=device)
    prompts = [torch.tensor(t.tokenizer(x, return_attention_mask=False)["input_ids"]).to(device)
               for x in read_prompts(args.prompts, args.max_prompts)]
    head, _, _ = load_self_spec(args.self_spec, t.model, args.head)
    engine = target_engine(t.model, cache_len([p.numel() for p in prompts], args.max_new_tokens, args.gamma),
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
    finally:
        loop.RoundClock = real_clock
    result = {"command": " ".join(sys.argv), "machine": versions(), "head": args.head, "gamma": args.gamma,
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
