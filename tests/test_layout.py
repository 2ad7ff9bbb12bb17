"""Block layouts inferred from the model (compress/layout.py): the blocks, the true-sequential
subsets from one traced forward, and the runner's statistics on every architecture of the
coverage table equal to a plain forward pass."""
import pytest
import torch

from compress.errors import CompressError
from compress.layout import BlockLayout, find_block_list, pin_layout
from compress.moe import set_routing, split_experts
from compress.runner import HessianAccumulator, block_layout, run_layerwise
from compress.targets import match_modules
from tests.tiny import TINY_ARCHS, tiny_model
from tests.tiny_archs import COVERAGE_ARCHS, MOE_ARCHS, arch_model

# The table the runner held before layouts were inferred (compress/runner.py LAYOUTS, 2025).
_LLAMA_LIKE = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
               ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def _model(arch):
    model = tiny_model(arch) if arch in TINY_ARCHS and arch != "qwen2" else arch_model(arch)
    split_experts(model)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_inferred_subsets_equal_the_old_table(arch):
    layout = block_layout(arch_model(arch))
    assert layout.blocks == "model.layers" and layout.inferred
    assert layout.subsets == _LLAMA_LIKE


def test_tiny_test_models_infer_the_old_table_too():
    for arch in TINY_ARCHS:  # the shapes every other test uses (GQA, partial groups)
        assert block_layout(tiny_model(arch)).subsets == _LLAMA_LIKE


@pytest.mark.parametrize("arch,expected", [
    ("qwen3", _LLAMA_LIKE), ("gemma2", _LLAMA_LIKE), ("gemma3", _LLAMA_LIKE),
    ("phi3", (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))),
])
def test_other_dense_architectures(arch, expected):
    assert block_layout(arch_model(arch)).subsets == expected


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_form_one_subset_per_level(arch):
    layout = block_layout(_model(arch))
    attn, o, first, second = layout.subsets
    assert attn == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") and o == ("self_attn.o_proj",)
    n = 4
    expected_first = {f"mlp.experts.{e}.{p}" for e in range(n) for p in ("gate_proj", "up_proj")}
    expected_second = {f"mlp.experts.{e}.down_proj" for e in range(n)}
    if arch == "qwen2_moe":  # the shared expert runs beside the routed ones; its gate is a router (a linear)
        expected_first |= {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"}
        expected_second |= {"mlp.shared_expert.down_proj"}
    assert set(first) == expected_first and set(second) == expected_second


def test_blocks_are_found_by_structure_and_missing_ones_named():
    assert find_block_list(arch_model("gemma3")) == "model.layers"
    from transformers import GPT2Config, GPT2LMHeadModel  # Conv1D, not nn.Linear: nothing to quantize
    with pytest.raises(CompressError, match="gpt2"):
        find_block_list(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))


def test_a_pinned_layout_overrides_inference():
    model = tiny_model("llama")
    mine = BlockLayout("model.layers", (("mlp.down_proj",), ("self_attn.q_proj",)))
    pin_layout(model, mine)
    assert block_layout(model) is mine
    order = []
    run_layerwise(model, [torch.randint(0, 256, (1, 16))], modules=match_modules(model, ["Linear"], ["lm_head"]),
                  progress=False, make_accumulator=lambda n, m, d: HessianAccumulator(m.in_features, d),
                  solve=lambda n, m, a: order.append(n.split(".", 3)[-1]))
    # the given subsets first, in their order; the linears it does not name solved together last
    assert order[:2] == ["mlp.down_proj", "self_attn.q_proj"] and len(order) == 21


def _direct_inputs(model, batches):
    seen, final = {}, []
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in match_modules(model, ["Linear"], ["lm_head"]).items()]
    hooks.append(model.model.norm.register_forward_hook(lambda mod, a, o: final.append(a[0].detach())))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen, final


@pytest.mark.parametrize("arch", COVERAGE_ARCHS)
def test_statistics_and_replay_match_a_plain_forward(arch):
    """Per-block keyword arguments (gemma's sliding vs global masks and rotary tables), fused
    projections and routed experts: every linear's Hessian is the one a plain forward gives it."""
    model = _model(arch)
    set_routing(model, "routed", 0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 24), generator=g) for _ in range(2)]
    direct, final = _direct_inputs(model, batches)
    modules = match_modules(model, ["Linear"], ["lm_head"])
    res = run_layerwise(model, batches, modules=modules, progress=False, share_inputs=True,
                        make_accumulator=lambda n, m, d: HessianAccumulator(m.in_features, d),
                        solve=lambda n, m, a: a)
    for name, acc in res.reports.items():
        if name not in direct:  # an expert no token was routed to
            assert acc.count == 0, name
            continue
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in direct[name]]).double()
        assert acc.count == x.shape[0], name
        torch.testing.assert_close(acc.H.double(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(res.final, final):
        torch.testing.assert_close(got.hidden, want, rtol=1e-5, atol=1e-5)


def test_a_recipe_layout_is_pinned_on_the_model(tmp_path, text_file):
    from compress.pipeline import run_recipe
    from tests.tiny import tiny_model_dir

    subsets = [["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], ["self_attn.q_proj"]]
    recipe = {"model": {"id": tiny_model_dir(tmp_path / "m"), "device": "cpu",
                        "layout": {"blocks": "model.layers", "subsets": subsets}},
              "calibration": {"corpus": text_file, "num_samples": 2, "seq_len": 16, "batch_size": 2},
              "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "bits": 4, "group_size": 32,
                                                  "targets": ["re:layers\\.0\\."]}]}]}
    run = run_recipe(recipe, progress=False, log=lambda *_: None)
    assert block_layout(run.model) == BlockLayout("model.layers", tuple(map(tuple, subsets)))
    assert list(run.report["stages"][0]["steps"][0]["modules"])[:4] == [
        f"model.layers.0.{s}" for s in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj")]
