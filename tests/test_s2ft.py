"""S2FT core: selection, co-permutation, partial backprop, adapters, bad input."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from compress.errors import CompressError
from compress.finetune import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, S2FTConfig, S2FTLinear, apply_s2ft,
                               load_adapter, save_adapter, switch_adapter)
from compress.finetune.permute import kv_head_indices
from tests.tiny import TINY_ARCHS, tiny_config, tiny_model

EVERYTHING = dict(attention_ratio=0.5, mlp_ratio=0.25, attention_modules=["v_proj", "o_proj"],
                  mlp_modules=["gate_proj", "up_proj", "down_proj"])


def _ids(seed=0, batch=2, length=12):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _random_biases(model, seed=2):
    """The tiny qwen2's q/k/v biases start at zero; make them matter for the permutation tests."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.5)
    return model


def _random_deltas(handle, seed=1, std=0.02):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


# -- co-permutation --------------------------------------------------------------------------

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_permutation_keeps_function_and_undoes_exactly(arch):
    model = _random_biases(tiny_model(arch))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    ref = _logits(model, ids)
    handle = apply_s2ft(model, EVERYTHING)
    # the permutation really moved heads (GQA groups with q/k/v/o, qwen2 biases) and channels
    moved = [i for i, o in enumerate(handle.kv_orders) if o is not None and o != sorted(o)]
    assert moved and any(o is not None and o != sorted(o) for o in handle.channel_orders)
    for name in ("q_proj", "k_proj", "v_proj") + (("q_proj.bias",) if arch == "qwen2" else ()):
        key = f"model.layers.{moved[0]}.self_attn.{name}" + ("" if "." in name else ".weight")
        assert not torch.equal(model.state_dict()[key], before[key])
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=1e-5)
    handle.remove()
    after = model.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # pure moves: bit-exact undo
    assert not any(isinstance(m, S2FTLinear) for m in model.modules())


