"""lm-evaluation-harness numbers for SmolLM2-135M: float, GPTQ W4 g128, GPTQ W3 g128, NIRVANA 20%.

Each compressed model is built the way users build it (the shipped recipe, run by ``run_recipe``,
exported), then loaded back through our own loader (``load_model``: the GPTQ export dequantized,
the pruned checkpoint rebuilt) and scored with ``compress.harness.run_tasks`` — the path of
``compress eval EXPORT --tasks ...``. Every model sees the same seeded document subset per task.

    python bench/lm_eval_table.py --out bench/results/serving/lm-eval-smollm2-cpu.json \\
        [--limits arc_easy=30,piqa=30,...] [--calib-samples 32] [--work DIR]
    python bench/lm_eval_table.py --table bench/results/serving/lm-eval-smollm2-cpu.json  # markdown

The models can be split over processes (``--models float,gptq-w4g128`` and ``--models
nirvana-20,gptq-w3g128``, each with its own ``--out``) and their JSONs joined with ``--merge A B
--out C``, which refuses files measured with other tasks, limits or seed.

The JSON is rewritten after every model, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from compress.harness.run import run_tasks  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.pipeline import run_recipe  # noqa: E402
from compress.recipe import load_recipe  # noqa: E402
from compress.runtime import versions  # noqa: E402

MODELS = {  # name -> recipe (None: the zoo model as it is)
    "float": None,
    "gptq-w4g128": "recipes/smollm2-gptq-w4g128.yaml",
    "nirvana-20": "recipes/smollm2-nirvana-20.yaml",
    "gptq-w3g128": "recipes/smollm2-gptq-w3g128.yaml",
}
# Small on purpose: on 2 shared CPU cores lm-eval scores SmolLM2-135M at tens of tokens a second.
DEFAULT_LIMITS = "arc_easy=25,hellaswag=10,piqa=25,winogrande=25,bbc_topics=15,stdlib_completion=15"


def markdown(results: dict) -> str:
    """The results JSON as one markdown table: a row per task and metric, a column per model
    (value ± lm-eval's stderr where it has one)."""
    models = list(results["models"])
    first = results["models"][models[0]]["tasks"]
    lines = ["| task (metric, documents scored of split) | " + " | ".join(models) + " |",
             "|---" * (len(models) + 1) + "|"]
    for task, row in first.items():
        for metric in [m for m in row if m in ("acc", "acc_norm", "bits_per_byte")]:
            cells = []
            for name in models:
                r = results["models"][name]["tasks"][task]
                err = r.get(f"{metric}_stderr")
                cells.append(f"{r[metric]:.3f}" + (f" ± {err:.3f}" if isinstance(err, float) else ""))
            lines.append(f"| {task} ({metric}, {row['examples']} of {row['of']} {row['split'].split()[0]}) | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge(paths: list[str]) -> dict:
    """One results JSON from several runs over disjoint models with the same tasks, limits and seed."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    for key in ("tasks", "limits", "seed"):
        if any(p[key] != parts[0][key] for p in parts):
            raise SystemExit(f"--merge: {key} differ between {', '.join(paths)}")
    names = [n for p in parts for n in p["models"]]
    if len(set(names)) != len(names):
        raise SystemExit(f"--merge: a model is in more than one file: {names}")
    models = {n: m for p in parts for n, m in p["models"].items()}
    # a part may itself be a merge (commands / machines lists): merging is associative
    commands = [c for p in parts for c in p.get("commands", [p.get("command")])]
    machines = [m for p in parts for m in p.get("machines", [p.get("machine")])]
    return {"commands": commands, "machines": machines,
            **{k: parts[0][k] for k in ("tasks", "limits", "seed")},
            "models": {n: models[n] for n in [*MODELS, *models] if n in models}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", help="print the markdown table of this results JSON and exit")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="join these results JSONs into --out and exit")
    ap.add_argument("--out")
    ap.add_argument("--limits", default=DEFAULT_LIMITS, help="task=N,... (documents per task, seeded subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows for the recipes (--set)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--work", default="out/lm-eval-table", help="where the exports are written")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return 0
    if not args.out:
        ap.error("--out is required (or --table)")
    if args.merge:
        Path(args.out).write_text(json.dumps(merge(args.merge), indent=1) + "\n")
        return 0
    limits = {k: int(v) for k, v in (item.split("=") for item in args.limits.split(","))}
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
           "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "platform": platform.platform(), **versions()},
           "tasks": list(limits), "limits": limits, "seed": args.seed, "models": {}}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        entry: dict = {"recipe": MODELS[name]}
        if MODELS[name] is None:
            source = "smollm2-135m"
        else:
            overrides = [f"calibration.num_samples={args.calib_samples}", "verify=null"]
            recipe = load_recipe(MODELS[name], overrides)
            source = str(Path(args.work) / name)
            result = run_recipe(recipe, out_dir=source, force=True, progress=False)
            entry.update(overrides=overrides, export=recipe.export.format,
                         build_seconds=round(time.perf_counter() - t0, 1))
        loaded = load_model(source)
        t1 = time.perf_counter()
        summary, _ = run_tasks(loaded.model, loaded.tokenizer, list(limits), limit=limits, seed=args.seed)
        entry.update(source=source, parameters=sum(p.numel() for p in loaded.model.parameters()),
                     eval_seconds=round(time.perf_counter() - t1, 1), **summary)
        out["models"][name] = entry
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        print(f"{name}: " + ", ".join(f"{t} {r.get('acc', r.get('bits_per_byte')):.3f}" for t, r in
                                      summary["tasks"].items()) + f" ({entry['eval_seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
