"""Structured pruning: allocation, physical removal, every method crossed with shared checks."""
import json

import pytest
import torch

from compress.algorithms import ALGORITHMS, StepContext
from compress.errors import CompressError, RecipeError
from compress.models import load_model
from compress.pipeline import run_recipe
from compress.prune.allocate import allocate
from compress.prune.scores import gradient_scores, nirvana_objective
from compress.prune.shrink import Keep, remove_units
from compress.prune.units import block_parts, channel_params, group_params
from compress.recipe import validate_recipe
from tests.tiny import TINY_ARCHS, tiny_model, tiny_model_dir

METHODS = ("nirvana", "taylor", "wanda", "magnitude")
IDS = torch.arange(48).view(2, 24) % 250


class _Calib:
    def __init__(self, n=4, seq=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 250, (n, seq), generator=g)

    def batches(self, bs):
        for i in range(0, len(self.ids), bs):
            yield self.ids[i:i + bs]


def _prune(model, method, **cfg):
    step = ALGORITHMS[method].config(algorithm=method, **cfg)
    ctx = StepContext(tokenizer=None, device=torch.device("cpu"), calibration=_Calib(), batch_size=2, progress=False)
    return ALGORITHMS[method].apply(model, step, ctx)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------ allocation (pure)


def _scores(layers=4, groups=3, channels=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(groups, generator=g, dtype=torch.float64),
             torch.rand(channels, generator=g, dtype=torch.float64)) for _ in range(layers)]


def test_allocation_ties_mlp_to_attention_with_gamma_and_meets_the_budget():
    scores = _scores(layers=8, groups=8, channels=512)
    gp, cp = 1000, 30  # attention 64 000 of 186 880 per block
    for gamma in (1.0, 3.0):
        alloc = allocate(scores, sparsity=0.3, gamma=gamma, mode="adaptive", group_params=gp, channel_params=cp)
        a = 1 - sum(k.groups.numel() for k in alloc.keeps) / 64
        m = 1 - sum(k.channels.numel() for k in alloc.keeps) / (8 * 512)
        assert alloc.target_mlp_fraction == pytest.approx(gamma * alloc.target_attention_fraction, rel=0.05)
        assert m == pytest.approx(gamma * a, rel=0.15)  # after rounding to whole units
        removed = (64 - 64 * (1 - a)) * gp + (8 * 512 * m) * cp
        assert removed / (8 * (8 * gp + 512 * cp)) == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize("mode", ["adaptive", "uniform"])
def test_allocation_keeps_one_group_and_multiples_of_eight(mode):
    alloc = allocate(_scores(channels=100), sparsity=0.9, gamma=3.0, mode=mode, group_params=500,
                     channel_params=30, channel_multiple=8)
    for k in alloc.keeps:
        assert k.groups.numel() >= 1
        assert k.channels.numel() % 8 == 0 and k.channels.numel() >= 8
        assert torch.equal(k.channels, k.channels.sort().values)


def test_adaptive_removes_the_globally_lowest_units_and_uniform_the_same_count_per_layer():
    scores = _scores(layers=3, groups=4, channels=64)
    scores[1] = (scores[1][0] * 0.01, scores[1][1] * 0.01)  # layer 1 scores far below the others
    adaptive = allocate(scores, sparsity=0.2, gamma=2.0, mode="adaptive", group_params=100, channel_params=10)
    assert adaptive.keeps[1].channels.numel() < adaptive.keeps[0].channels.numel()
    uniform = allocate(scores, sparsity=0.2, gamma=2.0, mode="uniform", group_params=100, channel_params=10)
    assert len({k.channels.numel() for k in uniform.keeps}) == 1
    assert len({k.groups.numel() for k in uniform.keeps}) == 1
    kept = uniform.keeps[0].channels  # the highest-scoring channels of each layer survive
    assert set(kept.tolist()) == set(torch.topk(scores[0][1], kept.numel()).indices.tolist())


