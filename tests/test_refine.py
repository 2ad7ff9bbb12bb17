"""AdaQuant refinement and bias correction: the maths on random layers, then recipes on tiny models.

The random layer is [96, 320] with correlated inputs (H far from diagonal), so
320 = 10 groups of 32 and 2.5 groups of 128 (a partial last group).
"""
from __future__ import annotations

import pytest
import torch

import compress.quantize.refine_steps  # noqa: F401  (registers the steps before the recipe schema is built)
from compress.errors import CompressError
from compress.models import load_model
from compress.pipeline import run_recipe
from compress.quantize.grid import QuantSpec
from compress.quantize.refine import MeanAccumulator, adaquant_refine, output_shift
from compress.quantize.solvers import QuantResult, gptq_solve, hessian_from_inputs, layer_output_error, rtn_solve
from tests.tiny import tiny_model_dir

OUT, IN = 96, 320


def _layer(seed: int = 0, mean: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g)
    Z = torch.randn(1024, IN, generator=g)
    M = torch.randn(IN, IN, generator=g) / IN**0.5 + torch.eye(IN)  # mixing: H is far from diagonal
    X = (Z @ M) * (torch.rand(IN, generator=g) * 2 + 0.1) + mean
    return W, X, hessian_from_inputs(X)


W0, X0, H0 = _layer()


def _assert_consistent(res: QuantResult, ref: QuantResult):
    maxq = res.spec.maxq
    assert res.qweight.dtype == torch.uint8 and res.qweight.shape == ref.qweight.shape
    assert int(res.qweight.max()) <= maxq
    assert res.zeros.dtype == torch.int32 and res.zeros.shape == ref.zeros.shape
    assert int(res.zeros.min()) >= 0 and int(res.zeros.max()) <= maxq
    assert res.scales.shape == ref.scales.shape and bool((res.scales > 0).all())
    assert torch.equal(res.g_idx, ref.g_idx) and res.spec == ref.spec
    assert torch.equal(res.weight, res.dequantize())


# ----------------------------------------------------------------------------- the maths


def test_adaquant_improves_gptq_and_returns_a_consistent_result():
    q = gptq_solve(W0, H0, QuantSpec(3, 32))
    res, stats = adaquant_refine(W0, H0, q)
    assert stats["before"] == pytest.approx(q.error, rel=1e-5)
    assert stats["after"] < 0.97 * stats["before"] and stats["improved"]
    assert res.error == pytest.approx(stats["after"]) == pytest.approx(layer_output_error(W0, res.weight, H0))
    _assert_consistent(res, q)


def test_adaquant_from_float_init_improves_rtn_clearly():
    q = rtn_solve(W0, QuantSpec(4, 128), H0)
    res, stats = adaquant_refine(W0, H0, q, init="float")
    assert stats["after"] < 0.9 * stats["before"]
    assert 0 < stats["levels_changed"] < 0.5
    _assert_consistent(res, q)


@pytest.mark.parametrize("spec", [QuantSpec(2, 32), QuantSpec(4, -1, sym=True)])
@pytest.mark.parametrize("kw", [{}, {"init": "float"},
                                {"lr_weight": 0.3, "lr_scale": 0.3, "lr_zero": 1.0, "steps": 30}])
def test_adaquant_is_never_worse_than_its_input(spec, kw):
    q = gptq_solve(W0, H0, spec)
    q.weight = None  # as the steps store it: only levels, scales and zeros
    res, stats = adaquant_refine(W0, H0, q, **{"steps": 60, **kw})
    assert stats["after"] <= stats["before"]
    assert layer_output_error(W0, res.weight, H0) == pytest.approx(stats["after"], rel=1e-6)
    _assert_consistent(res, q)
    if spec.sym:  # the midpoint zero of symmetric grids is kept
        assert torch.equal(res.zeros, q.zeros)
    if not stats["improved"]:
        assert torch.equal(res.qweight, q.qweight) and torch.equal(res.scales, q.scales)


def test_adaquant_zero_steps_returns_the_input():
    q = gptq_solve(W0, H0, QuantSpec(3, 32))
    res, stats = adaquant_refine(W0, H0, q, steps=0)
    assert stats["after"] == stats["before"] and not stats["improved"]
    assert torch.equal(res.qweight, q.qweight) and torch.equal(res.weight, q.weight)


def test_adaquant_rejects_bad_inputs():
    q = rtn_solve(W0, QuantSpec(4, 32))
    with pytest.raises(ValueError, match="H has shape"):
        adaquant_refine(W0, H0[:10, :10], q)
    with pytest.raises(ValueError, match="lr_weight must be"):
        adaquant_refine(W0, H0, q, lr_weight=-1)
    with pytest.raises(ValueError, match="unknown init"):
        adaquant_refine(W0, H0, q, init="nearest")


