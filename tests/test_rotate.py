"""The rotate step: Hadamard constructions, exact equivalence of the rotated float model, the
order rules, and a rotated GPTQ export that plain transformers loads as a llama/qwen2 GPTQ v1
checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.errors import RecipeError
from compress.models import load_model
from compress.plan import check_plan
from compress.recipe import validate_recipe
from compress.rotate.config import RotateConfig
from compress.rotate.hadamard import hadamard, rotation
from compress.rotate.step import rotate_model
from tests.test_quant_export import IDS, export, logits
from tests.tiny import TINY_ARCHS, tiny_config


@pytest.mark.parametrize("n", [2, 12, 28, 40, 160, 576, 896, 1536, 2048])
def test_hadamard_of_model_widths(n):
    H = hadamard(n)
    assert H is not None and set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


def test_width_without_a_construction_falls_back_to_random_orthogonal():
    assert hadamard(100) is None  # 4·25: Paley needs a prime q (99, 49 are not)
    Q, what = rotation(100, "hadamard", seed=3)
    assert what.startswith("random orthogonal")
    torch.testing.assert_close(Q @ Q.T, torch.eye(100, dtype=torch.float64))
    Q576, what = rotation(576, "hadamard", seed=0)
    assert what == "randomised Hadamard of order 576"
    torch.testing.assert_close(Q576 @ Q576.T, torch.eye(576, dtype=torch.float64))
    assert torch.allclose(Q576.abs(), torch.full_like(Q576, 576 ** -0.5))  # every entry ±1/√n: fully spread
    assert not torch.equal(rotation(576, "hadamard", 1)[0], Q576)  # the seed draws the signs


def _tiny(arch, tie, seed=0):
    """A tiny model whose norms and biases are not the identity (folding them must matter)."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg.tie_word_embeddings = tie
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.rand_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotated_float_model_gives_the_same_logits(arch, tie, kind):
    model = _tiny(arch, tie)
    before = logits(model)
    emb = model.get_input_embeddings().weight.detach().clone()
    report = rotate_model(model, RotateConfig(kind=kind, seed=5))
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=2e-5)  # fp32 tolerance
    assert not torch.allclose(model.get_input_embeddings().weight, emb)  # it did rotate
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert report["untied"] == tie and model.config.tie_word_embeddings is False
    head, e = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is not e
    assert report["untie_bytes"] == (head.numel() * 4 if tie else 0)


def test_tied_embeddings_stay_tied_when_the_final_norm_is_one():
    model = _tiny("llama", tie=True)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    before = logits(model)
    report = rotate_model(model, RotateConfig())
    assert not report["untied"] and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(logits(model), before, rtol=1e-5, atol=2e-5)


@pytest.mark.slow
def test_rotated_smollm2_gives_the_same_logits():
    model = load_model("smollm2-135m", progress=False).model
    ids = torch.tensor([[1, 504, 3458, 5336, 18, 2102, 314, 260, 3987, 30, 378, 1146]])
    with torch.no_grad():
        before = model(ids).logits
        report = rotate_model(model, RotateConfig())
        after = model(ids).logits
    assert report["rotation"] == "randomised Hadamard of order 576" and report["untied"]  # SmolLM2 ties
    assert report["untie_bytes"] == 49152 * 576 * 4
    assert (after - before).abs().max() <= 1e-4 * before.abs().max()


def _recipe(steps, fmt="gptq"):
    return validate_recipe({"model": {"id": "smollm2-135m"}, "calibration": {"corpus": "bbc"},
                            "stages": [{"name": "s", "steps": steps}], "export": {"format": fmt}})


def test_order_rules():
    gptq, rotate, prune = {"algorithm": "gptq", "bits": 3}, {"algorithm": "rotate"}, {"algorithm": "nirvana"}
    check_plan(_recipe([rotate, gptq]))
    check_plan(_recipe([prune, rotate, gptq]))  # prune first: the rotation is exact on the pruned shapes
    with pytest.raises(RecipeError, match=r"steps\[1\] \(rotate\) comes after .*\(gptq\).*put rotate before the "
                                          r"quantization stage"):
        check_plan(_recipe([gptq, rotate]))
    with pytest.raises(RecipeError, match=r"steps\[1\] \(nirvana\) comes after .*\(rotate\).*put nirvana before the "
                                          r"rotate step"):
        check_plan(_recipe([rotate, prune], fmt="hf"))
    with pytest.raises(RecipeError, match="takes no targets"):
        _recipe([{"algorithm": "rotate", "targets": ["*.mlp.*"]}, gptq])


