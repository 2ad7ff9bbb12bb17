"""The recalibrate step and the LM uses of calibration/: tokens, topics, embeddings + logistic head, drafter."""
from __future__ import annotations

import json
import math

import pytest
import torch

from calibration import CalibrationError, expected_calibration_error, make_calibrator
from compress.cli import main
from compress.errors import CompressError, RecipeError
from compress.models import load_model
from compress.pipeline import run_recipe
from compress.draft.confidence import drafter_events, fit_drafter_calibrator
from compress.recalibrate import (CALIBRATOR_DIR, LMCalibrator, TokenEvents, apply_recalibrate,
                                  embedding_topic_logits, fit_token_calibrator,
                                  load_lm_calibrator, logit_rows_within)
from compress.recipe import validate_recipe
from compress.tasks import TopicExample
from tests.tiny import TEXT, byte_tokenizer, tiny_model, tiny_model_dir


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A tiny llama trained briefly on TEXT: right often enough (and over-confident) that both
    classes of "the argmax was right" occur, unlike a random one."""
    torch.set_num_threads(1)
    path = tiny_model_dir(tmp_path_factory.mktemp("m"))
    loaded = load_model(path)
    model, tok = loaded.model.train(), loaded.tokenizer
    ids = torch.tensor(tok(TEXT)["input_ids"][:64 * 16]).view(16, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(25):
        batch = ids[torch.randint(16, (4,))]
        loss = torch.nn.functional.cross_entropy(model(input_ids=batch).logits[:, :-1].flatten(0, 1),
                                                 batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(path)
    return path


def _recipe(model_dir, text_file, recal: dict, quantize: bool = True, **verify):
    steps = [{"algorithm": "rtn", "bits": 4, "group_size": 32}] if quantize else []
    return {
        "model": {"id": model_dir, "device": "cpu"},
        "stages": [{"name": "compress", "steps": [*steps, {"algorithm": "recalibrate", "corpus": text_file,
                                                           "seq_len": 32, "max_windows": 8, **recal}]}],
        "verify": {"corpus": text_file, "split": "test", "seq_len": 32, "max_windows": 4, **verify},
    }


def _quiet(*_):
    pass


# -- (a) tokens: the recipe stage, verify, export, load, eval ---------------------------------------

def test_temperature_recipe_verifies_exports_loads_and_evals(tmp_path, trained_dir, text_file, capsys):
    out = tmp_path / "out"
    res = run_recipe(_recipe(trained_dir, text_file, {"method": "temperature"}), out_dir=out, progress=False,
                     log=_quiet)
    v = res.report["verify"]
    step = res.report["stages"][0]["steps"][1]
    t = step["temperature"]
    assert step["form"] == "logits" and step["fitted_on"]["split"] == "validation" and t > 0 and t != 1
    assert v["calibrator"]["temperature"] == t and v["ece_before"] == res.report["baseline"]["ece"]
    assert v["ece"] != v["uncalibrated"]["ece"] and v["nll"] != v["uncalibrated"]["nll"]
    assert v["top1_accuracy"] > 0.05  # the trained tiny model is right sometimes: the test means something
    # The export ships it: its own folder, and the temperature for sampling.
    assert (out / CALIBRATOR_DIR / "calibrator.safetensors").is_file()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["temperature"] == pytest.approx(t) and "eos_token_id" in gen and "_from_model_config" not in gen
    assert json.loads((out / "report.json").read_text())["verify"]["ece_before"] == v["ece_before"]
    loaded = load_model(str(out))
    assert loaded.calibrator.temperature == pytest.approx(t) and loaded.calibrator.target == "tokens"
    assert load_model(trained_dir).calibrator is None
    # `compress eval` applies it (same windows as verify, same numbers), --no-calibrator does not.
    args = ["eval", str(out), "--corpus", text_file, "--split", "test", "--seq-len", "32", "--max-windows", "4",
            "--device", "cpu"]
    capsys.readouterr()
    assert main(args) == 0
    calibrated = json.loads(capsys.readouterr().out)
    assert calibrated["calibrator"] == "temperature"
    assert calibrated["perplexity"] == pytest.approx(v["perplexity"], rel=1e-5)
    assert calibrated["ece"] == pytest.approx(v["ece"], abs=1e-6)
    assert main(args + ["--no-calibrator"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["calibrator"] is None and "uncalibrated" not in raw
    assert raw["perplexity"] == pytest.approx(v["uncalibrated"]["perplexity"], rel=1e-5)


def test_temperature_in_evaluation_equals_a_scaled_lm_head(trained_dir, text_file):
    """Dividing the logits by T is exactly a model whose lm_head is divided by T."""
    from compress.data import corpus_text
    from compress.evaluate import evaluate_windows, window_token_ids
    loaded = load_model(trained_dir)
    windows = window_token_ids(loaded.tokenizer, corpus_text(text_file, "test"), 32, 3)
    cal = make_calibrator("temperature")
    cal.n_classes, cal.log_temperature = 264, torch.tensor(math.log(1.7), dtype=torch.float64)
    got = evaluate_windows(loaded.model, windows, progress=False, calibrator=LMCalibrator(cal, "tokens", "logits"))
    with torch.no_grad():
        loaded.model.lm_head.weight /= 1.7
    want = evaluate_windows(loaded.model, windows, progress=False)
    for key in ("perplexity", "nll", "ece", "top1_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7)


def test_top_label_method_changes_ece_not_nll(trained_dir, text_file, tmp_path):
    res = run_recipe(_recipe(trained_dir, text_file, {"method": "platt"}, quantize=False), progress=False, log=_quiet)
    v = res.report["verify"]
    assert v["calibrator"]["form"] == "top_label" and "temperature" not in v["calibrator"]
    assert v["nll"] == v["uncalibrated"]["nll"] and v["perplexity"] == v["uncalibrated"]["perplexity"]
    assert v["ece"] != v["uncalibrated"]["ece"]
    cal = res.state.calibrator
    again = load_lm_calibrator(cal.save(tmp_path / "cal"))
    c = torch.tensor([0.1, 0.5, 0.99])
    torch.testing.assert_close(again.confidence(c), cal.confidence(c))
    assert again.confidence(c).shape == c.shape and again.temperature is None


def test_token_calibrators_fit_on_synthetic_events():
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(4000, generator=g) * 0.9 + 0.1
    correct = torch.rand(4000, generator=g) < conf ** 2  # over-confident
    events = TokenEvents(conf, correct, None, None)
    for method in ("platt", "isotonic", "hcal", "histogram"):
        cal = fit_token_calibrator(method, events)
        assert cal.form == "top_label"
        assert expected_calibration_error(cal.confidence(conf), correct) < expected_calibration_error(conf, correct) / 3
    with pytest.raises(CompressError, match="needs full logits"):
        fit_token_calibrator("temperature", events)
    with pytest.raises(CalibrationError, match="single class"):
        fit_token_calibrator("platt", TokenEvents(conf, torch.zeros(4000, dtype=torch.bool), None, None))
    assert logit_rows_within(49152, 256) == 1365


# -- recipe errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["test", "all"])
def test_fitting_on_the_evaluation_split_is_refused(split, text_file, tmp_path):
    recipe = _recipe(tiny_model_dir(tmp_path / "m"), text_file, {"split": split})
    with pytest.raises(RecipeError, match=r"steps\[1\]\.split: .*verify evaluates on the test split"):
        validate_recipe(recipe)


@pytest.mark.parametrize("recal, match", [
    ({"method": "nope"}, "unknown calibrator 'nope'"),
    ({"method": "hcal", "options": {"windw": 3}}, "bad options for calibrator 'hcal'"),
    ({"target": "topics"}, "corpus must be bbc"),
    ({"target": "topics", "corpus": "bbc", "method": "platt"}, "platt is binary"),
])
def test_bad_step_configs_fail_at_validation(recal, match, text_file, tmp_path):
    with pytest.raises(RecipeError, match=match):
        validate_recipe(_recipe(tiny_model_dir(tmp_path / "m"), text_file, recal))


def test_a_second_recalibrate_step_is_refused(trained_dir, text_file):
    recipe = _recipe(trained_dir, text_file, {"method": "platt"}, quantize=False)
    recipe["stages"][0]["steps"].append(dict(recipe["stages"][0]["steps"][0]))
    with pytest.raises(CompressError, match="already fitted a calibrator"):
        run_recipe(recipe, progress=False, log=_quiet)


# -- (b) BBC topics by label words ------------------------------------------------------------------

def test_topics_target_fits_on_validation_and_verify_and_eval_apply_it(trained_dir, text_file, tmp_path, capsys):
    from compress.algorithms import StepContext
    from compress.measure import verify
    from compress.recalibrate import RecalibrateConfig
    from compress.recipe import VerifySpec
    loaded = load_model(trained_dir)
    ctx = StepContext(tokenizer=loaded.tokenizer, device=torch.device("cpu"), progress=False)
    cfg = RecalibrateConfig(method="temperature", target="topics", max_examples=12, max_chars=40)
    rep = apply_recalibrate(loaded.model, cfg, ctx)
    cal = ctx.state.calibrator
    assert rep["target"] == "topics" and rep["fitted_on"] == {"corpus": "bbc", "split": "validation",
                                                              "examples": 12, "max_chars": 40}
    assert cal.transform(torch.zeros(2, 5)).shape == (2, 5)
    spec = VerifySpec(corpus="bbc", seq_len=32, max_windows=1, topics=3, baseline=False)
    windows = torch.arange(64).view(2, 32) % 250
    out = verify(loaded.model, loaded.tokenizer, windows[:1], spec, torch.device("cpu"), False, calibrator=cal)
    assert out["topics"]["examples"] == 3 and "uncalibrated" in out["topics"] and "uncalibrated" not in out
    assert out["topics_ece"] == out["topics"]["ece"] and out["calibrator"]["target"] == "topics"
    # An export carrying a topics calibrator: eval applies it to --topics only, not to the tokens.
    import shutil
    export = tmp_path / "export"
    shutil.copytree(trained_dir, export)
    (export / "compress_export.json").write_text(json.dumps({"format": "hf"}))
    cal.save(export / CALIBRATOR_DIR)
    capsys.readouterr()
    args = ["eval", str(export), "--text", text_file, "--seq-len", "32", "--max-windows", "2", "--device", "cpu"]
    assert main(args + ["--topics", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["calibrator"] == "temperature" and "uncalibrated" in res["bbc_topics"] and "uncalibrated" not in res
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["calibrator"] is None  # nothing it applies to was evaluated


# -- (c) a logistic head on sentence embeddings -----------------------------------------------------

def test_embedding_classifier_logits_and_calibration():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=264, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)).eval()
    tok = byte_tokenizer()
    words = ("goal match team", "vote party election", "film actor award")

    def examples(n, seed):
        g = torch.Generator().manual_seed(seed)
        return [TopicExample(f"{words[k]} {int(torch.randint(100, (1,), generator=g))}", k)
                for k in torch.randint(3, (n,), generator=g).tolist()]

    out = embedding_topic_logits(encoder, tok, examples(60, 0),
                                 {"validation": examples(40, 1), "test": examples(40, 2)}, max_length=32)
    (val_z, val_y), (test_z, test_y) = out["validation"], out["test"]
    assert val_z.shape == (40, 3) and test_z.dtype == torch.float32
    assert float((test_z.argmax(1) == test_y).float().mean()) > 0.9
    probs = make_calibrator("temperature").fit(val_z, val_y).transform(test_z)
    assert probs.shape == (40, 3) and torch.allclose(probs.sum(1), torch.ones(40, dtype=probs.dtype))


# -- (d) drafter confidence against acceptance -------------------------------------------------------

def test_drafter_calibrator_is_a_speculative_calibrator():
    from compress.draft import speculative_generate
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(3000, generator=g)
    accepted = torch.rand(3000, generator=g) < conf ** 3
    cal = fit_drafter_calibrator(conf[:2000], accepted[:2000])
    held = cal(conf[2000:])
    assert held.shape == (1000,) and cal.target == "drafter" and cal.name == "platt"
    assert expected_calibration_error(held, accepted[2000:]) < expected_calibration_error(conf[2000:], accepted[2000:])
    assert torch.all(held[conf[2000:].argsort()].diff() >= -1e-6)  # monotone: a stop threshold keeps its order
    events = {"confidence": conf[:2000].tolist(), "accepted": accepted[:2000].tolist()}
    same = fit_drafter_calibrator({"events": events})  # a draft_eval result carrying per-position events
    torch.testing.assert_close(same(conf[:5]), cal(conf[:5]))
    with pytest.raises(CompressError, match="no per-position 'events'"):
        fit_drafter_calibrator({"greedy_agreement": 0.5})
    target, drafter = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    c, a = drafter_events(target, drafter, [list(range(5, 25)), list(range(30, 42))])
    assert c.shape == a.shape == (19 + 11,) and a.dtype == torch.bool
    from compress.draft.agreement import draft_eval
    ev = draft_eval(target, drafter, [list(range(5, 25)), list(range(30, 42))], max_new_tokens=0,
                    return_events=True)["events"]  # the same positions, from draft_eval itself
    torch.testing.assert_close(torch.tensor(ev["confidence"]), c.float(), rtol=1e-5, atol=1e-6)
    assert ev["accepted"] == a.tolist()
    res = speculative_generate(target, drafter, list(range(5, 15)), max_new_tokens=6, gamma=3,
                               confidence_threshold=0.5, calibrator=cal)
    assert res.new_tokens == 6
