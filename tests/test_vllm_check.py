"""The export-time check of what vLLM 0.26 loads (compress/formats/vllm.py): the GPTQ loader's scheme
and group rules, partial groups, kernel choice per fused layer, tensor-parallel shards, and the
export's warn / require / off."""
from __future__ import annotations

import json
import logging

import pytest

from compress.errors import CompressError
from compress.formats.vllm import LayerSpec, check_compressed_tensors, check_gptq, choose_kernel, fused_layers
from tests.tiny import tiny_model_dir


def smollm2_layers(bits=4, group=128, sym=False, layer=0) -> list[LayerSpec]:
    """One SmolLM2-135M block: hidden 576 (9 heads x 64), 3 KV heads, MLP 1536."""
    p = f"model.layers.{layer}."
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
              "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
              "mlp.down_proj": (1536, 576)}
    return [LayerSpec(p + n, i, o, bits, group, sym) for n, (i, o) in shapes.items()]


def test_fusion_sums_outputs_and_needs_one_scheme():
    fused, problems = fused_layers(smollm2_layers())
    assert {f.name.rpartition(".")[2]: f.out_features for f in fused} == {
        "qkv_proj": 960, "o_proj": 576, "gate_up_proj": 3072, "down_proj": 576}
    assert not problems
    mixed = smollm2_layers()
    mixed[1] = LayerSpec(mixed[1].name, 576, 192, 8, 128, False)  # k_proj at 8 bits
    _, problems = fused_layers(mixed)
    assert len(problems) == 1 and "qkv_proj" in problems[0] and "one scheme" in problems[0]


def test_asymmetric_gptq_is_refused_by_vllms_gptq_loader():
    rep = check_gptq(smollm2_layers(sym=False))
    assert not rep.loads and len(rep.refusals) == 4
    assert "AutoGPTQConfig" in rep.refusals[0] and "sym: true" in rep.refusals[0]
    assert "compressed-tensors" in rep.refusals[0]
    assert not check_gptq(smollm2_layers(bits=3, sym=True)).loads


def test_smollm2_576_at_group_128_names_the_alternative():
    rep = check_gptq(smollm2_layers(sym=True, group=128))
    assert not rep.loads
    partial = [r for r in rep.refusals if "whole number of groups" in r]
    assert {r.split(":")[0].rpartition(".")[2] for r in partial} == {"qkv_proj", "o_proj", "gate_up_proj"}
    assert "576 // 128 = 4 rows (the export has 5)" in partial[0] and "group_size 64 (576 = 9 x 64)" in partial[0]
    assert rep.kernels == {"model.layers.0.mlp.down_proj": "Marlin"}  # 1536 in, 576 out: no Machete (576 % 128)


def test_group_64_loads_and_picks_machete_or_padded_marlin():
    rep = check_gptq(smollm2_layers(sym=True, group=64))
    assert rep.loads, rep.refusals
    k = {n.rpartition(".")[2]: v for n, v in rep.kernels.items()}
    assert k["gate_up_proj"] == "Machete"  # in 576 % 64, out 3072 % 128
    assert k["qkv_proj"].startswith("Marlin (zero-padded")  # out 960: neither 960 % 128 nor 576 % 128
    assert k["o_proj"].startswith("Marlin (zero-padded") and k["down_proj"] == "Marlin"
    assert rep.as_dict()["kernels"] == {"Marlin": 3, "Machete": 1}


def test_group_size_outside_marlins_is_refused():
    rep = check_gptq([LayerSpec("model.layers.0.mlp.down_proj", 1536, 576, 4, 256, True)])
    assert not rep.loads and "Marlin group sizes" in rep.refusals[0]


def test_compressed_tensors_rules():
    assert not check_compressed_tensors(smollm2_layers(bits=3, sym=False)).loads  # zero points: 4 and 8 bits only
    rep = check_compressed_tensors(smollm2_layers(bits=4, sym=False, group=64))
    assert rep.loads
    k = {n.rpartition(".")[2]: v for n, v in rep.kernels.items()}
    assert k["gate_up_proj"] == "Machete" and k["qkv_proj"].startswith("Marlin")  # Marlin takes uint4 + zero points
    rep8 = check_compressed_tensors(smollm2_layers(bits=8, sym=False, group=64))
    assert {n.rpartition(".")[2]: v for n, v in rep8.kernels.items()}["qkv_proj"] == "Humming (fallback kernel)"
    rep3 = check_compressed_tensors(smollm2_layers(bits=3, sym=True, group=64))
    assert rep3.loads and set(rep3.as_dict()["kernels"]) == {"Humming"}


def test_tensor_parallel_shards_row_parallel_inputs():
    down = LayerSpec("model.layers.0.mlp.down_proj", 1536, 576, 4, 128, True)
    assert choose_kernel(down, zero_points=False, tp=1)[0] == "Marlin"
    assert check_gptq([down], tp=2).loads  # 768 inputs = 6 groups of 128
    assert check_gptq([down], tp=4).loads  # 384 = 3 x 128
    # tp=8: 192 inputs are 1.5 groups of 128
    assert not check_gptq([down], tp=8).loads


def _run(tmp_path, text_file, step: dict, fmt: str, vllm: str | None = None):
    from compress.pipeline import run_recipe

    export = {"format": fmt, **({"vllm": vllm} if vllm else {})}
    recipe = {"model": {"id": tiny_model_dir(tmp_path / "m"), "device": "cpu"},
              "calibration": {"corpus": text_file, "num_samples": 2, "seq_len": 32, "batch_size": 2},
              "stages": [{"name": "q", "steps": [{"algorithm": "rtn", **step}]}], "export": export}
    out = tmp_path / "out"
    run_recipe(recipe, out_dir=out, force=True, progress=False, log=lambda *_: None)
    return json.loads((out / "report.json").read_text())


def test_export_warns_and_records_what_vllm_refuses(tmp_path, text_file, caplog):
    with caplog.at_level(logging.WARNING, logger="compress.export"):
        report = _run(tmp_path, text_file, {"bits": 4, "group_size": 128, "sym": False}, "gptq")
    found = report["serving"]["vllm"]
    assert found["vllm"] == "0.26.0" and found["loads"] is False and found["refusals"]
    assert "vLLM 0.26.0 would not load this checkpoint" in caplog.text and "AutoGPTQConfig" in caplog.text


def test_export_require_refuses_and_names_the_fix(tmp_path, text_file):
    with pytest.raises(CompressError, match=r"would not load.*sym: true.*compressed-tensors"):
        _run(tmp_path, text_file, {"bits": 4, "group_size": 128, "sym": False}, "gptq", vllm="require")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_that_vllm_loads_lists_kernels(tmp_path, text_file, caplog):
    # tiny model: hidden 160 = 5 x 32, MLP 320; symmetric 4-bit g32 is a GPTQ vLLM takes
    with caplog.at_level(logging.WARNING, logger="compress.export"):
        report = _run(tmp_path, text_file, {"bits": 4, "group_size": 32, "sym": True}, "gptq", vllm="require")
    found = report["serving"]["vllm"]
    assert found["loads"] is True and not found["refusals"] and "would not load" not in caplog.text
    assert set(found["kernels"]) <= {"Machete", "Marlin"} and sum(found["kernels"].values()) == 3 * 4
    off = _run(tmp_path, text_file, {"bits": 4, "group_size": 32, "sym": False}, "gptq", vllm="off")
    assert "serving" not in off
