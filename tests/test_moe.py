"""Mixtures of experts (compress/moe.py): experts as linears with the same outputs, each expert's
statistics from its routed tokens, every token for statistics only, starved experts handled
explicitly, and the tokens per expert reported."""
import pytest
import torch

from compress.errors import CompressError
from compress.moe import ExpertList, RouterLinear, fused_experts, set_routing, split_experts
from compress.runner import HessianAccumulator, run_layerwise
from compress.targets import match_modules
from tests.tiny_archs import MOE_ARCHS, arch_model

EXPERTS = 4


def _moe(arch="mixtral"):
    model = arch_model(arch)
    assert split_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    return model


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 24), generator=g) for _ in range(n)]


def _walk(model, batches, **kw):
    modules = match_modules(model, ["Linear"], ["lm_head"])
    return run_layerwise(model, batches, modules=modules, progress=False, share_inputs=True,
                         make_accumulator=lambda n, m, d: HessianAccumulator(m.in_features, d),
                         solve=lambda n, m, a: a, **kw)


def _moe_inputs(model, batches):
    """What each block's MoE module receives in a plain forward: the tokens every expert could see."""
    seen = {}
    hooks = [layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.setdefault(i, []).append(a[0].detach()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).double() for i, xs in seen.items()}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_split_experts_keep_the_outputs_and_fuse_back_exactly(arch):
    model = arch_model(arch)
    ids = _batches(1)[0]
    with torch.no_grad():
        before = model(ids).logits
        fused = {k: v.clone() for k, v in model.state_dict().items()}
        split_experts(model)
        assert isinstance(model.model.layers[0].mlp.experts, ExpertList)
        # gate and up are two matmuls instead of one: the same maths to float rounding
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
        with fused_experts(model):  # transformers' own module and tensors, bit for bit
            assert {k: v for k, v in model.state_dict().items()}.keys() == fused.keys()
            assert all(torch.equal(model.state_dict()[k], v) for k, v in fused.items())
        assert isinstance(model.model.layers[0].mlp.experts, ExpertList)
    gates = [n for n, m in model.named_modules() if isinstance(m, RouterLinear)]
    assert gates == (["model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"]
                     if arch == "qwen2_moe" else [])


def test_all_tokens_mode_feeds_every_expert_without_changing_outputs():
    model = _moe()
    batches = _batches()
    set_routing(model, "routed", 0)
    routed = _walk(model, batches)
    set_routing(model, "all", 0)
    every = _walk(model, batches)
    for got, want in zip(every.final, routed.final):  # the block outputs are the routed ones, bit for bit
        assert torch.equal(got.hidden, want.hidden)
    x = _moe_inputs(model, batches)
    for i in range(2):
        h = 2 * x[i].T @ x[i] / x[i].shape[0]
        for e in range(EXPERTS):
            acc = every.reports[f"model.layers.{i}.mlp.experts.{e}.gate_proj"]
            assert acc.count == x[i].shape[0]
            torch.testing.assert_close(acc.H.double(), h, rtol=1e-4, atol=1e-5)
        report = every.experts[f"model.layers.{i}.mlp.experts"]
        assert report["routing"] == "all" and report["all_token_statistics"] == list(range(EXPERTS))
        assert report["routed_tokens"] == routed.experts[f"model.layers.{i}.mlp.experts"]["routed_tokens"]


def test_experts_short_of_tokens_take_every_token_and_are_reported():
    model = _moe()
    batches = _batches()
    set_routing(model, "routed", 0)
    routed = _walk(model, batches)
    counts = routed.experts["model.layers.0.mlp.experts"]["routed_tokens"]
    assert sum(counts) == 2 * 2 * 24 * 2  # tokens x experts per token
    threshold = sorted(counts)[1] + 1  # the two least-routed experts fall short
    short = sorted(e for e, n in enumerate(counts) if n < threshold)
    set_routing(model, "routed", threshold)
    res = _walk(model, batches)
    report = res.experts["model.layers.0.mlp.experts"]
    assert report["all_token_statistics"] == short and report["routed_tokens"] == counts
    x = _moe_inputs(model, batches)[0]
    for e in range(EXPERTS):
        acc = res.reports[f"model.layers.0.mlp.experts.{e}.up_proj"]
        if e in short:  # every token of the block, once
            torch.testing.assert_close(acc.H.double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
        else:  # its routed tokens, as before
            assert acc.count == counts[e]
            torch.testing.assert_close(acc.H, routed.reports[f"model.layers.0.mlp.experts.{e}.up_proj"].H)
    for got, want in zip(res.final, routed.final):
        assert torch.equal(got.hidden, want.hidden)


def _never_route(model, expert: int) -> None:
    """Make block 0's router never choose ``expert`` (its slot goes to the next expert)."""
    router = model.model.layers[0].mlp.gate
    original = router.forward

    def forward(hidden):
        logits, scores, index = original(hidden)
        return logits, scores, torch.where(index == expert, (index + 1) % EXPERTS, index)
    router.forward = forward


def test_an_expert_the_router_never_chooses_is_refused_or_fed_every_token():
    model = _moe()
    batches = _batches()
    _never_route(model, 3)
    set_routing(model, "routed", 0)
    with pytest.raises(CompressError, match=r"layers\.0\.mlp\.experts\.3\.gate_proj received no calibration token"):
        _walk(model, batches)
    set_routing(model, "routed", 1)
    res = _walk(model, batches)
    report = res.experts["model.layers.0.mlp.experts"]
    assert report["routed_tokens"][3] == 0 and report["all_token_statistics"] == [3]
    assert res.reports["model.layers.0.mlp.experts.3.down_proj"].count == 2 * 2 * 24


def test_recipe_sets_the_routing_and_reports_tokens_per_expert(tmp_path, text_file):
    from compress.pipeline import run_recipe
    from tests.tiny_archs import arch_model_dir

    model_dir = arch_model_dir(tmp_path / "m", "qwen3_moe")
    recipe = {"model": {"id": model_dir, "device": "cpu"},
              "calibration": {"corpus": text_file, "num_samples": 2, "seq_len": 32, "batch_size": 2,
                              "expert_routing": "all"},
              "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                                  "ignore": ["lm_head"]}]}]}
    run = run_recipe(recipe, progress=False, log=lambda *_: None)
    experts = run.report["stages"][0]["steps"][0]["experts"]
    assert set(experts) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    for seen in experts.values():
        assert seen["routing"] == "all" and seen["all_token_statistics"] == list(range(EXPERTS))
        assert sum(seen["routed_tokens"]) == 2 * 32 * 2
    modules = run.report["stages"][0]["steps"][0]["modules"]
    assert modules["model.layers.0.mlp.experts.2.gate_proj"]["tokens"] == 2 * 32  # every token, once
