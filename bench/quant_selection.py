"""Calibration-set selection at low bit widths: each strategy's held-out perplexity in the target
domain against `random`, with the spread over seeds (issue 3, deliverable 7).

Design (the same for every run): the calibration pool a practitioner grabs is general prose
(`bbc` train); `domain` instead draws from the target-domain corpus; `diversity` is k-means over a
bbc pool; `kl` picks among `candidates` bbc sets the one whose GPTQ model keeps the target-domain
probe (validation split) closest to the float model. Every run is GPTQ (asymmetric, damp 0.01,
the recipe defaults) through `compress.pipeline.run_recipe`, then perplexity on the target
domain's test split. SmolLM2's target domain is prose (bbc test), where `domain` equals `random`
(skipped); Qwen2.5-Coder's is code (stdlib test).

    python bench/quant_selection.py --model qwen2.5-coder-0.5b --device cuda \
        --out bench/results/quant/selection-qwen2.5-coder-0.5b.json

Runs go in seed-major order (every strategy and setting at seed 0 first), and the JSON is
rewritten after each one, so `--resume` after an interruption keeps what finished.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SETTINGS = {"w3g128": (3, 128), "w2g64": (2, 64), "w4g128": (4, 128)}
TARGET = {"smollm2-135m": "bbc", "qwen2.5-coder-0.5b": "stdlib", "qwen2.5-coder-1.5b": "stdlib"}
POOL = "bbc"


def recipe(args, setting: str, strategy: str, seed: int) -> dict:
    bits, group = SETTINGS[setting]
    target = TARGET[args.model]
    return {
        "version": 1,
        "model": {"id": args.model, "dtype": "float32", "device": args.device},
        "calibration": {"corpus": target if strategy == "domain" else POOL, "split": "train",
                        "num_samples": args.calib_samples, "seq_len": args.calib_seq_len, "seed": seed,
                        "strategy": strategy, "candidates": args.kl_candidates, "probe_corpus": target,
                        "batch_size": 8},
        "stages": [{"name": "quantize", "steps": [{"algorithm": "gptq", "bits": bits, "group_size": group,
                                                  "sym": False, "damp": 0.01}]}],
        "verify": {"corpus": target, "split": "test", "seq_len": args.eval_seq_len,
                   "max_windows": args.eval_windows},
    }


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for setting in sorted({r["setting"] for r in runs}):
        rows = [r for r in runs if r["setting"] == setting]
        base = {r["seed"]: r["perplexity"] for r in rows if r["strategy"] == "random"}
        for strategy in sorted({r["strategy"] for r in rows}):
            ppl = [r["perplexity"] for r in rows if r["strategy"] == strategy]
            paired = [r["perplexity"] - base[r["seed"]] for r in rows
                      if r["strategy"] == strategy and r["seed"] in base]
            out.setdefault(setting, {})[strategy] = {
                "seeds": len(ppl), "mean": statistics.fmean(ppl), "min": min(ppl), "max": max(ppl),
                "stdev": statistics.stdev(ppl) if len(ppl) > 1 else None,
                "minus_random_same_seed": paired}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(TARGET))
    p.add_argument("--settings", default="w3g128,w2g64")
    p.add_argument("--strategies", default=None, help="default: random,diversity,kl (+domain when the "
                                                      "target domain is not the pool's)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", default="auto")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--kl-candidates", type=int, default=3)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--out", required=True)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    from compress.pipeline import run_recipe

    strategies = (args.strategies.split(",") if args.strategies else
                  ["random", "diversity", "kl"] + (["domain"] if TARGET[args.model] != POOL else []))
    out = Path(args.out)
    done = json.loads(out.read_text()) if args.resume and out.exists() else {}
    runs = done.get("runs", [])
    have = {(r["setting"], r["strategy"], r["seed"]) for r in runs}
    for seed in (int(s) for s in args.seeds.split(",")):
        for setting in args.settings.split(","):
            for strategy in strategies:
                if (setting, strategy, seed) in have:
                    continue
                start = time.perf_counter()
                res = run_recipe(recipe(args, setting, strategy, seed), progress=False, log=lambda *a, **k: None)
                report = res.report
                calib = report["calibration"]
                runs.append({"setting": setting, "strategy": strategy, "seed": seed,
                             "perplexity": report["verify"]["perplexity"], "nll": report["verify"]["nll"],
                             "fingerprint": calib.get("digest"), "selection": calib.get("selection"),
                             "seconds": time.perf_counter() - start})
                print(json.dumps({k: runs[-1][k] for k in ("setting", "strategy", "seed", "perplexity", "seconds")}),
                      flush=True)
                result = {"model": args.model, "target_domain": TARGET[args.model], "pool": POOL,
                          "args": vars(args), "versions": report["versions"], "runs": runs, "summary": summarize(runs)}
                tmp = out.with_suffix(".tmp")
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(result, indent=2) + "\n")
                tmp.replace(out)


if __name__ == "__main__":
    main()
