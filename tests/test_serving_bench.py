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


def _fake_wheel(folder, name, version, requires):
    import zipfile

    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires) + "\n"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_wheel_walk_follows_an_extra_asked_for_after_the_package_was_carried(tmp_path, monkeypatch):
    # mistral-common asks for pydantic-extra-types[pycountry] after fastapi carried it without the extra:
    # the GPU machine then lacked pycountry and vLLM did not start (the first H200 window).
    pytest.importorskip("packaging")
    import vllm_wheels as vw

    index = {"vllm": ("1.0", ["fastapi", "mistral-common"]), "fastapi": ("1.0", ["extra-types>=1"]),
             "mistral-common": ("1.0", ["extra-types[country]>=1"]),
             "extra-types": ("1.0", ['country-data>=2; extra == "country"']), "country-data": ("2.0", [])}

    def download(spec, dest):
        from packaging.requirements import Requirement

        name = Requirement(spec).name
        version, requires = index[name]
        dest.mkdir(parents=True, exist_ok=True)
        return _fake_wheel(dest, name, version, requires)

    monkeypatch.setattr(vw, "download", download)
    monkeypatch.setattr(vw, "image_packages", lambda: {})
    monkeypatch.setattr(vw, "pins", lambda: {})
    report = vw.resolve("1.0", tmp_path / "out")
    assert set(report["carried"]) == {"vllm", "fastapi", "mistral-common", "extra-types", "country-data"}
    assert report["carried"]["country-data"]["required_by"] == "extra-types==1.0"


def test_compare_with_bf16_gives_ratios_and_divergence_from_the_bf16_tokens():
    from serving_vllm import compare_with_bf16

    models = {"bf16": {"speed": {"batch1_tok_s": 100.0, "batch32_tok_s": 1000.0},
                       "greedy": {"vllm_tokens": [[1, 2, 3], [4, 5]]}},
              "w4": {"speed": {"batch1_tok_s": 50.0, "batch32_tok_s": 1500.0},
                     "greedy": {"vllm_tokens": [[1, 2, 9], [4, 5]]}},
              "refused": {"loads": False}}
    compare_with_bf16(models)
    assert models["w4"]["speed"]["vs_bf16"] == {"batch1_tok_s": 0.5, "batch32_tok_s": 1.5}
    assert models["w4"]["greedy"]["vs_bf16_vllm"] == {"first_divergence": [2, None], "identical": 1}
    assert "vs_bf16_vllm" not in models["bf16"]["greedy"] and "speed" not in models["refused"]


def test_refusal_one_line_names_the_reason():
    from serving_vllm import _one_line

    refusal = {"type": "ValidationError", "message": "1 validation error for VllmConfig\n  Value error, "
               "Unsupported quantization config: bits=3, sym=False [type=value_error]"}
    assert _one_line(refusal) == ("ValidationError: Value error, Unsupported quantization config: bits=3, sym=False "
                                  "[type=value_error]")
    assert _one_line({"type": "RuntimeError", "message": "CUDA out of memory"}) == "RuntimeError: CUDA out of memory"


def test_kernel_log_keeps_kernel_lines_not_the_config_dump():
    import logging

    from serving_vllm import _KernelLog

    log = _KernelLog()
    for msg in ["Initializing a V1 LLM engine with config: ... padding=None ...",
                "Using MarlinLinearKernel for AutoGPTQLinearMethod", "Loading weights took 0.1 s"]:
        log.emit(logging.LogRecord("vllm", logging.INFO, __file__, 1, msg, None, None))
    assert log.lines == ["Using MarlinLinearKernel for AutoGPTQLinearMethod"]
