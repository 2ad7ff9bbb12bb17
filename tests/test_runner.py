"""The layer-wise runner: statistics and replays equal a plain forward pass."""
import pytest
import torch

from compress.errors import CompressError
from compress.runner import HessianAccumulator, block_layout, capture_block_inputs, run_layerwise
from compress.targets import match_modules
from tests.tiny import TINY_ARCHS, tiny_model


def _batches(n=3, b=2, L=24, vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (b, L), generator=g) for _ in range(n)]


def _direct_inputs(model, batches):
    """Inputs of every linear in the decoder blocks, from plain forward passes."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in match_modules(model, ["Linear"], ["lm_head"]).items()]
    final = []
    hooks.append(model.model.norm.register_forward_hook(lambda mod, a, o: final.append(a[0].detach())))
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return seen, final


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hessians_and_replay_match_plain_forward(arch):
    model = tiny_model(arch)
    batches = _batches()
    direct, final = _direct_inputs(model, batches)
    modules = match_modules(model, ["Linear"], ["lm_head"])
    order = []

    def solve(name, module, acc):
        order.append(name)
        return acc

    res = run_layerwise(model, batches, modules=modules, progress=False,
                        make_accumulator=lambda n, m, d: HessianAccumulator(m.in_features, d), solve=solve)
    assert set(res.reports) == set(modules)
    for name, acc in res.reports.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in direct[name]]).double()
        expected = 2 * x.T @ x / x.shape[0]
        assert acc.count == x.shape[0]
        torch.testing.assert_close(acc.H.double(), expected, rtol=1e-4, atol=1e-5)
    for got, want in zip(res.final, final):
        torch.testing.assert_close(got.hidden, want, rtol=1e-5, atol=1e-5)
    # true-sequential order inside block 0: q,k,v -> o -> gate,up -> down
    block0 = [n.split(".", 3)[-1] for n in order if n.startswith("model.layers.0.")]
    assert block0 == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def test_solved_modules_feed_later_subsets():
    """A change made by ``solve`` is seen by the next subset's inputs (true-sequential)."""
    model = tiny_model("llama")
    batches = _batches(n=1)
    modules = match_modules(model, ["Linear"], ["lm_head"])

    def solve(name, module, acc):
        if name.endswith("o_proj"):
            module.weight.data.zero_()  # attention contributes nothing after this
        return acc

    res = run_layerwise(model, batches, modules=modules, progress=False,
                        make_accumulator=lambda n, m, d: HessianAccumulator(m.in_features, d), solve=solve)
    direct, _ = _direct_inputs(model, batches)  # the model now has o_proj = 0 everywhere
    x = direct["model.layers.0.mlp.gate_proj"][0].reshape(-1, 160).double()
    torch.testing.assert_close(res.reports["model.layers.0.mlp.gate_proj"].H.double(),
                               2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_capture_computes_no_block_and_keeps_model_on_home_device():
    model = tiny_model("qwen2")
    calls = []
    for block in model.model.layers:  # the blocks' forwards are stubs while capturing: nothing inside runs
        for m in list(block.modules())[1:]:
            m.register_forward_hook(lambda *a: calls.append(1))
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    inputs = capture_block_inputs(model, _batches(n=2), device="cpu")
    assert len(inputs) == 2 and not calls
    assert all("forward" not in vars(block) for block in model.model.layers)  # the stubs are gone
    assert inputs[0].hidden.shape == (2, 24, 160)
    assert inputs[0].kwargs["use_cache"] is False and "past_key_values" not in inputs[0].kwargs


def test_unknown_architecture_is_named():
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(CompressError, match="gpt2"):
        block_layout(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runner_on_cuda_matches_cpu_with_model_left_on_cpu():
    model = tiny_model("llama")
    batches = _batches()
    modules = match_modules(model, ["Linear"], ["lm_head"])
    kw = dict(modules=modules, progress=False, solve=lambda n, m, a: a,
              make_accumulator=lambda n, m, d: HessianAccumulator(m.in_features, d))
    cpu = run_layerwise(model, batches, device="cpu", **kw)
    gpu = run_layerwise(model, batches, device="cuda", **kw)
    assert next(model.parameters()).device.type == "cpu"  # one block at a time, then back home
    for name in modules:
        torch.testing.assert_close(gpu.reports[name].H.cpu(), cpu.reports[name].H, rtol=1e-3, atol=1e-3)


def test_shared_inputs_give_the_same_statistics_with_fewer_accumulations():
    model = tiny_model("llama")
    batches = _batches()
    modules = match_modules(model, ["Linear"], ["lm_head"])
    calls = {}

    class Counting(HessianAccumulator):
        def add_batch(self, inp, out=None):
            calls[self.name] = calls.get(self.name, 0) + 1
            super().add_batch(inp, out)

    def make(name, m, d):
        acc = Counting(m.in_features, d)
        acc.name = name
        return acc

    kw = dict(modules=modules, progress=False, make_accumulator=make, solve=lambda n, m, a: a.H.clone())
    plain = run_layerwise(model, batches, **kw)
    n_plain = sum(calls.values())
    calls.clear()
    shared = run_layerwise(model, batches, share_inputs=True, **kw)
    assert sum(calls.values()) == n_plain * 4 // 7  # per block: q (not k, v), o, gate (not up), down
    for name in modules:
        torch.testing.assert_close(shared.reports[name], plain.reports[name])


def test_solve_group_gets_each_shared_input_once():
    model = tiny_model("llama")
    seen = []

    def solve_group(members, acc):
        seen.append([n.rsplit(".", 1)[-1] for n in members])
        return {n: acc.H.clone() for n in members}

    modules = match_modules(model, ["Linear"], ["lm_head"])
    kw = dict(modules=modules, progress=False, make_accumulator=lambda n, m, d: HessianAccumulator(m.in_features, d))
    grouped = run_layerwise(model, _batches(), share_inputs=True, solve_group=solve_group, **kw)
    plain = run_layerwise(model, _batches(), solve=lambda n, m, a: a.H.clone(), **kw)
    n_blocks = len(model.model.layers)
    assert seen == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] * n_blocks
    for name in modules:
        torch.testing.assert_close(grouped.reports[name], plain.reports[name])
    with pytest.raises(TypeError, match="solve_group"):
        run_layerwise(model, _batches(), solve_group=solve_group, **kw)  # needs share_inputs


# ----------------------------------------------------------------------------- where activations live


class _Calib:
    def __init__(self, n, L):
        self.input_ids = torch.zeros(n, L, dtype=torch.long)


@pytest.mark.parametrize("setting", ["auto", "host", "device"])
def test_activations_stay_on_the_host_for_a_cpu_run(setting):
    from compress.runner import activation_home
    assert activation_home(setting, "cpu", _Calib(4, 8), tiny_model("llama")) == torch.device("cpu")


def test_auto_puts_activations_on_the_gpu_only_when_a_quarter_of_its_free_memory_holds_them(monkeypatch):
    from compress.runner import activation_home
    model = tiny_model("llama")  # float32: 4 bytes an element
    calib = _Calib(128, 2048)
    need = 2 * 128 * 2048 * model.config.hidden_size * 4  # a block's inputs and outputs
    free = {"bytes": 4 * need}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 8 * need))
    assert activation_home("auto", "cuda", calib, model) == torch.device("cuda")
    free["bytes"] = 4 * need - 4
    assert activation_home("auto", "cuda", calib, model) == torch.device("cpu")
    assert activation_home("device", "cuda", calib, model) == torch.device("cuda")  # asked for: no check
    assert activation_home("host", "cuda", calib, model) == torch.device("cpu")
    with pytest.raises(CompressError, match="auto, host or device, got 'gpu'"):
        activation_home("gpu", "cuda", calib, model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_gptq_is_the_same_with_activations_on_the_device_or_the_host(tmp_path):
    from compress.formats.packed import read_tensors
    from compress.pipeline import run_recipe
    from tests.tiny import byte_tokenizer

    model, tok = tiny_model("llama"), byte_tokenizer()
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    exports = {}
    for where in ("device", "host"):
        recipe = {"model": {"id": str(tmp_path / "src"), "device": "cuda"},
                  "calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 2, "activations": where},
                  "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "bits": 4, "group_size": 32}]}],
                  "export": {"format": "gptq"}}
        run_recipe(recipe, out_dir=tmp_path / where, progress=False, log=lambda *_: None)
        exports[where] = read_tensors(tmp_path / where)
    assert set(exports["device"]) == set(exports["host"])
    for k, v in exports["device"].items():
        assert torch.equal(v, exports["host"][k]), k


def test_gram_is_the_float32_product_on_cpu():
    from compress.accumulators import gram
    x = torch.randn(300, 48, generator=torch.Generator().manual_seed(0)).bfloat16()
    ref = x.float().T @ x.float()
    got = gram(x)
    assert got.dtype == torch.float32 and torch.equal(got, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_of_half_inputs_on_cuda_matches_float32(dtype):
    """The tensor-core product (exact pairwise products, float32 sums) against casting to float32 first:
    only how the float32 sums are formed may differ. An entry sums 4,096 products; against the largest entry
    (a diagonal one, ~4,096 x 9) the two differed by 1.4e-5 on an H200, and the bound is 1e-4 (a bf16 output
    would be off by ~4e-3)."""
    from compress import accumulators
    x = (torch.randn(4096, 512, generator=torch.Generator().manual_seed(0)) * 3).to(dtype).cuda()
    ref = x.float().T @ x.float()
    got = accumulators.gram(x)
    assert not accumulators._MM_OUT_DTYPE, "torch.mm(out_dtype=float32) unavailable: the float32 fallback ran"
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
