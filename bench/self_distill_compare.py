"""Corpus vs self-distillation (train_source) exit heads: held-out numbers of two self_spec runs side by side.

    python bench/self_distill_compare.py --corpus OUT/corpus --generations OUT/generations \
        --machine "2-core shared CPU" --out bench/results/draft/selfdistill-smollm2-cpu.json

Each run folder is a ``compress run`` export of the same recipe, differing only in train_source.
Per head: greedy agreement, α and τ(γ) on the held-out corpus windows (``depth_curve``) and on the
target's greedy continuations of their prompts (``depth_curve_generations``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("greedy_agreement", "alpha", "tau", "predicted_speedup", "best_gamma")


def _step(folder: Path) -> dict:
    report = json.loads((folder / "report.json").read_text())
    return report["stages"][0]["steps"][0]


def _curve(curve: dict) -> dict:
    return {head: {k: row[k] for k in KEYS} for head, row in curve.items()}


def compare(runs: dict[str, Path]) -> dict:
    out = {}
    for name, folder in runs.items():
        step = _step(folder)
        if "depth_curve_generations" not in step:
            raise SystemExit(f"{folder}: the report has no depth_curve_generations (run with eval_generations: true)")
        t = step["training"]
        out[name] = {"training": {k: t.get(k) for k in ("source", "steps", "batch_size", "seq_len", "tokens", "seconds",
                                                        "final_loss", "loss_positions", "prompt_tokens",
                                                        "generate_tokens", "windows", "held_out_windows",
                                                        "held_out_generations")},
                     "held_out_corpus": _curve(step["depth_curve"]),
                     "held_out_generations": _curve(step["depth_curve_generations"])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, type=Path)
    ap.add_argument("--generations", required=True, type=Path)
    ap.add_argument("--machine", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--command", default="", help="the commands that produced the runs, recorded verbatim")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    result = {"machine": args.machine, "note": args.note, "command": args.command,
              "runs": compare({"corpus": args.corpus, "generations": args.generations})}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    for name, run in result["runs"].items():
        for head in run["held_out_corpus"]:
            print(f"{name:12s} {head}: agreement corpus {run['held_out_corpus'][head]['greedy_agreement']:.4f} "
                  f"generations {run['held_out_generations'][head]['greedy_agreement']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
