"""Mixed-precision GPTQ: the bit-allocation integer program, then the ``gptq_mixed`` step end to end."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from compress.errors import CompressError, RecipeError
from compress.pipeline import run_recipe
from compress.quantize.mixed import allocate_bits, average_bits, solve_allocation
from tests.tiny import TEXT, tiny_model_dir

# --------------------------------------------------------------------------- the integer program


def _brute_force(sensitivity, params, target):
    """Best feasible assignment by enumeration (tests only): (objective, avg bits) or None."""
    names = list(sensitivity)
    best = None
    for choice in itertools.product(*(sorted(sensitivity[n]) for n in names)):
        bits = dict(zip(names, choice))
        avg = average_bits(bits, params)
        if avg > target + 1e-12:
            continue
        obj = sum(sensitivity[n][b] for n, b in bits.items())
        if best is None or obj < best[0]:
            best = (obj, avg)
    return best


def _instance(seed, n_layers=5, candidates=(2, 4, 8), monotone=True):
    rng = np.random.default_rng(seed)
    sens, params = {}, {}
    for i in range(n_layers):
        cands = candidates if seed % 3 else rng.choice([2, 3, 4, 8], size=3, replace=False).tolist()
        base = rng.uniform(0.01, 5.0)
        sens[f"l{i}"] = {int(b): (base * 2.0 ** -b if monotone else float(rng.normal())) for b in cands}
        params[f"l{i}"] = int(rng.integers(50, 5000))
    return sens, params


@pytest.mark.parametrize("seed", range(8))
def test_allocation_matches_brute_force(seed):
    sens, params = _instance(seed, monotone=seed % 2 == 0)
    lo = average_bits({n: min(c) for n, c in sens.items()}, params)
    hi = average_bits({n: max(c) for n, c in sens.items()}, params)
    targets = [lo, lo + 0.3 * (hi - lo), (lo + hi) / 2, lo + 0.8 * (hi - lo)]
    if seed % 2 == 0:  # the "target >= largest" rule gives all-largest, optimal when more bits never hurt
        targets.append(hi)
    for target in targets:
        alloc = solve_allocation(sens, params, target)
        best_obj, _ = _brute_force(sens, params, target)
        assert alloc.avg_bits <= target + 1e-9
        assert alloc.objective == pytest.approx(best_obj, rel=1e-9, abs=1e-12)
        assert alloc.objective == pytest.approx(sum(sens[n][b] for n, b in alloc.bits.items()))
        assert alloc.avg_bits == pytest.approx(average_bits(alloc.bits, params))
        assert allocate_bits(sens, params, target) == alloc.bits
        assert all(alloc.bits[n] in sens[n] for n in sens)


def test_higher_budget_never_increases_the_objective():
    sens, params = _instance(4, n_layers=12, candidates=(2, 3, 4, 8))
    previous = math.inf
    for target in np.linspace(2.0, 8.0, 25):
        alloc = solve_allocation(sens, params, float(target))
        assert alloc.avg_bits <= target + 1e-9
        assert alloc.objective <= previous + 1e-12
        previous = alloc.objective


def test_target_at_or_above_the_largest_gives_every_layer_the_largest():
    sens, params = _instance(1, candidates=(3, 4))
    for target in (4.0, 6.5):
        alloc = solve_allocation(sens, params, target)
        assert set(alloc.bits.values()) == {4} and alloc.avg_bits == 4.0


def test_infeasible_target_names_the_minimum():
    sens = {"a": {3: 1.0, 4: 0.5}, "b": {2: 2.0, 8: 0.1}}
    params = {"a": 100, "b": 300}  # minimum average: (100*3 + 300*2) / 400 = 2.25
    with pytest.raises(CompressError, match=r"minimum achievable average is 2\.25 bits"):
        allocate_bits(sens, params, 2.2)
    assert allocate_bits(sens, params, 2.25) == {"a": 3, "b": 2}  # exactly the minimum is feasible


def test_bad_inputs_are_clear_errors():
    with pytest.raises(CompressError, match="different layers"):
        allocate_bits({"a": {4: 0.0}}, {"b": 10}, 4.0)
    with pytest.raises(CompressError, match="non-finite sensitivity"):
        allocate_bits({"a": {4: float("nan")}}, {"a": 10}, 4.0)


# --------------------------------------------------------------------------- the recipe step


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    corpus = root / "corpus.txt"
    corpus.write_text(TEXT)
    return tiny_model_dir(root / "m", "llama"), str(corpus)


def _run(tiny, **step):
    model_dir, corpus = tiny
    recipe = {"model": {"id": model_dir, "device": "cpu"},
              "calibration": {"corpus": corpus, "num_samples": 4, "seq_len": 32, "seed": 0, "batch_size": 2},
              "stages": [{"name": "quantize", "steps": [{"group_size": 32, **step}]}]}
    return run_recipe(recipe, progress=False, log=lambda *_: None)


def _check_run(res, target, n_modules):
    step = res.report["stages"][0]["steps"][0]
    summary, modules = step["summary"], step["modules"]
    quant = res.state.quant
    assert summary["achieved_avg_bits"] <= target + 1e-9
    assert set(quant) == set(modules) and len(modules) == n_modules  # 7 linears per block
    sizes = {n: res.model.get_submodule(n).weight.numel() for n in modules}
    avg = sum(sizes[n] * quant[n].spec.bits for n in quant) / sum(sizes.values())
    assert avg == pytest.approx(summary["achieved_avg_bits"])
    for name, q in quant.items():
        assert q.spec.bits == modules[name]["bits"] and q.spec.group_size == 32
        assert q.qweight.dtype == torch.uint8 and int(q.qweight.max()) <= 2 ** q.spec.bits - 1
        # The module holds exactly the dequantized levels that an export packs.
        torch.testing.assert_close(res.model.get_submodule(name).weight.data, q.dequantize())
    assert sum(summary["bits_histogram"].values()) == n_modules
    return summary, modules


def test_gptq_mixed_loss_sensitivity_end_to_end(tiny):
    # Blocks 0 and 1 (block 2 is only replayed): 14 modules, in 8 fused units.
    res = _run(tiny, algorithm="gptq_mixed", candidate_bits=[3, 4], target_bits=3.5, sensitivity="loss",
               targets=["model.layers.0.*", "model.layers.1.*"])
    summary, modules = _check_run(res, 3.5, n_modules=14)
    assert set(summary["bits_histogram"]) == {"3", "4"}
    assert summary["bits_histogram"]["3"] > 0 and summary["bits_histogram"]["4"] > 0  # a real mix at 3.5
    assert summary["units"] == 8 and summary["probe_forward_passes"] == 8 * 2 + 1  # qkv, o, gate+up, down
    assert summary["nll_float"] > 0 and summary["probe_windows"] == 4
    for block in range(2):  # fused projections share one width
        p = f"model.layers.{block}."
        assert len({modules[p + f"self_attn.{x}_proj"]["bits"] for x in "qkv"}) == 1
        assert modules[p + "mlp.gate_proj"]["bits"] == modules[p + "mlp.up_proj"]["bits"]
        assert modules[p + "self_attn.q_proj"]["unit"] == p + "self_attn.{q_proj,k_proj,v_proj}"


def test_gptq_mixed_layer_error_sensitivity_per_module(tiny):
    # One block keeps the test quick (3 GPTQ solves per module in the probe).
    res = _run(tiny, algorithm="gptq_mixed", candidate_bits=[2, 4, 8], target_bits=4.0,
               sensitivity="layer_error", tie_fused=False, targets=["model.layers.1.*"])
    summary, modules = _check_run(res, 4.0, n_modules=7)
    assert summary["units"] == 7 and "probe_forward_passes" not in summary
    for m in modules.values():  # the layer error falls with the width
        s = m["sensitivity"]
        assert s["2"] > s["4"] > s["8"] >= 0 and s == m["probe_layer_error"]


def test_loss_probe_leaves_weights_untouched(tiny):
    # One candidate: the allocation is forced, so the result must equal plain GPTQ bit for bit,
    # which it only does if the probe passes restored every weight they swapped.
    block = ["model.layers.2.*"]
    mixed = _run(tiny, algorithm="gptq_mixed", candidate_bits=[8], target_bits=8.0, sensitivity="loss", targets=block)
    plain = _run(tiny, algorithm="gptq", bits=8, targets=block)
    for (name, a), b in zip(mixed.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(a, b), name


def test_bad_target_bits_is_a_validation_error_naming_it(tiny):
    with pytest.raises(RecipeError, match=r"steps\[0\]\.target_bits: target_bits=1 is outside the range of "
                                          r"candidate_bits \[3, 4\]"):
        _run(tiny, algorithm="gptq_mixed", candidate_bits=[4, 3], target_bits=1.0)
