"""bench/quant_quality.py's option methods: each name becomes the recipe steps it says, and a bad name is refused."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from quant_quality import _option_steps  # noqa: E402

from compress.recipe import validate_recipe  # noqa: E402


@pytest.mark.parametrize("method, steps", [
    ("gptq", [{"algorithm": "gptq", "bits": 3, "group_size": 128}]),
    ("rtn+mse", [{"algorithm": "rtn", "bits": 3, "group_size": 128, "grid": "mse"}]),
    ("rotate+gptq+mse+gptaq+act", [{"algorithm": "rotate"}, {"algorithm": "gptq", "bits": 3, "group_size": 128,
                                                               "grid": "mse", "asymmetric": True, "act_order": True}]),
])
def test_option_names_become_valid_recipe_steps(method, steps):
    got = _option_steps(method, 3, 128)
    assert got == steps
    validate_recipe({"version": 1, "model": {"id": "smollm2-135m"}, "stages": [{"name": "q", "steps": got}]})


@pytest.mark.parametrize("method", ["gptq+rtn", "mse", "rtn+act", "gptq+fast"])
def test_bad_option_names_are_refused(method):
    with pytest.raises(SystemExit, match="unknown option method"):
        _option_steps(method, 3, 128)
