"""Structured pruning quality: NIRVANA vs Taylor vs Wanda-sp vs magnitude, same units, same data.

Every method starts from the same dense weights, scores on the same calibration windows
(magnitude uses none), goes through the same allocation and physical removal — each row is a
recipe (``compress.recipe`` objects) run by ``compress.pipeline.run_recipe``, as ``compress run``
runs it — and is evaluated on the same held-out windows: perplexity on prose (BBC test) and on code
(stdlib test), and BBC-topic zero-shot accuracy (label words scored by the LM).

    python bench/prune_quality.py --model smollm2-135m --calib-corpus bbc \
        --out bench/results/prune/smollm2-135m.json --plot bench/results/prune/smollm2-135m.png
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

METHODS = ("nirvana", "taylor", "wanda", "magnitude")
EVALS = {"prose": ("bbc", "test"), "code": ("stdlib", "test")}


def recipe(args, method: str | None = None, sparsity: float = 0.0):
    """The recipe of one row: the model alone (dense), or one pruning step on the calibration windows."""
    from compress.recipe import CalibrationSpec, ModelSpec, Recipe, Stage
    model = ModelSpec(id=args.model, dtype=args.dtype, device=args.device)
    if method is None:
        return Recipe(model=model)
    return Recipe(model=model,
                  calibration=CalibrationSpec(corpus=args.calib_corpus, split="train", num_samples=args.calib_samples,
                                              seq_len=args.calib_seq_len, seed=args.seed, batch_size=8),
                  stages=[Stage(name="prune", steps=[{"algorithm": method, "sparsity": sparsity, "gamma": args.gamma,
                                                      "allocation": args.allocation}])])


def quiet(*_) -> None:
    """run_recipe's log: the rows printed here are the progress."""


def evaluate(model, tokenizer, args, windows, device) -> dict:
    import torch

    from compress.evaluate import evaluate_windows
    from compress.tasks import bbc_topic_examples, topic_accuracy
    out = {}
    with torch.inference_mode():
        for name, ids in windows.items():
            r = evaluate_windows(model, ids, batch_size=args.eval_batch, device=device, progress=False)
            out[f"{name}_ppl"] = round(r["perplexity"], 4)
        if args.topics:
            t = topic_accuracy(model, tokenizer, bbc_topic_examples("test", max_examples=args.topics),
                               device=device, batch_size=8)
            out["topic_accuracy"], out["topic_ece"] = round(t["accuracy"], 4), round(t["ece"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sparsities", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--gamma", type=float, default=3.0)
    ap.add_argument("--allocation", default="adaptive", choices=["adaptive", "uniform"])
    ap.add_argument("--calib-corpus", default="bbc")
    ap.add_argument("--calib-samples", type=int, default=32)  # NIRVANA's default: 32 x 128
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=4)
    ap.add_argument("--topics", type=int, default=200, help="BBC test articles for zero-shot accuracy (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot")
    args = ap.parse_args()

    import torch

    from compress.data import corpus_text
    from compress.evaluate import window_token_ids
    from compress.pipeline import run_recipe

    # Every row is a recipe run as `compress run` runs it: the dense row has no stage, each
    # pruned row one step; the same calibration windows (a seeded set: the same digest) each time.
    dense = run_recipe(recipe(args), progress=False, log=quiet)
    tok, device = dense.tokenizer, torch.device(dense.report["model"]["device"])
    machine = dense.report["versions"]
    windows = {name: window_token_ids(tok, corpus_text(c, s), args.eval_seq_len, args.eval_windows)
               for name, (c, s) in EVALS.items()}
    rows = [{"method": "dense", "sparsity": 0.0, **evaluate(dense.model, tok, args, windows, device)}]
    print(json.dumps(rows[-1]), flush=True)
    del dense
    calib_digest = None
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        for method in args.methods.split(","):
            run = run_recipe(recipe(args, method, sparsity), progress=False, log=quiet)
            rep = run.report["stages"][0]["steps"][0]
            calib_digest = run.report["calibration"]["digest"]
            rows.append({"method": method, "sparsity": sparsity, "achieved_sparsity": rep["sparsity"],
                         "kv_groups_pruned": rep["kv_groups_pruned"], "channels_pruned": rep["channels_pruned"],
                         "prune_seconds": round(rep["seconds"], 2),
                         **evaluate(run.model, tok, args, windows, device)})
            print(json.dumps(rows[-1]), flush=True)
            del run
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result = {"command": "python bench/prune_quality.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
              "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(), **machine},
              "calibration": {"corpus": args.calib_corpus, "samples": args.calib_samples,
                              "seq_len": args.calib_seq_len, "digest": calib_digest},
              "eval": {"seq_len": args.eval_seq_len, "windows": args.eval_windows, "topics": args.topics},
              "gamma": args.gamma, "allocation": args.allocation, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.plot:
        plot(result, Path(args.plot), args.model)


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    dense = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, ("prose_ppl", "code_ppl")):
        for method in METHODS:
            pts = sorted((r["sparsity"], r[key]) for r in rows if r["method"] == method)
            if pts:
                ax.plot([0.0] + [p[0] for p in pts], [dense[key]] + [p[1] for p in pts], marker="o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity (fraction of attention+MLP parameters removed)")
        ax.set_ylabel(f"perplexity ({key.split('_')[0]})")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: structured pruning, no recovery")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
