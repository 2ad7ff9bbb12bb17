"""Quantized exports (GPTQ v1, compressed-tensors pack-quantized) and the toolkit's own
loaders for them, on tiny models. No gptqmodel needed (see test_interop.py for that)."""
from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import compress.quantize  # noqa: F401  (registers the quantize steps)
from compress.algorithms import ALGORITHMS, StepContext
from compress.errors import CompressError
from compress.export import write_export
from compress.formats.compressed_tensors import pack_dense, unpack_dense
from compress.models import load_model
from compress.quantize.gptq_v1 import pack_bits
from tests.tiny import TEXT, byte_tokenizer, tiny_config, tiny_model

IDS = torch.tensor([list(b"The quick brown fox jumps over"), list(b"Calibration data should look l")])


class _Calibration:
    """Four 32-byte windows of TEXT (the byte tokenizer maps byte b to id b)."""

    def __init__(self):
        self.ids = torch.tensor(list(TEXT.encode()[: 4 * 32])).view(4, 32)

    def batches(self, batch_size):
        for i in range(0, len(self.ids), batch_size):
            yield self.ids[i:i + batch_size]


def quantized_tiny(arch="llama", steps=(("rtn", {}),), *, tie=False, seed=0):
    """A tiny model after the given quantize steps, and the state they left."""
    if tie:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        cfg = tiny_config(arch)
        cfg.tie_word_embeddings = True
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    else:
        model = tiny_model(arch, seed)
    ctx = StepContext(tokenizer=byte_tokenizer(), device="cpu", calibration=_Calibration(), batch_size=2,
                      progress=False)
    for name, kw in steps:
        ALGORITHMS[name].apply(model, ALGORITHMS[name].config(algorithm=name, **kw), ctx)
    return model, ctx.state


def export(model, state, out, fmt="gptq", dtype=None):
    return write_export(model, byte_tokenizer(), out, spec=SimpleNamespace(format=fmt, dtype=dtype),
                        recipe_yaml="version: 1\n", report={}, state=state)


def fp16_reference(model, state):
    """What an exact reader of the export computes: quantized weights rebuilt from fp16
    scales (in float32), every other tensor rounded through float16."""
    ref = copy.deepcopy(model)
    quant = state.quant
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(p.half().float())
        for name, m in ref.named_modules():
            if name in quant:
                res = quant[name]
                g = res.g_idx.long()
                m.weight.copy_(res.scales.half().float()[:, g] * (res.qweight.long() - res.zeros.long()[:, g]).float())
    return ref


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def assert_loads_back(model, state, out):
    """Our loader gives the fp16-rounded model exactly (up to float32 sums) and the
    in-memory model up to fp16 rounding of scales and other tensors."""
    loaded = load_model(str(out)).model
    got, ref, mem = logits(loaded), logits(fp16_reference(model, state)), logits(model)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    tol = 2e-3 * mem.abs().max().item()  # fp16 has 11 significant bits: ~5e-4 relative per tensor
    assert (got - mem).abs().max().item() <= tol
    return loaded


# ------------------------------------------------------------------------------- GPTQ


# (arch, step, config): both archs, both solvers, bits 2/4/8, group 32/-1, sym and
# asym, act_order, and a partial last group, without the full cross product.
GPTQ_CASES = [
    ("llama", "rtn", dict(bits=4, group_size=32, sym=True)),
    ("qwen2", "rtn", dict(bits=4, group_size=-1, sym=False)),
    ("llama", "rtn", dict(bits=2, group_size=32, sym=False)),
    ("qwen2", "rtn", dict(bits=8, group_size=32, sym=True)),
    ("llama", "rtn", dict(bits=4, group_size=128, sym=True)),  # partial last group: 160 = 128 + 32
    ("llama", "gptq", dict(bits=4, group_size=32, sym=False)),
    ("qwen2", "gptq", dict(bits=4, group_size=32, sym=True)),
    ("llama", "gptq", dict(bits=8, group_size=-1, sym=True)),
    ("qwen2", "gptq", dict(bits=2, group_size=-1, sym=False)),
    ("qwen2", "gptq", dict(bits=4, group_size=32, sym=True, act_order=True)),
]


