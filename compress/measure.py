"""What ``compress eval`` and a recipe's ``verify`` measure, and through which calibrator.

Both score perplexity / NLL / top-1 accuracy / ECE on token windows (``compress.evaluate``) and,
when asked, zero-shot BBC-topic accuracy (``compress.tasks``). A shipped calibrator acts on what
it was fitted for — next-token scores or the BBC label scores — and :func:`route` is the one place
that decides which; the raw numbers then sit under ``uncalibrated``.
"""
from __future__ import annotations

import torch

from compress.data import corpus_text
from compress.evaluate import evaluate_windows, window_token_ids
from compress.formats.calibrator import LMCalibrator
from compress.harness.catalog import check_lm_eval_installed, parse_task_list
from compress.models import load_model, load_tokenizer
from compress.runtime import on_device, resolve_device
from compress.tasks import bbc_topic_examples, topic_accuracy


def route(calibrator: LMCalibrator | None) -> tuple[LMCalibrator | None, LMCalibrator | None]:
    """(the calibrator for next-token scores, the one for BBC-topic label scores): a calibrator
    applies to the target it was fitted on and to nothing else (a drafter's to neither)."""
    target = calibrator.target if calibrator is not None else None
    return (calibrator if target == "tokens" else None), (calibrator if target == "topics" else None)


def verify(model, tokenizer, windows: torch.Tensor, spec, device, progress: bool,
           calibrator: LMCalibrator | None = None, desc: str = "verify") -> dict:
    """A recipe's ``verify`` (``spec``: its VerifySpec): the windows' metrics and, with ``spec.topics``,
    BBC-topic accuracy, each through the calibrator that applies. ``desc`` names the progress bars
    (``baseline``, ``verify``)."""
    for_tokens, for_topics = route(calibrator)
    with on_device(model, device):  # a layer-wise stage may keep the model on the CPU until it runs
        out = evaluate_windows(model, windows, batch_size=spec.batch_size, device=device, progress=progress,
                               calibrator=for_tokens, desc=f"{desc} perplexity")
        out.update(corpus=spec.corpus, split=spec.split)
        if spec.topics:
            topics = topic_accuracy(model, tokenizer, bbc_topic_examples("test", max_examples=spec.topics),
                                    device=device, batch_size=8, progress=progress, calibrator=for_topics,
                                    desc=f"{desc} topics")
            out.update(accuracy=topics["accuracy"], topics_ece=topics["ece"],
                       topics={k: topics[k] for k in ("examples", "ece", "uncalibrated") if k in topics})
        if spec.tasks:
            from compress.harness.run import run_tasks  # lm-eval: only recipes that name tasks
            summary, _ = run_tasks(model, tokenizer, spec.tasks, limit=spec.task_limit, calibrator=calibrator)
            out.update(tasks=summary["tasks"], tasks_settings=summary["settings"])
    if calibrator is not None:
        out["calibrator"] = calibrator.describe()
    return out


def evaluate_source(source: str, *, text: str | None = None, corpus: str | None = None, split: str = "test",
                    seq_len: int = 512, max_windows: int | None = None, batch_size: int = 1, device: str = "auto",
                    dtype: str = "float32", topics: int = 0, use_calibrator: bool = True, int4: bool = False,
                    speed: bool = False, new_tokens: int = 128, compile: bool = False,
                    bandwidth_gbs: float | None = None, tasks: str | list[str] | None = None,
                    task_limit: int | None = None, tasks_out: str | None = None) -> dict:
    """``compress eval``: one JSON-ready dict for the model ``source`` on a text file or a named corpus,
    and/or on lm-eval ``tasks`` (then the text is scored only if one is named, or --speed / --topics).

    The text is tokenized and cut into windows, and the task names checked, before the model is
    loaded, so a text too short for one window or an unknown task fails at once."""
    device = resolve_device(device)
    names = None
    if tasks:
        names = parse_task_list(tasks)
        check_lm_eval_installed()
    where, windows = {}, None
    if not names or text or corpus or speed or topics:
        if text:
            where, scored = {"text": text}, corpus_text(text, "all")
        else:
            corpus = corpus or "bbc"
            where, scored = {"corpus": corpus, "split": split}, corpus_text(corpus, split)
        windows = window_token_ids(load_tokenizer(source), scored, seq_len, max_windows)
    loaded = load_model(source, dtype=dtype, device=device)
    if int4:
        from compress.quantize.int4 import int4_linears_from_gptq  # only --int4 needs the kernels
        int4_linears_from_gptq(loaded.model, loaded.path)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    calibrator = loaded.calibrator if use_calibrator else None
    for_tokens, for_topics = route(calibrator)
    result = {}
    if windows is not None:
        with torch.inference_mode():
            result = evaluate_windows(loaded.model, windows, batch_size=batch_size, device=device,
                                      calibrator=for_tokens)
    if speed or topics:
        from compress.draft.standalone import standalone_metrics  # decoding loops: only --speed / --topics
        result.update(standalone_metrics(loaded.model, loaded.tokenizer, device=device, speed=speed,
                                         new_tokens=new_tokens, compile=compile,
                                         topics=0 if for_topics is not None else topics,
                                         bandwidth_gbs=bandwidth_gbs, prompt_text=scored))
    if topics and for_topics is not None:
        with torch.inference_mode():
            result["bbc_topics"] = topic_accuracy(loaded.model, loaded.tokenizer,
                                                  bbc_topic_examples("test", max_examples=topics),
                                                  device=device, calibrator=for_topics)
    applied = for_tokens is not None or (for_topics is not None and topics)
    if names:
        from compress.harness.run import run_tasks  # lm-eval: only --tasks needs it
        summary, raw = run_tasks(loaded.model, loaded.tokenizer, names, limit=task_limit, calibrator=calibrator)
        result["lm_eval"] = summary
        applied = applied or summary["settings"]["calibrator"] is not None
        if tasks_out:
            write_lm_eval_results(tasks_out, raw)
    result["calibrator"] = calibrator.name if applied else None  # what the numbers went through
    return {"model": source, **where, **result}


def write_lm_eval_results(path: str, raw: dict) -> None:
    """lm-eval's own results JSON (results, configs, versions, n-shot, n-samples), as its CLI writes it."""
    import json
    from pathlib import Path

    from lm_eval.utils import handle_non_serializable

    Path(path).write_text(json.dumps(raw, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