# -- partial backprop ------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["rows", "cols"])
@pytest.mark.parametrize("bias", [False, True])
def test_slice_linear_gradients_equal_full_backward(side, bias):
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=bias)
    plain = copy.deepcopy(base)
    wrapped = S2FTLinear(base, side, 5)
    with torch.no_grad():
        wrapped.delta.normal_()
        (plain.weight[:5] if side == "rows" else plain.weight[:, :5]).add_(wrapped.delta)
    x = torch.randn(3, 7, 24)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    upstream = torch.randn(3, 7, 16)
    y1, y2 = wrapped(x1), plain(x2)
    torch.testing.assert_close(y1, y2)
    (y1 * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    full = plain.weight.grad
    torch.testing.assert_close(wrapped.delta.grad, full[:5] if side == "rows" else full[:, :5])
    assert wrapped.weight.grad is None and (wrapped.bias is None or wrapped.bias.grad is None)


def test_slice_linear_under_autocast():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    plain, wrapped = copy.deepcopy(base), S2FTLinear(base, "cols", 5)
    x = torch.randn(4, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y1, y2 = wrapped(x), plain(x)
    assert y1.dtype == y2.dtype == torch.bfloat16
    g1 = torch.autograd.grad(y1.float().square().sum(), [x, wrapped.delta])
    g2 = torch.autograd.grad(y2.float().square().sum(), [x, plain.weight])
    assert g1[0].dtype == torch.float32 and g1[1].dtype == torch.float32
    torch.testing.assert_close(g1[0], g2[0], rtol=0.02, atol=0.02)
    torch.testing.assert_close(g1[1], g2[1][:, :5], rtol=0.02, atol=0.02)


def _saved_activation_elements(module, x):
    """Elements (and storage bytes) of what autograd saves for backward, parameters excluded."""
    params = {p.data_ptr() for p in module.parameters()}
    numel, nbytes = [], []

    def pack(t):
        if t.data_ptr() not in params:
            numel.append(t.numel())
            nbytes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum().backward()
    return sum(numel), sum(nbytes)


@pytest.mark.parametrize("leading", [(2, 9), (1, 1)])  # (1, 1, in): a slice of it is "contiguous"
def test_column_slice_saves_only_its_input_columns(leading):
    torch.manual_seed(0)
    x = torch.randn(*leading, 64, requires_grad=True)
    plain_numel, _ = _saved_activation_elements(nn.Linear(64, 32), x)
    assert plain_numel == x.numel()  # a plain linear keeps all of x
    cols = S2FTLinear(nn.Linear(64, 32), "cols", 8)
    numel, nbytes = _saved_activation_elements(cols, x)
    assert numel == x.numel() // 8 and nbytes == numel * 4  # a copy of x[..., :8], not a view of x
    rows = S2FTLinear(nn.Linear(64, 32), "rows", 8)
    assert _saved_activation_elements(rows, x)[0] == x.numel()  # dW[:8] = grad_y[..., :8]ᵀ x needs all x
    rows.delta.requires_grad_(False)
    assert _saved_activation_elements(rows, x)[0] == 0  # no delta grad: nothing of x kept


def _slice_indices(handle, fqn, module):
    """Original row/column indices that a permuted module's leading slice came from."""
    block = next(b for b in handle.blocks if fqn.startswith(b.prefix + "."))
    name = fqn.rsplit(".", 1)[1]
    if name in ("v_proj", "o_proj"):
        kv_rows, q_rows = kv_head_indices(handle.kv_orders[block.index], block)
        return (kv_rows if name == "v_proj" else q_rows)[: module.size]
    return torch.as_tensor(handle.channel_orders[block.index][: module.size])


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_model_slice_gradients_equal_full_backward(arch):
    model = _random_biases(tiny_model(arch))
    handle = apply_s2ft(model, EVERYTHING)
    _random_deltas(handle)
    # Reference: the same weights as a plain model in the original order, every weight trainable.
    plain = copy.deepcopy(model)
    plain._s2ft_handle.remove(merge=True)
    for p in plain.parameters():
        p.requires_grad_(True)
    ids = _ids(1)
    embeds = model.get_input_embeddings()(ids).detach()
    e1, e2 = embeds.clone().requires_grad_(True), embeds.clone().requires_grad_(True)
    out1 = model(inputs_embeds=e1, labels=ids, use_cache=False)
    out2 = plain(inputs_embeds=e2, labels=ids, use_cache=False)
    torch.testing.assert_close(out1.loss, out2.loss, rtol=0, atol=1e-5)
    out1.loss.backward()
    out2.loss.backward()
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-4, atol=1e-7)
    plain_modules = dict(plain.named_modules())
    sides = set()
    for fqn, module in handle.modules.items():
        idx = _slice_indices(handle, fqn, module)
        full = plain_modules[fqn].weight.grad
        expect = full[idx] if module.side == "rows" else full[:, idx]
        torch.testing.assert_close(module.delta.grad, expect, rtol=1e-4, atol=1e-7)
        sides.add((fqn.rsplit(".", 1)[1], module.side))
    assert sides == {("v_proj", "rows"), ("o_proj", "cols"), ("gate_proj", "rows"), ("up_proj", "rows"),
                     ("down_proj", "cols")}


def test_training_touches_only_the_deltas():
    model = tiny_model("qwen2")
    handle = apply_s2ft(model, EVERYTHING)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".delta")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in handle.parameters()}
    assert len(trainable) == len(handle.modules)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    ids = _ids(2)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids, use_cache=False).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # bit-for-bit
    assert all(p.abs().sum() > 0 for p in handle.parameters())
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim() > 0)
    assert state_numel == 2 * handle.num_trainable()  # Adam moments for the slices only


# -- selection -------------------------------------------------------------------------------

def test_random_selection_is_a_seeded_global_pool():
    cfg = dict(attention_ratio=0.5, mlp_ratio=0.1)
    sel = lambda seed: apply_s2ft(tiny_model(), {**cfg, "seed": seed}).selection  # noqa: E731
    a, b = sel(0), sel(0)
    assert a == b and sel(1) != a
    assert sum(map(len, a.attention)) == round(0.5 * 3 * 2) and sum(map(len, a.mlp)) == 96  # 10% of 3*320


