"""lm-evaluation-harness tasks on the model this toolkit holds in memory.

The model object goes to lm-eval's ``HFLM`` as it is (``pretrained=model``): float, dequantized by
our loaders, pruned — nothing is re-loaded from disk. A shipped next-token temperature (a
``recalibrate`` step with ``target: tokens``) divides the logits lm-eval scores; a calibrator of
the BBC-topic scores or of drafter confidences does not act on lm-eval's log-likelihoods and is
reported as not applied.

Every task runs zero-shot over local data (``compress/harness/data.py``); ``limit`` scores a seeded
random subset of a task's documents (the same subset for every model, for a given seed), through
lm-eval's ``samples``.
"""
from __future__ import annotations

import logging
import random
import shutil
import tempfile
from pathlib import Path

from compress.errors import CompressError
from compress.harness.catalog import check_lm_eval_installed, parse_task_list, scored_split
from compress.harness.data import data_root, write_task_folder

BOOTSTRAP_ITERS = 1000  # stderr of perplexity-like metrics (acc has a closed form)


def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    class CalibratedHFLM(HFLM):
        """HFLM whose logits go through ``logits_fn`` (a temperature) before lm-eval scores them."""

        def __init__(self, *args, logits_fn=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._logits_fn = logits_fn

        def _model_call(self, inps, attn_mask=None, labels=None):
            logits = super()._model_call(inps, attn_mask, labels)
            return logits if self._logits_fn is None else self._logits_fn(logits)

    return CalibratedHFLM


def task_samples(counts: dict[str, int], limit: int | dict[str, int] | None, seed: int) -> dict[str, list[int]]:
    """Seeded document indices per task (``limit``: one count for all tasks, or per task); a task with
    no more documents than its limit is scored whole (absent from the result)."""
    out = {}
    for name, n in counts.items():
        k = limit.get(name) if isinstance(limit, dict) else limit
        if k is not None and k < n:
            out[name] = sorted(random.Random(f"{seed}:{name}").sample(range(n), k))
    return out


def summarize(results: dict, counts: dict[str, int], samples: dict[str, list[int]]) -> dict:
    """{task: {metric: value, metric_stderr: value, examples, of, split, ...}} from lm-eval's results."""
    out = {}
    for name, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if filt and filt != "none" or metric in ("alias", "name", "sample_len"):
                continue
            row[metric] = None if value == "N/A" else value
        row["examples"] = len(samples[name]) if name in samples else counts[name]
        row["of"] = counts[name]
        out[name] = {**row, **scored_split(name)}
    return out


def run_tasks(model, tokenizer, tasks: str | list[str], *, limit: int | dict[str, int] | None = None, seed: int = 0,
              batch_size: int = 16, calibrator=None, log_samples: bool = False) -> tuple[dict, dict]:
    """Run lm-eval ``tasks`` on ``model``; returns (our summary, lm-eval's own results dict, which
    holds each document's scores under ``samples`` with ``log_samples``)."""
    names = parse_task_list(tasks)
    for name, k in (limit.items() if isinstance(limit, dict) else [("every task", limit)]):
        if k is not None and (not isinstance(k, int) or k < 1):
            raise CompressError(f"task limit for {name} must be a whole number >= 1, got {k!r}")
    check_lm_eval_installed()
    import lm_eval.tasks
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    for noisy in ("lm_eval", "lm-eval"):  # a line per request batch at INFO; the CLI logs at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    applied = calibrator is not None and calibrator.target == "tokens" and calibrator.temperature is not None
    folder = Path(tempfile.mkdtemp(prefix="tasks-", dir=data_root()))
    try:
        write_task_folder(names, folder, Path(lm_eval.tasks.__file__).parent)
        manager = TaskManager(include_path=str(folder), include_defaults=False)
        loaded = manager.load(names)["tasks"]
        counts = {name: len(task.eval_docs) for name, task in loaded.items()}
        samples = task_samples(counts, limit, seed)
        lm = _hflm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                           logits_fn=calibrator.scale_logits if applied else None)
        raw = simple_evaluate(lm, tasks=[loaded[n] for n in names], num_fewshot=0, samples=samples or None,
                              log_samples=log_samples, bootstrap_iters=BOOTSTRAP_ITERS, random_seed=seed,
                              numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    import lm_eval as lm_eval_pkg

    summary = {
        "tasks": summarize(raw, counts, samples),
        "settings": {"lm_eval": getattr(lm_eval_pkg, "__version__", None), "num_fewshot": 0, "limit": limit,
                     "seed": seed, "batch_size": batch_size,
                     "calibrator": calibrator.name if applied else None},
    }
    if calibrator is not None and not applied:
        summary["settings"]["calibrator_not_applied"] = (
            f"{calibrator.name} ({calibrator.target}, {calibrator.form}) does not act on next-token log-likelihoods")
    return summary, raw
