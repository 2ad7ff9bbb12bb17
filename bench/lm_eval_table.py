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

The JSON is rewritten after every task of every model, so an interrupted run keeps what it measured,
and ``--resume`` goes on from there (same tasks, limits and seed; an export already built in ``--work``
is reused): what the GPU window does, a call of under 10 minutes at a time, with ``--device cuda`` and
limits of ``all`` (every document of the split):

    python bench/lm_eval_table.py --device cuda --batch-size 64 --resume --work /tmp/out/lm-eval-table \
        --limits arc_easy=all,hellaswag=1000,piqa=all,winogrande=all,bbc_topics=all,stdlib_completion=all --out R.json
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


def parse_limits(text: str) -> dict[str, int | None]:
    """``"arc_easy=25,piqa=all"`` -> {task: documents, or None for the whole split}, in order."""
    out: dict[str, int | None] = {}
    for item in text.split(","):
        task, sep, value = item.strip().partition("=")
        if not sep or not task or task in out:
            raise SystemExit(f"--limits: {item!r}: expected TASK=N or TASK=all, each task once (in {text!r})")
        if value == "all":
            out[task] = None
        elif value.isdigit() and int(value) >= 1:
            out[task] = int(value)
        else:
            raise SystemExit(f"--limits: {item!r}: the count must be a whole number >= 1 or 'all'")
    return out


def resume_from(path: Path, limits: dict, seed: int) -> dict | None:
    """The results JSON at ``path`` to go on from, or None if there is none; one measured with other
    tasks, limits or seed is refused (its rows would not be comparable with the new ones)."""
    if not path.is_file():
        return None
    old = json.loads(path.read_text())
    for key, value in (("tasks", list(limits)), ("limits", limits), ("seed", seed)):
        if old.get(key) != value:
            raise SystemExit(f"--resume: {path} was measured with {key} {old.get(key)!r}, this run asks for {value!r}; "
                             "use another --out")
    return old


def tasks_left(results: dict, name: str) -> list[str]:
    """The tasks of ``results`` that model ``name`` has no row for yet, in the table's order."""
    done = results["models"].get(name, {}).get("tasks", {})
    return [t for t in results["tasks"] if t not in done]


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
                r = results["models"][name]["tasks"].get(task)
                if r is None:  # a run still under way (--resume): the row shows what is measured
                    cells.append("—")
                    continue
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
    ap.add_argument("--limits", default=DEFAULT_LIMITS,
                    help="task=N,... (documents per task, seeded subset; N=all: the whole split)")
    ap.add_argument("--device", default="cpu", help="where the recipes run and the models are scored (cpu, cuda)")
    ap.add_argument("--batch-size", type=int, default=16, help="lm-eval's batch size (requests per forward)")
    ap.add_argument("--resume", action="store_true",
                    help="go on from --out: skip the tasks each model has, reuse exports already in --work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows for the recipes (--set); 0 keeps each recipe's own")
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
    limits = parse_limits(args.limits)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "platform": platform.platform(), **versions()}
    out = resume_from(Path(args.out), limits, args.seed) if args.resume else None
    if out is None:
        out = {"command": command, "machine": machine, "tasks": list(limits), "limits": limits, "seed": args.seed,
               "models": {}}
    else:
        out.setdefault("resumed_by", []).append(command)

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.out)

    for name in args.models.split(","):
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; known: {', '.join(MODELS)}")
        left = tasks_left(out, name)
        if not left:
            print(f"{name}: every task measured already (--resume)", flush=True)
            continue
        entry: dict = out["models"].setdefault(name, {"recipe": MODELS[name], "tasks": {}})
        if MODELS[name] is None:
            source = "smollm2-135m"
        else:
            source = str(Path(args.work) / name)
            # an export of an earlier call (same --work) is reused: a cut call would otherwise rebuild it every time
            if "build_seconds" not in entry or not (Path(source) / "config.json").is_file():
                t0 = time.perf_counter()
                overrides = ["verify=null", f"model.device={args.device}"]
                if args.calib_samples:  # 0: the recipe's own calibration size
                    overrides.insert(0, f"calibration.num_samples={args.calib_samples}")
                recipe = load_recipe(MODELS[name], overrides)
                run_recipe(recipe, out_dir=source, force=True, progress=False)
                entry.update(overrides=overrides, export=recipe.export.format,
                             build_seconds=round(time.perf_counter() - t0, 1))
                save()
        loaded = load_model(source, device=args.device)
        entry.update(source=source, parameters=sum(p.numel() for p in loaded.model.parameters()))
        for task in left:  # one task at a time, saved after each: a call cut by its limit keeps what it measured
            t1 = time.perf_counter()
            summary, _ = run_tasks(loaded.model, loaded.tokenizer, [task], limit={task: limits[task]},
                                   seed=args.seed, batch_size=args.batch_size)
            entry["tasks"][task] = summary["tasks"][task]
            entry["eval_seconds"] = round(entry.get("eval_seconds", 0) + time.perf_counter() - t1, 1)
            entry["settings"] = {**summary["settings"], "limit": limits, "device": args.device}
            save()
            r = summary["tasks"][task]
            print(f"{name} {task}: {r.get('acc', r.get('bits_per_byte')):.3f} ({r['examples']} of {r['of']}, "
                  f"{time.perf_counter() - t1:.1f} s)", flush=True)
        del loaded
    return 0


if __name__ == "__main__":
    sys.exit(main())