def _case_id(case):
    arch, algo, kw = case
    return f"{arch}-{algo}-b{kw['bits']}-g{kw['group_size']}-{'sym' if kw['sym'] else 'asym'}" + (
        "-actorder" if kw.get("act_order") else "")


@pytest.mark.parametrize("case", GPTQ_CASES, ids=_case_id)
def test_gptq_export_loads_back_with_same_logits(tmp_path, case):
    arch, algo, kw = case
    model, state = quantized_tiny(arch, [(algo, kw)])
    out = export(model, state, tmp_path / "out")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == kw["bits"] and qcfg["group_size"] == kw["group_size"] and qcfg["sym"] == kw["sym"]
    assert qcfg["desc_act"] is False  # static groups: g_idx stays j // group_size, even with act_order
    assert "dynamic" not in qcfg
    assert ("backend" in qcfg) == (kw["group_size"] == 128)  # partial groups need gptqmodel's torch kernel
    assert_loads_back(model, state, out)


def test_gptq_layout_shapes_dtypes_and_config(tmp_path):
    model, state = quantized_tiny("qwen2", [("rtn", dict(bits=4, group_size=32, sym=True))])
    out = export(model, state, tmp_path / "out")
    tensors = load_file(str(out / "model.safetensors"))
    for name, res in state.quant.items():
        out_f, in_f = res.qweight.shape
        G = -(-in_f // 32)
        assert f"{name}.weight" not in tensors
        qweight, qzeros, scales = (tensors[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales"))
        assert qweight.dtype == torch.int32 and qweight.shape == (in_f * 4 // 32, out_f)
        assert qzeros.dtype == torch.int32 and qzeros.shape == (G, out_f * 4 // 32)
        assert scales.dtype == torch.float16 and scales.shape == (G, out_f)
        assert torch.equal(tensors[f"{name}.g_idx"], (torch.arange(in_f) // 32).to(torch.int32))
        # qweight column o = the packed levels of output row o; qzeros stores zero - 1 = 7 (0x77777777)
        assert torch.equal(tensors[f"{name}.qweight"][:, 3], pack_bits(res.qweight[3], 4))
        assert set((tensors[f"{name}.qzeros"].view(-1).tolist())) == {0x77777777}
    qwen_bias = "model.layers.0.self_attn.q_proj.bias"
    assert tensors[qwen_bias].dtype == torch.float16  # qwen2's q/k/v biases stay float
    floats = {k: v for k, v in tensors.items() if not k.endswith(("qweight", "qzeros", "g_idx"))}
    assert {v.dtype for v in floats.values()} == {torch.float16}
    assert "lm_head.weight" in tensors and "model.embed_tokens.weight" in tensors
    config = json.loads((out / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg == json.loads((out / "quantize_config.json").read_text())
    assert {k: qcfg[k] for k in ("quant_method", "checkpoint_format", "true_sequential", "desc_act")} == {
        "quant_method": "gptq", "checkpoint_format": "gptq", "true_sequential": True, "desc_act": False}
    assert 0 < qcfg["damp_percent"] < 1
    assert config["dtype"] == "float16"
    assert json.loads((out / "compress_export.json").read_text())["format"] == "gptq"
    assert (out / "tokenizer.json").is_file()


def test_gptq_tied_embeddings_are_stored_once(tmp_path):
    model, state = quantized_tiny("llama", [("rtn", dict(bits=4, group_size=32, sym=True))], tie=True)
    out = export(model, state, tmp_path / "out")
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    loaded = assert_loads_back(model, state, out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_gptq_3bit_needs_32_aligned_outputs(tmp_path):
    # k/v have 80 outputs (2 kv heads x 40): 3-bit runs of 32 values cannot pack them.
    model, state = quantized_tiny("llama", [("rtn", dict(bits=3, group_size=32, sym=True))])
    with pytest.raises(CompressError, match=r"k_proj.*3 bits.*multiple of 32"):
        export(model, state, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # Leaving k/v in float works: they are excluded with negative dynamic rules.
    ignore = ["lm_head", "*.k_proj", "*.v_proj"]
    model, state = quantized_tiny("llama", [("rtn", dict(bits=3, group_size=32, sym=True, ignore=ignore))])
    out = export(model, state, tmp_path / "out")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 3
    negative = [re.compile(k[2:]) for k in qcfg["dynamic"] if k.startswith("-:")]
    assert all(v == {} for k, v in qcfg["dynamic"].items() if k.startswith("-:"))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for n in names:
        excluded = n.endswith(("k_proj", "v_proj"))
        assert any(r.match(n) for r in negative) == excluded, n
        assert any(q in n for q in qcfg["modules_in_block_to_quantize"][0]) != excluded, n
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.k_proj.weight"].dtype == torch.float16
    assert "model.layers.0.self_attn.k_proj.qweight" not in tensors
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (160 * 3 // 32, 160)
    assert_loads_back(model, state, out)


def test_gptq_mixed_bits_become_dynamic_overrides(tmp_path):
    steps = [("rtn", dict(bits=4, group_size=32, sym=True, ignore=["lm_head", "*.down_proj", "*.o_proj"])),
             ("rtn", dict(bits=8, group_size=32, sym=True, targets=["*.down_proj"])),
             ("rtn", dict(bits=4, group_size=-1, sym=False, targets=["model.layers.1.self_attn.o_proj"])),
             ("rtn", dict(bits=4, group_size=32, sym=True, targets=["model.layers.[02].self_attn.o_proj"]))]
    model, state = quantized_tiny("qwen2", steps)
    out = export(model, state, tmp_path / "out")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"]) == (4, 32, True)  # the most common spec
    rules = [(re.compile(k[2:]), v) for k, v in qcfg["dynamic"].items()]
    assert all(k.startswith("+:") for k in qcfg["dynamic"])

    def override(name):  # gptqmodel / vLLM: the first rule that re.match-es
        return next((v for r, v in rules if r.match(name)), {})

    for name in state.quant:
        if name.endswith("down_proj"):
            assert override(name) == {"bits": 8}, name
        elif name == "model.layers.1.self_attn.o_proj":
            assert override(name) == {"group_size": -1, "sym": False}
        else:
            assert override(name) == {}, name
    assert override("model.layers.11.mlp.down_proj") == {}  # anchored: layer 1 is not layer 11
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.2.mlp.down_proj.qweight"].shape == (320 * 8 // 32, 160)
    assert tensors["model.layers.1.self_attn.o_proj.scales"].shape == (1, 160)
    assert_loads_back(model, state, out)


def test_gptq_dynamic_rules_match_vllm_fused_names():
    from compress.formats.gptq import dynamic_rules

    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")] + [
        "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    rules = [re.compile(r) for r in dynamic_rules(names)]

    def hit(n):
        return any(r.match(n) for r in rules)

    assert hit("model.layers.0.self_attn.qkv_proj") and all(hit(n) for n in names)
    assert not hit("model.layers.0.self_attn.o_proj") and not hit("model.layers.0.mlp.gate_up_proj")
    assert not hit("model.layers.1.mlp.gate_up_proj")  # only up_proj of layer 1 is listed


def test_gptq_permuted_g_idx_sets_desc_act(tmp_path):
    model, state = quantized_tiny("llama", [("rtn", dict(bits=4, group_size=32, sym=True))])
    name = "model.layers.1.mlp.up_proj"
    res = state.quant[name]
    res.g_idx = (torch.arange(160) % 5).to(torch.int32)  # a real act-order g_idx is a permuted grouping
    with torch.no_grad():
        model.get_submodule(name).weight.copy_(res.dequantize())
    out = export(model, state, tmp_path / "out")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["desc_act"] is False
    assert [v for k, v in qcfg["dynamic"].items() if re.match(k[2:], name)] == [{"desc_act": True}]
    assert torch.equal(load_file(str(out / "model.safetensors"))[f"{name}.g_idx"], res.g_idx)
    assert_loads_back(model, state, out)


def test_gptq_refusals(tmp_path):
    model = tiny_model()
    with pytest.raises(CompressError, match="run rtn or gptq before exporting format gptq"):
        export(model, {}, tmp_path / "a")
    # lm_head lies outside the decoder blocks: transformers/optimum would load it as float.
    model, state = quantized_tiny("llama", [("rtn", dict(bits=4, group_size=32, sym=True, ignore=[]))])
    with pytest.raises(CompressError, match="lm_head is quantized but lies outside"):
        export(model, state, tmp_path / "b")
    # a zero point of 0 cannot be stored as zero-1 (the solvers never make one: set it by hand)
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5].abs_()
    ctx = StepContext(tokenizer=None, device="cpu", progress=False)
    ALGORITHMS["rtn"].apply(model, ALGORITHMS["rtn"].config(bits=4, group_size=32, sym=False), ctx)
    assert int(ctx.state.quant["model.layers.0.mlp.up_proj"].zeros.min()) >= 1
    res = ctx.state.quant["model.layers.0.mlp.up_proj"]
    res.zeros[5, 0] = 0
    with torch.no_grad():  # keep the weight on its (hand-edited) grid
        model.model.layers[0].mlp.up_proj.weight[5, :32] = res.scales[5, 0] * res.qweight[5, :32].float()
    with pytest.raises(CompressError, match=r"\d+ zero points are 0.*: model\.layers\.0\.mlp\.up_proj \(\d+\)\."):
        export(model, ctx.state, tmp_path / "c")
    # a weight changed after quantization no longer matches its levels
    model, state = quantized_tiny("llama", [("rtn", dict(bits=4, group_size=32, sym=True))])
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.mul_(1.1)
    with pytest.raises(CompressError, match="o_proj is no longer on its quantization grid"):
        export(model, state, tmp_path / "d")
    model, state = quantized_tiny("llama", [("rtn", dict(bits=4, group_size=32, sym=True))])
    with pytest.raises(CompressError, match="dtype 'bfloat16' is not supported"):
        export(model, state, tmp_path / "e", dtype="bfloat16")
    assert not [p for p in tmp_path.iterdir() if p.name != "a"]  # nothing half-written


# ------------------------------------------------------------------------------- compressed-tensors


CT_CASES = [
    ("llama", "rtn", dict(bits=4, group_size=32, sym=True)),
    ("qwen2", "rtn", dict(bits=8, group_size=-1, sym=False)),
    ("llama", "rtn", dict(bits=3, group_size=32, sym=True)),  # dense packing: 80 outputs are fine at 3 bits
    ("qwen2", "gptq", dict(bits=4, group_size=32, sym=False)),
    ("llama", "gptq", dict(bits=2, group_size=-1, sym=True, act_order=True)),
]


@pytest.mark.parametrize("case", CT_CASES, ids=_case_id)
def test_ct_export_loads_back_with_same_logits(tmp_path, case):
    arch, algo, kw = case
    model, state = quantized_tiny(arch, [(algo, kw)])
    out = export(model, state, tmp_path / "out", fmt="compressed-tensors")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = qcfg["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (kw["bits"], kw["sym"])
    assert weights["strategy"] == ("channel" if kw["group_size"] == -1 else "group")
    assert_loads_back(model, state, out)


def test_ct_layout_shapes_dtypes_and_config(tmp_path):
    model, state = quantized_tiny("qwen2", [("rtn", dict(bits=4, group_size=32, sym=False))])
    out = export(model, state, tmp_path / "out", fmt="compressed-tensors")
    tensors = load_file(str(out / "model.safetensors"))
    for name, res in state.quant.items():
        out_f, in_f = res.qweight.shape
        assert f"{name}.weight" not in tensors
        packed = tensors[f"{name}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (out_f, in_f * 4 // 32)
        assert torch.equal(packed, pack_bits(res.qweight, 4))  # the GPTQ bitstream, not transposed
        assert tensors[f"{name}.weight_scale"].dtype == torch.float16
        assert tensors[f"{name}.weight_scale"].shape == (out_f, in_f // 32)
        zp = tensors[f"{name}.weight_zero_point"]
        assert zp.dtype == torch.int32 and zp.shape == (out_f * 4 // 32, in_f // 32)  # packed along outputs
        assert torch.equal(unpack_dense(zp.T, 4, out_f).T, res.zeros)  # stored: zp_signed + 8 = our zero
        assert tensors[f"{name}.weight_shape"].tolist() == [out_f, in_f]
    assert tensors["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qcfg[k] for k in ("quant_method", "format", "quantization_status", "ignore")} == {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "ignore": ["lm_head"]}
    group = qcfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}


def test_ct_dense_packing_pads_runs():
    g = torch.Generator().manual_seed(0)
    for bits, n in [(3, 80), (2, 40), (4, 36), (8, 5)]:
        vals = torch.randint(0, 2**bits, (3, n), generator=g)
        packed = pack_dense(vals, bits)
        assert packed.shape == (3, -(-n * bits // 32))
        assert torch.equal(unpack_dense(packed, bits, n), vals.to(torch.int32))


def test_ct_refusals(tmp_path):
    with pytest.raises(CompressError, match="run rtn or gptq before exporting format compressed-tensors"):
        export(tiny_model(), {}, tmp_path / "a", fmt="compressed-tensors")
    steps = [("rtn", dict(bits=4, group_size=32, sym=True, ignore=["lm_head", "*.down_proj"])),
             ("rtn", dict(bits=8, group_size=32, sym=True, targets=["*.down_proj"]))]
    model, state = quantized_tiny("llama", steps)
    with pytest.raises(CompressError, match=r"one scheme .*4-bit g32 sym, 8-bit g32 sym.*format gptq"):
        export(model, state, tmp_path / "b", fmt="compressed-tensors")
    model, state = quantized_tiny("llama", [("rtn", dict(bits=4, group_size=128, sym=True))])
    with pytest.raises(CompressError, match="160 inputs are not a multiple of group_size 128"):
        export(model, state, tmp_path / "c", fmt="compressed-tensors")


def test_ct_matches_the_compressed_tensors_library(tmp_path):
    """Bit-exact against compressed-tensors' own PackedQuantizationCompressor, both ways."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    for bits, gs, sym in [(4, 32, False), (3, 32, True), (8, -1, False), (2, 32, True)]:
        model, state = quantized_tiny("llama", [("rtn", dict(bits=bits, group_size=gs, sym=sym))])
        out = export(model, state, tmp_path / f"b{bits}", fmt="compressed-tensors")
        tensors = load_file(str(out / "model.safetensors"))
        loaded = load_model(str(out)).model
        qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
        scheme = QuantizationScheme(**qcfg["config_groups"]["group_0"])
        assert scheme.weights == QuantizationArgs(**qcfg["config_groups"]["group_0"]["weights"])
        mid = 1 << (bits - 1)
        for name, res in state.quant.items():
            ours = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
            if not sym:
                ours["weight_zero_point"] = tensors[f"{name}.weight_zero_point"]
            # library decompress of our tensors == our loader's weights, in the scale dtype
            theirs = PackedQuantizationCompressor.decompress(dict(ours), scheme)["weight"]
            mine = loaded.get_submodule(name).weight.detach()
            assert theirs.dtype == torch.float16 and torch.equal(theirs, mine.half()), name
            # library compress of the same grid == our packed tensors
            scale = ours["weight_scale"].float()
            state = {"weight": mine.float(), "weight_scale": scale}
            if not sym:
                state["weight_zero_point"] = (res.zeros - mid).to(torch.int8)
            packed = PackedQuantizationCompressor.compress(state, scheme)
            assert torch.equal(packed["weight_packed"], ours["weight_packed"]), name
            if not sym:
                assert torch.equal(packed["weight_zero_point"], ours["weight_zero_point"]), name
            else:
                assert "weight_zero_point" not in packed
