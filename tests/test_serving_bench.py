"""The vLLM window's helpers that run without a GPU: first divergence of greedy tokens, and the wheel
walk's markers, image list and pins (bench/serving_vllm.py, bench/device/vllm_wheels.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "device"))

from serving_vllm import first_divergence  # noqa: E402


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early (EOS) where the other went on


def test_wheel_walk_reads_markers_image_and_pins():
    pytest.importorskip("packaging")
    from packaging.requirements import Requirement

    import vllm_wheels as vw

    assert vw.wanted(Requirement('llguidance<1.8; platform_machine == "x86_64"'), set())
    assert not vw.wanted(Requirement('zentorch==2.11.0.1; extra == "zen"'), set())
    assert vw.wanted(Requirement('zentorch==2.11.0.1; extra == "zen"'), {"zen"})
    image = vw.image_packages()
    assert image["torch"] == "2.11.0" and image["torchvision"] == "0.26.0" and "numba" in image
    assert image["numba"] is None and "pydantic" not in image  # the image lacks pydantic (gpu_wheels.txt)
    assert vw.pins()["xgrammar"] == "0.2.7"