def test_rotate_then_gptq_through_the_pipeline(tmp_path):
    from compress.pipeline import run_recipe
    from tests.tiny import TEXT, tiny_model_dir
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    recipe = {"model": {"id": tiny_model_dir(tmp_path / "m", "qwen2"), "device": "cpu"},
              "calibration": {"corpus": str(corpus), "num_samples": 2, "seq_len": 32, "batch_size": 2},
              "stages": [{"name": "s", "steps": [{"algorithm": "rotate"},
                                                  {"algorithm": "gptq", "bits": 4, "group_size": 32, "sym": True}]}]}
    run = run_recipe(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None)
    rot = run.report["stages"][0]["steps"][0]
    assert rot["algorithm"] == "rotate" and rot["max_rel_change"] < 1e-5  # the step's own check, in the report
    assert run.state.rotation["rotation"] == "randomised Hadamard of order 160"
    again = load_model(str(tmp_path / "out")).model
    torch.testing.assert_close(logits(again), logits(run.model), rtol=5e-3, atol=5e-3)


@pytest.mark.interop
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rotated_gptq_export_loads_in_plain_transformers(tmp_path, arch):
    """A rotated (and untied) model, quantized by GPTQ, exported as GPTQ v1: plain
    AutoModelForCausalLM reads it as an ordinary llama/qwen2 GPTQ checkpoint, the same weights bit
    for bit as our loader and logits within the float16 kernel's precision."""
    pytest.importorskip("optimum")
    pytest.importorskip("gptqmodel")
    import torch._dynamo

    from tests.test_interop import assert_logits_close, assert_same_weights
    from compress.algorithms import ALGORITHMS, StepContext
    from tests.test_quant_export import _Calibration
    from tests.tiny import byte_tokenizer
    model = _tiny(arch, tie=True)  # norms not 1: the final one is folded into the head, so it unties
    ctx = StepContext(tokenizer=byte_tokenizer(), device="cpu", calibration=_Calibration(), batch_size=2,
                      progress=False)
    for name, kw in [("rotate", {}), ("gptq", dict(bits=4, group_size=32, sym=True))]:
        ALGORITHMS[name].apply(model, ALGORITHMS[name].config(algorithm=name, **kw), ctx)
    state = ctx.state
    assert state.rotation["untied"]
    out = export(model, state, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == arch and config["tie_word_embeddings"] is False
    assert config["quantization_config"]["quant_method"] == "gptq"
    with torch._dynamo.config.patch(disable=True):  # see test_interop.py: eager runs the same maths
        hf = AutoModelForCausalLM.from_pretrained(out)
        assert type(hf).__name__ == f"{'Llama' if arch == 'llama' else 'Qwen2'}ForCausalLM"
        assert len(assert_same_weights(hf, out)) == 21
        assert_logits_close(hf, out, rel=1.5e-2)  # as test_interop's 4-bit g32 case (bfloat16 CPU kernel)
    ours = load_model(str(out)).model
    torch.testing.assert_close(logits(ours), logits(model), rtol=2e-2, atol=2e-2 * logits(model).abs().max().item())
    assert IDS.shape[0] == 2


@pytest.mark.interop
def test_rotated_compressed_tensors_export_loads_in_plain_transformers(tmp_path):
    pytest.importorskip("compressed_tensors")
    from compress.algorithms import ALGORITHMS, StepContext
    from tests.test_interop import assert_logits_close
    from tests.test_quant_export import _Calibration
    from tests.tiny import byte_tokenizer
    model = _tiny("qwen2", tie=True)
    ctx = StepContext(tokenizer=byte_tokenizer(), device="cpu", calibration=_Calibration(), batch_size=2,
                      progress=False)
    for name, kw in [("rotate", {}), ("gptq", dict(bits=4, group_size=32, sym=True, grid="mse", asymmetric=True))]:
        ALGORITHMS[name].apply(model, ALGORITHMS[name].config(algorithm=name, **kw), ctx)
    out = export(model, ctx.state, tmp_path / "out", fmt="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        hf(IDS)  # compressed-tensors decompresses on the first forward
    assert type(hf).__name__ == "Qwen2ForCausalLM" and hf.lm_head.weight is not hf.model.embed_tokens.weight
    assert_logits_close(hf, out, rel=3e-3)  # a float16 model, as test_interop's compressed-tensors case
