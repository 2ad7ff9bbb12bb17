"""The contract every registered algorithm keeps, as a table (in the spirit of peft's case tables):
each algorithm x each tiny architecture (tests/tiny.py) x each export format its place in a recipe
allows — it runs, touches only its targets, writes a JSON-serialisable report, exports, reloads,
and the reloaded model gives the same logits (to the precision the format stores).

A new algorithm gets a row in CASES (a test below fails until it has one). Which formats a case
exports is not listed by hand: it is every format that ``compress.plan`` accepts for the case's
recipe, less the few a writer refuses for a stated reason (REFUSED, checked to raise).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

from compress.algorithms import ALGORITHMS
from compress.errors import CompressError, RecipeError
from compress.formats import FORMATS
from compress.models import load_model
from compress.pipeline import run_recipe
from compress.plan import check_plan
from compress.recipe import validate_recipe
from tests.tiny import TEXT, TINY_ARCHS, tiny_model_dir

BLOCK = "model.layers.1."  # targeted steps act on this block only
TARGETS = {"targets": [r"re:^model\.layers\.1\."]}
QUANT = {"bits": 4, "group_size": 32, "sym": True}  # group 32 divides every width; sym: GPTQ v1 stores the zeros


@dataclass(frozen=True)
class Case:
    config: dict
    before: tuple = ()  # steps the algorithm needs ahead of it (same targets)
    calibrate: bool = False
    targets: dict = field(default_factory=lambda: TARGETS)  # for a targeted algorithm; always inside BLOCK


CORPUS = "@corpus"  # replaced by the test's text file
CASES = {
    "rtn": Case(QUANT),
    "gptq": Case(QUANT, calibrate=True),
    "gptq_mixed": Case({"candidate_bits": [4, 8], "target_bits": 6.0, "group_size": 32, "sym": True,
                        "sensitivity": "layer_error"}, calibrate=True),
    "adaquant": Case({"steps": 2}, before=(("rtn", QUANT),), calibrate=True),
    # q/k/v: a qwen2 model has their biases; it cannot load a new one on o_proj or the MLP (test_refine.py)
    "bias_correction": Case({}, before=(("rtn", QUANT),), calibrate=True,
                            targets={"targets": [r"re:^model\.layers\.1\.self_attn\.[qkv]_proj$"]}),
    **{m: Case({"sparsity": 0.3, "gamma": 2.0}, calibrate=m != "magnitude")
       for m in ("nirvana", "taylor", "wanda", "magnitude")},
    "s2ft": Case({"task": "lm", "corpus": CORPUS, "steps": 2, "max_len": 32, "batch_size": 2, "mlp_ratio": 0.05}),
    "rotate": Case({"kind": "hadamard", "seed": 1}),  # untargeted; before gptq it exports packed (test_rotate.py)
    "recalibrate": Case({"method": "temperature", "corpus": CORPUS, "seq_len": 32, "max_windows": 2}),
    "self_spec": Case({"exit_layers": [1], "vocab_size": 64, "train_corpora": [CORPUS], "train_windows": 4,
                       "eval_windows": 2, "seq_len": 32, "steps": 2, "batch_size": 2, "gammas": [2]}),
}
# Combinations the plan allows but a writer refuses, each for a reason of the format's own.
REFUSED = {("gptq_mixed", "compressed-tensors"): "one scheme per export"}


def _steps(name: str, corpus: str) -> list[dict]:
    case = CASES[name]
    targets = case.targets if ALGORITHMS[name].takes_targets else {}
    config = {k: ([corpus if x == CORPUS else x for x in v] if isinstance(v, list) else corpus if v == CORPUS else v)
              for k, v in case.config.items()}
    return [{"algorithm": a, **kw, **targets} for a, kw in case.before] + [{"algorithm": name, **config, **targets}]


def _recipe(name: str, model_dir: str, corpus: str, fmt: str) -> dict:
    recipe = {"model": {"id": model_dir, "device": "cpu"}, "stages": [{"name": "s", "steps": _steps(name, corpus)}],
              "export": {"format": fmt}}
    if CASES[name].calibrate:
        recipe["calibration"] = {"corpus": corpus, "num_samples": 2, "seq_len": 32, "seed": 0, "batch_size": 2}
    return recipe


def _allowed_formats(name: str) -> list[str]:
    ok = []
    for fmt in FORMATS:
        try:
            check_plan(validate_recipe(_recipe(name, "smollm2-135m", "bbc", fmt)))
        except RecipeError:
            continue
        ok.append(fmt)
    return ok


TABLE = [(name, arch, fmt) for name in sorted(CASES) for arch in TINY_ARCHS for fmt in _allowed_formats(name)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {arch: tiny_model_dir(tmp_path_factory.mktemp(arch), arch) for arch in TINY_ARCHS}


IDS = torch.tensor([list(b"The quick brown fox jumps over the lazy dog.")])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS.to(next(model.parameters()).device)).logits.float()


def test_every_registered_algorithm_has_a_case_and_every_case_exports_somewhere():
    assert set(CASES) == set(ALGORITHMS), "add a Case for each new algorithm"
    assert {name for name, _, _ in TABLE} == set(CASES) and all(_allowed_formats(n) for n in CASES)
    assert {"hf", "gptq", "compressed-tensors"} <= {fmt for _, _, fmt in TABLE} and "self-spec" in _allowed_formats(
        "self_spec")


@pytest.mark.parametrize("name, arch, fmt", TABLE, ids=[f"{n}-{a}-{f}" for n, a, f in TABLE])
def test_contract(name, arch, fmt, model_dirs, corpus, tmp_path):
    model_dir, out = model_dirs[arch], tmp_path / "out"
    recipe = _recipe(name, model_dir, corpus, fmt)
    if (name, fmt) in REFUSED:
        with pytest.raises(CompressError, match=REFUSED[name, fmt]):
            run_recipe(recipe, out_dir=out, progress=False, log=lambda *_: None)
        return
    run = run_recipe(recipe, out_dir=out, progress=False, log=lambda *_: None)

    # It ran and reported: the report is plain JSON, as written.
    step = run.report["stages"][0]["steps"][-1]
    assert step["algorithm"] == name
    assert json.loads(json.dumps(run.report)) == json.loads((out / "report.json").read_text())

    # It touched its targets only (untargeted steps refuse targets at validation instead).
    original = dict(load_model(model_dir).model.named_parameters())
    after = dict(run.model.named_parameters())
    if ALGORITHMS[name].takes_targets:
        for key, p in original.items():
            if not key.startswith(BLOCK):
                assert key in after and torch.equal(after[key], p), f"{name} changed {key}, outside its targets"
        assert any(k not in original or after[k].shape != original[k].shape or not torch.equal(after[k], original[k])
                   for k in after if k.startswith(BLOCK)), f"{name} changed nothing in its targets"
    else:
        bad = dict(recipe, stages=[{"name": "s", "steps": [{**recipe["stages"][0]["steps"][-1], **TARGETS}]}])
        with pytest.raises(RecipeError, match="takes no targets/ignore"):
            validate_recipe(bad)

    # It exported and reloads to the same logits.
    if fmt == "self-spec":
        from compress.draft.selfspec.head import HeadAsModel
        from compress.draft.selfspec.step import load_self_spec
        head, manifest, _ = load_self_spec(out, run.model)
        trained = run.state.self_spec.heads[manifest["default"]]
        # heads are stored in bfloat16: the same logits to that precision
        torch.testing.assert_close(_logits(HeadAsModel(run.model, head)), _logits(HeadAsModel(run.model, trained)),
                                   rtol=2e-2, atol=2e-2)
        return
    again = load_model(str(out)).model
    if fmt == "hf":
        torch.testing.assert_close(_logits(again), _logits(run.model))
    else:  # packed ints with float16 scales and a float16 rest
        torch.testing.assert_close(_logits(again), _logits(run.model), rtol=5e-3, atol=5e-3)