@pytest.mark.parametrize("strategy", ["weight", "activation", "gradient"])
def test_score_strategies_pick_the_boosted_unit(strategy):
    model = tiny_model()
    with torch.no_grad():
        layer = model.model.layers[1]
        if strategy == "weight":
            layer.mlp.down_proj.weight[:, 17] *= 50
            layer.self_attn.o_proj.weight[:, 40 * 2:40 * 3] *= 50  # query head 2 -> KV group 1
        else:  # bigger inputs to down column 17 / o columns of group 1, and bigger gradients there
            layer.mlp.up_proj.weight[17] *= 50
            layer.self_attn.v_proj.weight[40:80] *= 50
    batches = [_ids(i) for i in range(2)]
    handle = apply_s2ft(model, dict(strategy=strategy, attention_ratio=0.5, mlp_ratio=0.05), batches)
    assert 17 in handle.selection.mlp[1]
    assert handle.selection.attention[1] == [1]
    assert all(len(s) == 16 for s in handle.selection.mlp)  # the same count per layer
    assert all(p.grad is None for p in model.parameters())


# -- adapters --------------------------------------------------------------------------------

def _trained(arch="llama", seed=0, delta_seed=1, **over):
    model = tiny_model(arch)
    handle = apply_s2ft(model, {**EVERYTHING, "seed": seed, **over})
    _random_deltas(handle, delta_seed)
    return model, handle


def test_adapter_round_trip(tmp_path):
    model, handle = _trained("qwen2")
    ids = _ids(3)
    want = _logits(model, ids)
    save_adapter(handle, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    meta = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    assert meta["selection"] == handle.selection.to_json() and meta["s2ft"]["seed"] == 0
    from safetensors.torch import load_file
    assert set(load_file(tmp_path / "a" / ADAPTER_WEIGHTS)) == {n for n, _ in handle.named_parameters()}
    assert meta["num_trainable"] == handle.num_trainable() < sum(p.numel() for p in model.parameters()) // 5
    fresh = tiny_model("qwen2")
    loaded = load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(_logits(fresh, ids), want, rtol=0, atol=1e-5)
    assert not loaded.fused and [p.requires_grad for p in loaded.parameters()] == [True] * len(loaded.modules)
    fused = tiny_model("qwen2")
    load_adapter(fused, tmp_path / "a", fuse=True)
    torch.testing.assert_close(_logits(fused, ids), want, rtol=0, atol=1e-5)
    # merged into a plain model in the original order: same function, plain linears
    loaded.remove(merge=True)
    assert not any(isinstance(m, S2FTLinear) for m in fresh.modules())
    torch.testing.assert_close(_logits(fresh, ids), want, rtol=0, atol=1e-5)


def test_fuse_then_unfuse_restores_weights():
    model, handle = _trained()
    ids = _ids(4)
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".delta")}
    unfused = _logits(model, ids)
    handle.fuse()
    assert handle.fused
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in base.items())
    torch.testing.assert_close(_logits(model, ids), unfused, rtol=0, atol=1e-5)
    handle.unfuse()
    for k, v in base.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=1e-6)


def test_switch_adapters_in_place(tmp_path):
    ids = _ids(5)
    want = {}
    seeds = {"a": 0, "b": 0, "c": 7}  # b: the same slices as a (in-place switch); c: other slices
    for delta_seed, (name, seed) in enumerate(seeds.items()):
        model, handle = _trained(seed=seed, delta_seed=delta_seed)
        want[name] = _logits(model, ids)
        save_adapter(handle, tmp_path / name)
    assert not torch.allclose(want["a"], want["b"])
    model = tiny_model()
    handle, current = load_adapter(model, tmp_path / "a"), "a"
    for name, fuse in (("b", None), ("a", True), ("b", None), ("c", None), ("a", False), ("c", True)):
        new = switch_adapter(handle, tmp_path / name, fuse=fuse)
        assert (new is handle) == (seeds[name] == seeds[current])
        expect_fused = handle.fused if fuse is None else fuse
        handle, current = new, name
        assert handle.fused == expect_fused
        torch.testing.assert_close(_logits(model, ids), want[name], rtol=0, atol=2e-5)
    handle = load_adapter(model, tmp_path / "b")  # loading onto a model with S2FT on switches
    torch.testing.assert_close(_logits(model, ids), want["b"], rtol=0, atol=2e-5)
    handle.remove()
    base = tiny_model().state_dict()
    assert all(torch.allclose(v, base[k], rtol=0, atol=1e-6) for k, v in model.state_dict().items())


