"""The coverage table's exports loaded by the stacks that serve them (transformers via optimum +
gptqmodel, GPTQModel itself, transformers via compressed-tensors), each to our loader's logits within
the precision its kernel computes in. Runs tests/coverage_interop_probe.py in a process of its own
(GPTQModel and defuser patch transformers' classes for the whole process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_archs import COVERAGE_ARCHS

pytest.importorskip("optimum")
pytest.importorskip("gptqmodel")
pytest.importorskip("compressed_tensors")

pytestmark = [pytest.mark.interop, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
# GPTQModel 7.6 splits Phi-3's gate_up_proj into gate_proj / up_proj and looks for those names; the
# checkpoint keeps the model's own fused linear, which transformers and vLLM load.
REFUSED = {("phi3", "gptqmodel:gptq"): "mlp.gate_proj.qweight"}
# transformers + gptqmodel pick TorchAtenLinear on the CPU: bfloat16 activations and scales
# (test_interop.py); GPTQModel.load with BACKEND.TORCH and compressed-tensors run in float16.
TOLERANCE = {"transformers:gptq": 1.5e-2, "gptqmodel:gptq": 3e-3, "transformers:compressed-tensors": 3e-3}


@pytest.fixture(scope="module")
def loaded():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tests.coverage_interop_probe", *COVERAGE_ARCHS], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1100)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("loader", list(TOLERANCE))
@pytest.mark.parametrize("arch", COVERAGE_ARCHS)
def test_serving_loaders_read_the_export(arch, loader, loaded):
    got = loaded[arch][loader]
    if (arch, loader) in REFUSED:
        assert REFUSED[arch, loader] in got.get("error", ""), got
        return
    assert "error" not in got, got
    assert got["rel"] <= TOLERANCE[loader], (arch, loader, got)
