"""Our quantized exports loaded by the stacks that serve them: transformers (via optimum
+ gptqmodel, and via compressed-tensors) and gptqmodel itself, on the CPU.

Each test checks the layout bit for bit (the external loader's dequantized weights
equal our loader's, in float16) and the logits within the precision the external
kernel computes in (stated per test)."""
from __future__ import annotations

import json

import pytest
import torch

from compress.models import load_model
from tests.test_quant_export import IDS, export, logits, quantized_tiny

pytest.importorskip("optimum")
pytest.importorskip("gptqmodel")

pytestmark = pytest.mark.interop


@pytest.fixture(autouse=True)
def _no_torch_compile():
    # gptqmodel's TorchLinear.post_init torch.compile-s its dequantize (inductor): 20+ s
    # per shape on this CPU for a test model; eager runs the same maths.
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        yield


def _quant_modules(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "qweight") and hasattr(m, "dequantize_weight")}


def assert_same_weights(external, ours_dir):
    """Every linear of the external model equals ours in float16, bit for bit."""
    ours = dict(load_model(str(ours_dir)).model.named_modules())
    quant = _quant_modules(external)
    assert quant, "no layer was loaded as a gptqmodel quantized linear"
    for name, m in external.named_modules():
        if name in quant:
            w = m.dequantize_weight().T  # gptqmodel returns [in, out]
        elif isinstance(m, torch.nn.Linear):
            w = m.weight
        else:
            continue
        assert torch.equal(w.half(), ours[name].weight.half()), name
    return quant


def assert_logits_close(external, ours_dir, rel):
    """|Δlogits| <= rel · max|logits| against our loader's float32 model."""
    ref = logits(load_model(str(ours_dir)).model)
    with torch.no_grad():
        got = external(IDS).logits.float()
    err = (got - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


def test_transformers_loads_gptq_w4_g32(tmp_path):
    from transformers import AutoModelForCausalLM

    model, state = quantized_tiny("llama", [("gptq", dict(bits=4, group_size=32, sym=True))])
    out = export(model, state, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out)  # default backend selection
    quant = assert_same_weights(hf, out)
    assert len(quant) == 21
    # On the CPU gptqmodel picks TorchAtenLinear for 4 bits, which runs
    # aten._weight_int4pack_mm_for_cpu with bfloat16 activations and scales: 8 significant
    # bits, ~0.4% per rounding, so 1.5% of the logit range over 3 blocks and the head.
    assert_logits_close(hf, out, rel=1.5e-2)


def test_transformers_loads_partial_last_group(tmp_path):
    """hidden 160 = 128 + 32 at g128 (SmolLM2's 576 = 4.5 x 128 in small)."""
    from transformers import AutoModelForCausalLM

    model, state = quantized_tiny("qwen2", [("gptq", dict(bits=4, group_size=128, sym=False))])
    out = export(model, state, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["backend"] == "torch"
    hf = AutoModelForCausalLM.from_pretrained(out)
    quant = assert_same_weights(hf, out)
    assert {type(m).__name__ for m in quant.values()} == {"TorchLinear"}
    # TorchLinear dequantizes to float16 and multiplies in float16 (11 significant bits).
    assert_logits_close(hf, out, rel=3e-3)


def test_transformers_loads_3bit_with_float_kv(tmp_path):
    """3 bits (k/v, 80 outputs, left float: the negative rules / modules_in_block_to_quantize)."""
    from transformers import AutoModelForCausalLM

    ignore = ["lm_head", "*.k_proj", "*.v_proj"]
    model, state = quantized_tiny("llama", [("rtn", dict(bits=3, group_size=32, sym=True, ignore=ignore))])
    out = export(model, state, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(out)
    quant = assert_same_weights(hf, out)
    assert not [n for n in quant if n.endswith(("k_proj", "v_proj"))] and len(quant) == 15
    assert type(hf.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert_logits_close(hf, out, rel=3e-3)


def test_gptqmodel_honours_dynamic_mixed_bits(tmp_path):
    """Per-module bits through gptqmodel's ``dynamic`` (optimum ignores it: see README)."""
    from gptqmodel import BACKEND, GPTQModel

    steps = [("rtn", dict(bits=4, group_size=32, sym=True, ignore=["lm_head", "*.down_proj"])),
             ("rtn", dict(bits=8, group_size=32, sym=True, targets=["*.down_proj"])),
             ("rtn", dict(bits=2, group_size=-1, sym=False, targets=["model.layers.1.mlp.up_proj"]))]
    model, state = quantized_tiny("llama", steps)
    out = export(model, state, tmp_path / "out")
    gm = GPTQModel.load(str(out), backend=BACKEND.TORCH, device="cpu", dtype=torch.float16).model
    quant = assert_same_weights(gm, out)
    bits = {n: m.bits for n, m in quant.items()}
    assert bits["model.layers.0.mlp.down_proj"] == 8 and bits["model.layers.1.mlp.up_proj"] == 2
    assert bits["model.layers.1.mlp.gate_proj"] == 4
    assert quant["model.layers.1.mlp.up_proj"].group_size == 160  # gptqmodel spells g-1 as in_features
    assert_logits_close(gm, out, rel=3e-3)  # TorchLinear, float16


def test_transformers_loads_compressed_tensors_export(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model, state = quantized_tiny("qwen2", [("gptq", dict(bits=4, group_size=32, sym=True))])
    out = export(model, state, tmp_path / "out", fmt="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        hf(IDS)  # compressed-tensors decompresses on the first forward
    ours = dict(load_model(str(out)).model.named_modules())
    for name, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.equal(m.weight, ours[name].weight.to(m.weight.dtype)), name
    assert_logits_close(hf, out, rel=3e-3)  # a float16 model