@pytest.mark.parametrize("bad", [dict(sparsity=0.95), dict(sparsity=-0.1), dict(gamma=0.0), dict(mode="ragged")])
def test_allocation_refuses_bad_values(bad):
    kw = dict(sparsity=0.2, gamma=3.0, mode="adaptive", group_params=10, channel_params=1) | bad
    with pytest.raises(CompressError, match=next(iter(bad)) if "mode" not in bad else "allocation"):
        allocate(_scores(), **kw)


# ------------------------------------------------------------------ physical removal


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_removing_dead_units_leaves_the_function_unchanged(arch):
    model = tiny_model(arch)
    parts = block_parts(model)
    with torch.no_grad():
        for p in parts:  # a KV group and 24 channels whose outputs nothing reads
            q_rows, _ = p.group_rows(torch.tensor([1]))
            p.o.weight[:, q_rows] = 0
            p.down.weight[:, :24] = 0
    before = _logits(model)
    remove_units(model, [Keep(torch.tensor([0]), torch.arange(24, p.channels)) for p in parts])
    for p in block_parts(model):
        assert (p.q.out_features, p.k.out_features, p.o.in_features) == (80, 40, 80)
        assert (p.up.out_features, p.down.in_features) == (296, 296)
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    assert model.config.num_key_value_heads == 1 and model.config.intermediate_size == 296


def test_unit_params_count_what_removal_removes():
    model = tiny_model("qwen2")  # q/k/v biases
    p = block_parts(model)[0]
    per_block = lambda: sum(t.numel() for m in (p.q, p.k, p.v, p.o, p.gate, p.up, p.down) for t in m.parameters())
    n0 = per_block()
    remove_units(model, [Keep(torch.tensor([0]), torch.arange(312)) for _ in block_parts(model)])
    p = block_parts(model)[0]
    assert n0 - per_block() == group_params(block_parts(tiny_model("qwen2"))[0]) + 8 * channel_params(p)