def test_output_shift_matches_the_mean_output_exactly():
    W, X, _ = _layer(seed=1, mean=0.7)  # inputs with a clear non-zero mean
    W_hat = rtn_solve(W, QuantSpec(2, 32)).weight
    bias = torch.randn(OUT)
    acc = MeanAccumulator(IN, "cpu")
    for chunk in X.view(8, -1, IN):  # batches of [tokens/8, in] as 3-d inputs
        acc.add_batch(chunk.unsqueeze(0), None)
    assert acc.count == X.shape[0]
    torch.testing.assert_close(acc.mean, X.mean(0), rtol=1e-5, atol=1e-5)
    shift = output_shift(W, W_hat, acc.mean)
    float_mean = (X @ W.T + bias).mean(0)
    before = (X @ W_hat.T + bias).mean(0)
    after = (X @ W_hat.T + bias + shift).mean(0)
    assert (before - float_mean).abs().max() > 0.1
    torch.testing.assert_close(after, float_mean, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- recipes on tiny models


def _recipe(model_dir, text_file, steps):
    return {"model": {"id": model_dir, "device": "cpu"},
            "calibration": {"corpus": text_file, "num_samples": 4, "seq_len": 32, "seed": 0, "batch_size": 2},
            "stages": [{"name": "quantize", "steps": steps}]}


GPTQ = {"algorithm": "gptq", "bits": 3, "group_size": 32}
ADAQUANT = {"algorithm": "adaquant", "steps": 40}


def _quiet(recipe, **kw):
    return run_recipe(recipe, progress=False, log=lambda *_: None, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gptq_adaquant_bias_correction_recipe(tmp_path, text_file, arch):
    model_dir = tiny_model_dir(tmp_path / "m", arch)
    # qwen2 builds biases for q/k/v only (no config flag for o_proj or the MLP).
    bc = {"algorithm": "bias_correction"} if arch == "llama" else {
        "algorithm": "bias_correction", "targets": ["re:self_attn\\.[qkv]_proj$"]}
    out = tmp_path / "out"
    res = _quiet(_recipe(model_dir, text_file, [GPTQ, ADAQUANT, bc]), out_dir=out)
    _, ada, bias = res.report["stages"][0]["steps"]

    assert len(ada["modules"]) == 21  # 3 blocks x 7 linears
    for name, r in ada["modules"].items():
        assert r["error_after"] <= r["error_before"], name
    assert ada["summary"]["error_after_sum"] < ada["summary"]["error_before_sum"]
    for name, q in res.state.quant.items():  # the run state describes the refined weights
        torch.testing.assert_close(res.model.get_submodule(name).weight, q.dequantize(), rtol=0, atol=0)

    expect = 21 if arch == "llama" else 9
    assert len(bias["modules"]) == expect
    for name, r in bias["modules"].items():
        assert r["mean_output_error_after"] <= 1e-6 < r["mean_output_error_before"], name
        assert r["mean_abs_shift"] > 0
    layer0 = res.model.model.layers[0]
    if arch == "llama":
        assert bias["config_flags_set"] == ["attention_bias", "mlp_bias"]
        assert res.model.config.attention_bias and res.model.config.mlp_bias
        assert bias["summary"]["biases_created"] == 21
    else:
        assert bias["config_flags_set"] == [] and layer0.self_attn.o_proj.bias is None
        assert layer0.mlp.down_proj.bias is None

    # The export reloads with transformers, biases included, and gives the same logits.
    again = load_model(str(out)).model
    checked = ("self_attn.q_proj", "self_attn.v_proj") + (("self_attn.o_proj", "mlp.down_proj") if arch == "llama" else ())
    for n in checked:
        torch.testing.assert_close(again.model.layers[0].get_submodule(n).bias, layer0.get_submodule(n).bias)
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, res.model(ids).logits)


def test_bias_correction_on_a_targeted_sibling_gives_the_others_zero_biases(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m", "llama")
    bc = {"algorithm": "bias_correction", "targets": ["re:layers\\.1\\.self_attn\\.o_proj$"]}
    res = _quiet(_recipe(model_dir, text_file, [GPTQ, bc]))
    attn = [res.model.model.layers[i].self_attn for i in range(3)]
    assert res.model.config.attention_bias and not res.model.config.mlp_bias
    assert bool(attn[1].o_proj.bias.abs().sum() > 0)
    for a in attn:
        for lin in (a.q_proj, a.k_proj, a.v_proj) + ((a.o_proj,) if a is not attn[1] else ()):
            assert torch.count_nonzero(lin.bias) == 0
    assert res.model.model.layers[0].mlp.up_proj.bias is None


def test_bias_correction_refuses_qwen2_o_proj(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m", "qwen2")
    bc = {"algorithm": "bias_correction", "targets": ["re:o_proj$"]}
    with pytest.raises(CompressError, match=r"\(bias_correction\): module model\.layers\.0\.self_attn\.o_proj "
                                            r"has no bias and a qwen2 model cannot load one"):
        _quiet(_recipe(model_dir, text_file, [GPTQ, bc]))


def test_adaquant_without_quantization_is_a_clear_error(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m", "llama")
    with pytest.raises(CompressError, match=r"steps\[0\] \(adaquant\): module model\.layers\.0\.self_attn\.q_proj "
                                            r"has no quantization result; run rtn or gptq first"):
        _quiet(_recipe(model_dir, text_file, [ADAQUANT]))
    # Quantizing only the MLP: the first attention target is named.
    steps = [{**GPTQ, "targets": ["re:mlp"]}, ADAQUANT]
    with pytest.raises(CompressError, match=r"module model\.layers\.0\.self_attn\.q_proj has no quantization"):
        _quiet(_recipe(model_dir, text_file, steps))
