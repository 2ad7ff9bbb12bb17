"""Fast decoding (static caches, compiled steps), int4 linears, draft-bench and eval --speed on tiny models."""
import copy
import functools
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from compress.algorithms import ALGORITHMS, StepContext
from compress.cli import main
from compress.draft import speculative_generate, target_generate
from compress.draft.fast import (FastDecoder, cache_len_for, decoder_pair, fast_speculative_generate,
                                 fast_target_generate, make_static_cache)
from compress.quantize.int4 import Int4Linear, int4_linears_from_gptq, quantize_int4_
from compress.draft.standalone import nominal_bandwidth_gbs, weight_bytes
from compress.errors import CompressError
from compress.export import write_export
from compress.models import load_model
from compress.prune.shrink import Keep, remove_units
from compress.quantize.grid import QuantSpec
from compress.quantize.solvers import rtn_solve
from tests.tiny import TEXT, TINY_ARCHS, byte_tokenizer, tiny_config, tiny_model, tiny_model_dir

NEW = 32
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sharpen(model):
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # confident head: argmax is stable against float noise
    return model


def _perturbed(target, scale=0.001, seed=1):
    drafter = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in drafter.named_parameters():
            if "lm_head" not in name:
                prm.add_(torch.randn(prm.shape, generator=gen) * scale)
    return drafter


@functools.lru_cache(maxsize=None)
def _pair(arch: str):
    """Target and a slightly perturbed drafter: partial agreement (as in test_draft.py)."""
    target = _sharpen(tiny_model(arch))
    return target, _perturbed(target)


def _prompts():
    tok = byte_tokenizer()
    return [tok(TEXT[:40])["input_ids"], tok(TEXT[150:170])["input_ids"]]


def _exact_decoders(target, drafter, gamma, **kw):
    # cache sized to exactly the longest prompt + NEW: the loops must never write past it
    return decoder_pair(target, drafter, cache_len_for([len(p) for p in _prompts()], NEW, multiple=1), gamma, **kw)


# ----------------------------------------------------------------------------- fast decoding


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_static_cache_greedy_is_token_identical_and_counts_match_the_reference_loop(arch):
    target, drafter = _pair(arch)
    t, d = _exact_decoders(target, drafter, gamma=6)
    assert t.static and d.static
    for prompt in _prompts():
        want = target_generate(target, prompt, NEW).tokens.tolist()
        assert fast_target_generate(t, prompt, NEW).tokens.tolist() == want
        for gamma in (1, 3, 6):
            for threshold in (None, 0.8):
                kw = dict(max_new_tokens=NEW, gamma=gamma, confidence_threshold=threshold)
                ref = speculative_generate(target, drafter, prompt, **kw)
                got = fast_speculative_generate(t, d, prompt, **kw)
                assert got.tokens.tolist() == want, (gamma, threshold)
                assert (got.target_calls, got.drafter_calls, got.drafted, got.accepted) == (
                    ref.target_calls, ref.drafter_calls, ref.drafted, ref.accepted)
    assert 0 < t.stats["step1"][0] and t.seconds > 0


def test_static_cache_sampling_follows_the_reference_loop():
    target, drafter = _pair("qwen2")
    t, d = _exact_decoders(target, drafter, gamma=3)
    kw = dict(max_new_tokens=NEW, gamma=3, mode="sample", temperature=1.5, top_p=0.9, seed=7)
    for prompt in _prompts():
        ref = speculative_generate(target, drafter, prompt, **kw)
        got = fast_speculative_generate(t, d, prompt, **kw)
        assert got.tokens.tolist() == ref.tokens.tolist() and got.accepted == ref.accepted


