"""The coverage table (README, "Architectures"): every architecture of tests/tiny_archs.py runs GPTQ
through the layer-wise runner, exports in every format, and reloads with our loader to the logits
of the model the run left (to the precision each format stores).

One GPTQ run per architecture (a module fixture); each format is exported from its state. What
serving stacks load of these exports: tests/test_coverage_interop.py.
"""
from __future__ import annotations

import pytest
import torch

from compress.export import write_export
from compress.models import load_model
from compress.pipeline import run_recipe
from compress.recipe import ExportSpec
from tests.tiny import TEXT
from tests.tiny_archs import COVERAGE_ARCHS, MOE_ARCHS, arch_model_dir

FORMATS = ("gptq", "compressed-tensors", "hf")
QUANT = {"algorithm": "gptq", "bits": 4, "group_size": 32, "sym": True, "targets": ["Linear"], "ignore": ["lm_head"]}
IDS = torch.tensor([list(b"The quick brown fox jumps over the lazy dog.")])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


_RUNS: dict = {}


@pytest.fixture
def quantized(request, corpus, tmp_path_factory):
    """(run result, gptq export folder) of the test's architecture, made once per module."""
    arch = request.node.callspec.params["arch"]
    if arch not in _RUNS:
        model_dir = arch_model_dir(tmp_path_factory.mktemp(arch), arch)
        recipe = {"model": {"id": model_dir, "device": "cpu"}, "stages": [{"name": "q", "steps": [QUANT]}],
                  "calibration": {"corpus": corpus, "num_samples": 4, "seq_len": 32, "seed": 0, "batch_size": 2},
                  "export": {"format": "gptq"}}
        out = tmp_path_factory.mktemp(f"{arch}-out") / "gptq"
        _RUNS[arch] = (run_recipe(recipe, out_dir=out, progress=False, log=lambda *_: None), out)
    return _RUNS[arch]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", COVERAGE_ARCHS)
def test_gptq_exports_and_reloads(arch, fmt, quantized, tmp_path):
    run, out = quantized
    step = run.report["stages"][0]["steps"][0]
    assert step["summary"]["gptq_over_rtn"] < 1  # GPTQ did its job on every architecture
    if fmt != "gptq":
        out = write_export(run.model, run.tokenizer, tmp_path / fmt, spec=ExportSpec(format=fmt),
                           recipe_yaml=run.recipe.to_yaml(), report={}, state=run.state)
    again = load_model(str(out)).model
    if fmt == "hf":
        torch.testing.assert_close(_logits(again), _logits(run.model))
    else:  # packed ints with float16 scales and a float16 rest
        torch.testing.assert_close(_logits(again), _logits(run.model), rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_every_expert_is_quantized_and_its_tokens_reported(arch, quantized):
    run, _ = quantized
    step = run.report["stages"][0]["steps"][0]
    experts = [n for n in step["modules"] if ".mlp.experts." in n]
    assert len(experts) == 2 * 4 * 3  # 2 blocks x 4 experts x gate, up, down: one solve each
    assert not any("gate." in n or n.endswith("shared_expert_gate") for n in step["modules"])  # routers stay float
    tokens = 4 * 32 * 2  # calibration tokens x experts per token
    for name, seen in step["experts"].items():
        assert sum(seen["routed_tokens"]) == tokens and seen["routing"] == "routed"
        starved = [e for e, n in enumerate(seen["routed_tokens"]) if n < seen["min_tokens"]]
        assert seen["all_token_statistics"] == starved