def test_nirvana_gradient_is_the_same_in_micro_batches():
    model = tiny_model()
    parts = block_parts(model)
    calib = _Calib(n=4)
    one = gradient_scores(model, parts, calib.batches(4), "nirvana", device="cpu", progress=False)
    four = gradient_scores(model, parts, calib.batches(1), "nirvana", device="cpu", progress=False)
    for (a1, m1), (a4, m4) in zip(one, four):
        torch.testing.assert_close(a1, a4, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(m1, m4, rtol=1e-4, atol=1e-8)
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert nirvana_objective(torch.tensor([[[1.0, 5.0], [3.0, 2.0]]])) == pytest.approx(4.0)  # max over t, mean over v


# ------------------------------------------------------------------ every method x shared checks


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_method_shrinks_to_the_budget_deterministically(method, arch):
    model, again = tiny_model(arch), tiny_model(arch)
    report = _prune(model, method, sparsity=0.3, gamma=2.0)
    _prune(again, method, sparsity=0.3, gamma=2.0)
    assert report["sparsity"] == pytest.approx(0.3, abs=0.04)
    assert report["block_params_after"] < report["block_params_before"]
    assert [layer["channels"] % 8 for layer in report["layers"]] == [0, 0, 0]
    assert all(layer["kv_groups"] >= 1 for layer in report["layers"])
    torch.testing.assert_close(_logits(model), _logits(again))  # same seed, same model, same result
    assert torch.isfinite(_logits(model)).all()
    assert torch.equal(model.lm_head.weight, tiny_model(arch).lm_head.weight)  # only blocks change


def test_methods_rank_differently():
    keeps = {}
    for method in METHODS:
        model = tiny_model()
        r = _prune(model, method, sparsity=0.3, gamma=2.0)
        keeps[method] = tuple(layer["channels"] for layer in r["layers"]) + tuple(
            block_parts(model)[0].up.weight[:, 0].tolist()[:4])
    assert len(set(keeps.values())) == len(METHODS)


def test_pruning_after_quantization_is_refused():
    model = tiny_model()
    ctx = StepContext(tokenizer=None, device=torch.device("cpu"), calibration=_Calib(), progress=False)
    ctx.state.quant = {"model.layers.0.mlp.up_proj": object()}
    with pytest.raises(CompressError, match="before the quantization"):
        ALGORITHMS["magnitude"].apply(model, ALGORITHMS["magnitude"].config(algorithm="magnitude"), ctx)


def test_unsupported_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(CompressError, match="gpt2"):
        _prune(model, "magnitude")


# ------------------------------------------------------------------ recipes, exports, reload


def _recipe(model_dir, text_file, steps, **extra):
    return {"model": {"id": model_dir, "device": "cpu"},
            "calibration": {"corpus": text_file, "num_samples": 4, "seq_len": 32, "seed": 0, "batch_size": 2},
            "stages": [{"name": "prune", "steps": steps}], **extra}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_adaptive_export_reloads_through_the_toolkit(tmp_path, text_file, arch):
    model_dir = tiny_model_dir(tmp_path / "m", arch)
    steps = [{"algorithm": "nirvana", "sparsity": 0.3, "gamma": 2.0}]
    # pin one block to its full size so the layers differ and the config needs per-layer sizes
    steps[0]["ignore"] = ["lm_head", "model.layers.2.*"]
    res = run_recipe(_recipe(model_dir, text_file, steps), out_dir=tmp_path / "out", progress=False,
                     log=lambda *_: None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert len({json.dumps(d) for d in config["pruned_layers"]}) > 1
    assert config["pruned_layers"][2] == {"num_attention_heads": 4, "num_key_value_heads": 2,
                                          "intermediate_size": 320}
    again = load_model(str(tmp_path / "out")).model
    torch.testing.assert_close(_logits(again), _logits(res.model))
    with pytest.raises(Exception):  # a plain transformers load cannot express per-layer sizes
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_uniform_export_loads_with_plain_transformers(tmp_path, text_file, arch):
    from transformers import AutoModelForCausalLM
    model_dir = tiny_model_dir(tmp_path / "m", arch)
    steps = [{"algorithm": "magnitude", "sparsity": 0.4, "gamma": 1.0, "allocation": "uniform"}]
    res = run_recipe(_recipe(model_dir, text_file, steps), out_dir=tmp_path / "out", progress=False,
                     log=lambda *_: None)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "pruned_layers" not in config and config["num_key_value_heads"] == 1
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_logits(plain), _logits(res.model))


def test_prune_then_quantize_exports_gptq_and_reloads(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = _recipe(model_dir, text_file, [{"algorithm": "nirvana", "sparsity": 0.3, "gamma": 2.0,
                                             "ignore": ["lm_head", "model.layers.0.*"]}],
                     export={"format": "gptq"})
    recipe["stages"].append({"name": "quantize", "steps": [{"algorithm": "gptq", "bits": 4, "group_size": 32}]})
    res = run_recipe(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None)
    again = load_model(str(tmp_path / "out")).model
    torch.testing.assert_close(_logits(again), _logits(res.model), rtol=2e-3, atol=2e-3)  # fp16 scales


@pytest.mark.parametrize("bad, match", [({"sparsity": 0.95}, "sparsity"), ({"gamma": 0}, "gamma"),
                                        ({"allocation": "ragged"}, "allocation")])
def test_recipe_refuses_bad_pruning_values(tmp_path, bad, match):
    with pytest.raises(RecipeError, match=match):
        validate_recipe({"model": {"id": "smollm2-135m"},
                         "stages": [{"name": "p", "steps": [{"algorithm": "nirvana", **bad}]}]})


def test_kl_guided_calibration_selection_drives_pruning_too(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = _recipe(model_dir, text_file, [{"algorithm": "nirvana", "sparsity": 0.3, "gamma": 2.0}])
    recipe["calibration"].update(strategy="kl", candidates=2, probe_samples=2, probe_seq_len=16)
    res = run_recipe(recipe, progress=False, log=lambda *_: None)
    scores = res.report["calibration"]["selection"]
    assert len(scores["candidates"]) == 2  # every candidate pruned a copy and was scored by KL
    assert all(c["kl"] > 0 for c in scores["candidates"])
    assert res.report["stages"][0]["steps"][0]["sparsity"] == pytest.approx(0.3, abs=0.04)