def test_pruned_model_gets_per_layer_kv_shapes_in_the_static_cache():
    """Adaptive pruning leaves layers with different KV head counts: the static cache allocates
    each layer from its first keys (not from the config), so it is used, and decoding is exact."""
    for arch in TINY_ARCHS:
        target = _sharpen(tiny_model(arch))
        remove_units(target, [Keep(torch.tensor([1]), torch.arange(0, 320, 2)), Keep(torch.arange(2), torch.arange(96)),
                              Keep(torch.tensor([0]), torch.arange(320))])
        assert target.config.pruned_layers[0]["num_key_value_heads"] == 1
        drafter = _perturbed(target)
        t, d = _exact_decoders(target, drafter, gamma=4)
        prompt = _prompts()[0]
        want = target_generate(target, prompt, NEW).tokens.tolist()
        assert fast_target_generate(t, prompt, NEW).tokens.tolist() == want
        assert t.static and t.kv_heads() == [1, 2, 1]
        assert fast_speculative_generate(t, d, prompt, max_new_tokens=NEW, gamma=4).tokens.tolist() == want


def test_sliding_window_models_fall_back_to_a_dynamic_cache(caplog):
    cfg = tiny_config("qwen2")
    cfg.use_sliding_window, cfg.sliding_window, cfg.max_window_layers = True, 16, 0
    cfg.layer_types = ["sliding_attention"] * cfg.num_hidden_layers
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = _sharpen(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())
    cache, why = make_static_cache(model, 64)
    assert cache is None and "StaticSlidingWindowLayer" in why
    with caplog.at_level(logging.INFO, logger="compress.draft.fast"):
        dec = FastDecoder(model, 128)
    assert not dec.static and "using DynamicCache" in caplog.text
    prompt = _prompts()[1]
    assert fast_target_generate(dec, prompt, NEW).tokens.tolist() == target_generate(model, prompt, NEW).tokens.tolist()