def test_bf16_model_with_fp32_deltas(tmp_path):
    model, handle = _trained()
    save_adapter(handle, tmp_path / "a")
    ids = _ids(6)
    want = _logits(model, ids)
    half = tiny_model().to(torch.bfloat16)
    loaded = load_adapter(half, tmp_path / "a")  # the fingerprint tolerates the dtype cast
    torch.testing.assert_close(_logits(half, ids).float(), want, rtol=0, atol=0.1)
    loaded.remove()
    handle = apply_s2ft(half, {**EVERYTHING, "delta_dtype": "float32"})
    assert all(p.dtype == torch.float32 for p in handle.parameters())
    half(ids, labels=ids, use_cache=False).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in handle.parameters())


# -- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("attention_ratio", 1.5), ("mlp_ratio", -0.1),
                                         ("mlp_ratio", float("nan"))])
def test_bad_ratio_names_the_field(field, value):
    with pytest.raises(CompressError, match=field):
        apply_s2ft(tiny_model(), {field: value})
    with pytest.raises(ValueError, match=field):
        S2FTConfig(**{field: value})
    with pytest.raises(CompressError, match=field):
        apply_s2ft(tiny_model(), S2FTConfig.model_construct(**{field: value}))


@pytest.mark.parametrize("config,message", [
    (dict(attention_ratio=0, mlp_ratio=0), "nothing to train"),
    (dict(mlp_ratio=0.0001), "mlp_ratio=0.0001 selects no FFN channels"),
    (dict(strategy="weight", attention_ratio=0.1, mlp_ratio=0), "attention_ratio=0.1 selects no KV head groups"),
    (dict(mlp_ratio=0.1, mlp_modules=[]), "mlp_modules is empty"),
    (dict(strategy="magic"), "strategy"),
    (dict(ratio=0.1), "ratio"),
])
def test_bad_config(config, message):
    with pytest.raises(CompressError, match=message):
        apply_s2ft(tiny_model(), config)


def test_data_strategies_need_batches():
    with pytest.raises(CompressError, match="'activation' needs calibration batches"):
        apply_s2ft(tiny_model(), dict(strategy="activation"))
    with pytest.raises(CompressError, match="'gradient' needs calibration batches; the iterable was empty"):
        apply_s2ft(tiny_model(), dict(strategy="gradient"), batches=[])


def test_missing_module_is_named():
    model = tiny_model()
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(CompressError, match=r"model\.layers\.1\.mlp\.up_proj"):
        apply_s2ft(model)
    with pytest.raises(CompressError, match="no decoder blocks"):
        apply_s2ft(nn.Sequential(nn.Linear(4, 4)))


def test_applying_twice_is_refused():
    model = tiny_model()
    apply_s2ft(model)
    with pytest.raises(CompressError, match="already applied"):
        apply_s2ft(model)


def test_adapter_on_a_mismatched_base(tmp_path):
    _, handle = _trained()
    save_adapter(handle, tmp_path / "a")
    other = tiny_model(seed=5)
    with pytest.raises(CompressError, match=r"model\.layers\.0\.self_attn\.q_proj weights differ"):
        load_adapter(other, tmp_path / "a")  # same shapes, other weights
    assert not any(isinstance(m, S2FTLinear) for m in other.modules())  # refused before touching it
    cfg = tiny_config()
    cfg.intermediate_size = 256
    from transformers import AutoModelForCausalLM
    with pytest.raises(CompressError, match="intermediate=320, this model 256"):
        load_adapter(AutoModelForCausalLM.from_config(cfg), tmp_path / "a")
    with pytest.raises(CompressError, match="model_type='llama', this model 'qwen2'"):
        load_adapter(tiny_model("qwen2"), tmp_path / "a")
    with pytest.raises(CompressError, match="adapter_config.json not found"):
        load_adapter(tiny_model(), tmp_path / "missing")
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({"format": "peft"}))
    with pytest.raises(CompressError, match="not an S2FT adapter config"):
        load_adapter(tiny_model(), tmp_path / "a")