def test_decoder_rewind_and_bad_calls():
    target, _ = _pair("llama")
    dec = FastDecoder(target, 16)
    first = dec(torch.arange(10), 1)
    dec(torch.arange(3), 1)
    dec.rewind(10)  # forget the 3 tokens: same logits as feeding the 11th token after the 10 first
    again = dec(torch.tensor([7]), 1)
    dec.reset()
    fresh = dec(torch.cat([torch.arange(10), torch.tensor([7])]), 2)
    torch.testing.assert_close(again[0], fresh[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first[0], fresh[0], rtol=1e-4, atol=1e-4)
    with torch.inference_mode():  # a caller's inference mode does not make the cache un-rewindable
        dec.reset()
        inside = dec(torch.arange(10), 1)
    dec.rewind(5)
    torch.testing.assert_close(inside, first)
    with pytest.raises(CompressError, match="exceed the cache of 16"):
        dec(torch.arange(12), 1)
    with pytest.raises(CompressError, match="keep"):
        dec(torch.arange(2), 3)
    with pytest.raises(CompressError, match="gamma"):
        fast_speculative_generate(dec, dec, [1, 2], max_new_tokens=4, gamma=0)


def test_compiled_steps_trace_once_and_stay_exact():
    """torch.compile of the decode steps (dynamo with the eager backend: the CPU-checkable part of
    the CUDA-graph path): warm-up compiles the step shapes, decoding compiles nothing new, and
    other shapes (shorter verifications) run eagerly on the same static cache."""
    from torch._dynamo.utils import counters

    target, drafter = _pair("llama")
    t, d = _exact_decoders(target, drafter, gamma=2, compile=True, compile_backend="eager")
    assert t.step_shapes == {(1, 1), (3, 3)} and d.step_shapes == {(1, 1), (2, 1)}
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    prompt = _prompts()[0]
    want = target_generate(target, prompt, NEW).tokens.tolist()
    assert fast_target_generate(t, prompt, NEW).tokens.tolist() == want
    assert fast_speculative_generate(t, d, prompt, max_new_tokens=NEW, gamma=2).tokens.tolist() == want
    assert t.stats["step3"][0] > 0
    # confidence-stopped drafting verifies shorter drafts: shape (2, 2), not compiled, run eagerly
    t.clear_stats()
    stopped = fast_speculative_generate(t, d, prompt, max_new_tokens=NEW, gamma=2, confidence_threshold=0.8)
    assert stopped.tokens.tolist() == want and t.eager_steps >= 1
    assert counters["stats"]["unique_graphs"] == graphs
    # compiled for every verify length, the same stopped rounds run no step eagerly
    t2, d2 = _exact_decoders(target, drafter, gamma=2, compile=True, compile_backend="eager", verify_lengths=(1, 2, 3))
    assert t2.step_shapes == {(1, 1), (2, 2), (3, 3)}
    again = fast_speculative_generate(t2, d2, prompt, max_new_tokens=NEW, gamma=2, confidence_threshold=0.8)
    assert again.tokens.tolist() == want and t2.eager_steps == 0 and d2.eager_steps == 0


# ----------------------------------------------------------------------------- int4


@pytest.mark.parametrize("shape,group_size", [((80, 160), 32), ((320, 160), 128), ((40, 96), 32),
                                              ((160, 320), -1), ((64, 128), 64)])
def test_int4_linear_equals_the_dequantized_linear(shape, group_size):
    torch.manual_seed(0)
    lin = torch.nn.Linear(shape[1], shape[0])
    res = rtn_solve(lin.weight.detach(), QuantSpec(4, group_size, sym=False))
    x = torch.randn(2, 5, shape[1])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        m = Int4Linear.from_levels(res.qweight, res.scales, res.zeros, res.g_idx, group_size, lin.bias,
                                   device="cpu", dtype=dtype)
        ref = (x.to(dtype).float() @ res.dequantize().T + lin.bias.detach()).to(dtype).float()
        got = m(x.to(dtype))
        assert got.dtype == dtype and got.shape == (2, 5, shape[0])
        assert (got.float() - ref).abs().max() <= tol * ref.abs().max()


def test_int4_refuses_a_permuted_g_idx():
    res = rtn_solve(torch.randn(32, 64), QuantSpec(4, 32))
    g_idx = res.g_idx[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    with pytest.raises(CompressError, match="act-order"):
        Int4Linear.from_levels(res.qweight, res.scales, res.zeros, g_idx, 32, device="cpu", dtype=torch.float32)


def _gptq_export(path, arch="llama", seed=0, sharpen=False):
    """A tiny model, rtn W4 g32 asym, exported as format gptq (with the byte tokenizer)."""
    model = tiny_model(arch, seed)
    if sharpen:
        _sharpen(model)
    tok = byte_tokenizer()
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    ctx = StepContext(tokenizer=tok, device="cpu", progress=False)
    ALGORITHMS["rtn"].apply(model, ALGORITHMS["rtn"].config(algorithm="rtn", bits=4, group_size=32, sym=False), ctx)
    write_export(model, tok, path, spec=SimpleNamespace(format="gptq", dtype=None), recipe_yaml="version: 1\n",
                 report={}, state=ctx.state)
    return str(path), model, ctx.state


def test_int4_from_a_gptq_export_and_from_artifacts_keeps_the_logits(tmp_path):
    path, model, state = _gptq_export(tmp_path / "q")
    ids = torch.tensor([list(b"The quick brown fox jumps over")])
    loaded = load_model(path).model
    with torch.no_grad():
        want = loaded(ids).logits
    before = weight_bytes(loaded)
    report = int4_linears_from_gptq(loaded, path)
    assert len(report["converted"]) == 21 and not report["kept_float"]
    assert isinstance(loaded.model.layers[0].self_attn.k_proj, Int4Linear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-4)
    after = weight_bytes(loaded)
    assert after["int4_linears"] == 21 and after["weight_bytes"] < before["weight_bytes"]
    # in-memory quantize results (float32 scales) give the in-memory fake-quantized model
    with torch.no_grad():
        want = model(ids).logits
    int4_linears_from_gptq(model, state.quant)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(CompressError, match="no packed linear|no \\*.safetensors"):
        int4_linears_from_gptq(tiny_model(), tiny_model_dir(tmp_path / "float"))


def test_quantize_int4_and_a_bf16_tiny_model():
    model = tiny_model("qwen2").to(torch.bfloat16)
    ids = torch.tensor([list(b"Calibration data should")])
    ref = copy.deepcopy(model)
    with torch.no_grad():  # the same RTN grid, dequantized into bf16 float linears
        for name, m in ref.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                m.weight.copy_(rtn_solve(m.weight.float(), QuantSpec(4, 128)).dequantize().to(torch.bfloat16))
        want = ref(ids).logits.float()
    assert len(quantize_int4_(model, 128)["converted"]) == 21
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8


# ----------------------------------------------------------------------------- draft-bench / eval --speed


def test_cli_draft_bench_writes_json_and_plot(tmp_path, capsys):
    target = tiny_model_dir(tmp_path / "t", "qwen2", seed=0)
    drafter, _, _ = _gptq_export(tmp_path / "d", "qwen2", seed=0)  # the target, W4: high agreement
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    out = tmp_path / "bench"
    args = ["draft-bench", "--target", target, "--drafter", drafter, "--prompts", str(prompts), "--gamma", "3",
            "--max-new-tokens", "12", "--device", "cpu", "--out", str(out)]
    assert main([*args, "--int4-drafter"]) == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("alpha", "greedy_agreement", "c", "speedup", "predicted_speedup", "identical"):
        assert key in res
    assert res["speculative"]["tau"] > 1 and res["target_alone"]["tokens_per_s"] > 0 and res["c"] > 0
    assert res["int4_drafter"]["linears"] == 21
    assert res["decoders"] == {"target": "EngineDecoder", "drafter": "FastDecoder"}  # int4 linears: own forward
    assert res["identical"] and res["prompts"] == 2
    assert json.loads((out / "draft_bench.json").read_text())["speedup"] == res["speedup"]
    assert (out / "draft_bench.png").stat().st_size > 1000
    # confidence-stopped drafting: a top-1 probability is always < 1, so every round drafts one token
    assert main([*args[:-2], "--confidence-threshold", "1.0"]) == 0
    stopped = json.loads(capsys.readouterr().out)
    assert stopped["confidence_threshold"] == 1.0 and stopped["identical"]
    assert stopped["speculative"]["drafted"][1:] == [0, 0] and stopped["speculative"]["drafted"][0] > 0
    # repeats: each prompt timed 3 times, the median run kept; the counts are one run's, not three
    assert main([*args[:-2], "--repeats", "3"]) == 0
    repeated = json.loads(capsys.readouterr().out)
    assert repeated["repeats"] == 3 and repeated["identical"]
    assert repeated["speculative"]["target_calls"] == res["speculative"]["target_calls"]
    assert main([*args[:-2], "--repeats", "0"]) == 2
    assert "repeats" in capsys.readouterr().err
    assert main([*args[:-2], "--gamma", "0"]) == 2
    assert "gamma" in capsys.readouterr().err
    assert main(["draft-bench", "--target", target, "--drafter", target, "--prompts", str(prompts),
                 "--device", "cpu", "--int4-drafter"]) == 2  # a float model is no gptq export
    assert "gptq export" in capsys.readouterr().err


def test_cli_eval_speed_reports_bytes_memory_speed_and_roofline(tmp_path, capsys):
    path, _, _ = _gptq_export(tmp_path / "q")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    base = ["eval", path, "--text", str(text), "--seq-len", "32", "--max-windows", "2", "--device", "cpu",
            "--speed", "--new-tokens", "8", "--bandwidth-gbs", "100"]
    assert main(base) == 0
    dense = json.loads(capsys.readouterr().out)
    assert main([*base, "--int4"]) == 0
    packed = json.loads(capsys.readouterr().out)
    for r in (dense, packed):
        assert r["decode"]["decode_tokens_per_s"] > 0 and r["peak_memory_bytes"] > 0 and r["perplexity"] > 1
        assert r["roofline"]["tokens_per_s"] == pytest.approx(100e9 / r["weight_bytes_per_token"])
    assert packed["int4_linears"] == 21 and packed["weight_bytes"] < 0.6 * dense["weight_bytes"]
    assert packed["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-3)


def test_nominal_bandwidths():
    assert nominal_bandwidth_gbs("NVIDIA H200") == 4800
    assert nominal_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert nominal_bandwidth_gbs("NVIDIA H100 PCIe") == 2000
    assert nominal_bandwidth_gbs("cpu") is None


# ----------------------------------------------------------------------------- GPU (the lead runs these)


@pytest.mark.gpu
@cuda
def test_gpu_int4_kernel_equals_the_dequantized_linear():
    torch.manual_seed(0)
    for (n, k), gs in (((80, 160), 32), ((1536, 1536), 128), ((8960 // 2, 1536), 128), ((1536, 4480), 128)):
        lin = torch.nn.Linear(k, n, bias=False)
        res = rtn_solve(lin.weight.detach(), QuantSpec(4, gs, sym=False))
        m = Int4Linear.from_levels(res.qweight, res.scales, res.zeros, res.g_idx, gs, device="cuda",
                                   dtype=torch.bfloat16)
        x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ res.dequantize().cuda().T
        assert (m(x).float() - ref).abs().max() <= 3e-2 * ref.abs().max()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("graphs", ["manual", "trees"])
def test_gpu_compiled_cuda_graph_decoding_is_exact(graphs):
    target, drafter = (copy.deepcopy(m).cuda() for m in _pair("llama"))
    t, d = _exact_decoders(target, drafter, gamma=4, compile=True, graphs=graphs)
    assert t.cudagraphs and d.cudagraphs
    for prompt in _prompts():
        want = target_generate(target, prompt, NEW).tokens.tolist()
        assert fast_target_generate(t, prompt, NEW).tokens.tolist() == want
        assert fast_speculative_generate(t, d, prompt, max_new_tokens=NEW, gamma=4).tokens.tolist() == want
    # a capture that failed would have fallen back silently to the ungraphed compiled step
    assert t.graph_mode == d.graph_mode == graphs, (t.graph_error, d.graph_error)
    if graphs == "manual":
        assert set(t._graphs) == {(1, 1), (5, 5)} and set(d._graphs) == {(1, 1), (2, 1)}


def test_manual_graphs_need_cuda_compile_and_a_static_cache():
    target, _ = _pair("llama")
    with pytest.raises(CompressError, match="graphs='manual' needs"):
        FastDecoder(target, 64, compile=True, graphs="manual")
    with pytest.raises(CompressError, match="graphs must be"):
        FastDecoder(target, 64, graphs="cuda")
    assert FastDecoder(target, 64, compile=True, compile_backend="eager").graph_mode is None  # CPU


@pytest.mark.gpu
@cuda
def test_gpu_cli_draft_bench_compiled_int4(tmp_path, capsys):
    target = tiny_model_dir(tmp_path / "t", "llama", seed=0)
    drafter, _, _ = _gptq_export(tmp_path / "d", "llama", seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    assert main(["draft-bench", "--target", target, "--drafter", drafter, "--prompts", str(prompts),
                 "--gamma", "3", "--max-new-tokens", "16", "--device", "cuda", "--dtype", "bfloat16",
                 "--int4-drafter", "--compile", "--hf-baseline", "--out", str(tmp_path / "b")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["int4_drafter"]["linears"] == 21 and res["speculative"]["tau"] > 1
    assert res["hf_static_generate"]["tokens_per_s"] > 0


def test_median_run_keeps_the_median_and_refuses_runs_that_differ():
    from compress.draft.bench import median_run
    from compress.errors import CompressError
    walls = iter([3.0, 1.0, 2.0, 9.0, 0.5])
    run = lambda: SimpleNamespace(wall_time_s=next(walls), tokens=torch.tensor([1, 2]))  # noqa: E731
    assert median_run(run, 3).wall_time_s == 2.0
    assert median_run(run, 2).wall_time_s == 0.5  # of two, the faster
    tokens = iter([[1, 2], [1, 3]])
    with pytest.raises(CompressError, match="different tokens"):
        median_run(lambda: SimpleNamespace(wall_time_s=1.0, tokens=torch.tensor(next(tokens))), 2)
    with pytest.raises(CompressError, match="repeats"):
        median_run(run, 0)
