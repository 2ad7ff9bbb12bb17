"""What a run reports and reuses (issue 15): the summary's rows and sizes, peak CPU memory per
phase, and the float baseline cached across runs."""
import io
import os

import pytest
from rich.console import Console

import compress.pipeline
from compress.pipeline import run_recipe
from compress.summary import print_summary, quality_rows
from tests.tiny import tiny_model_dir


def _recipe(model_dir, text_file, steps, **extra):
    return {"model": {"id": model_dir, "device": "cpu"},
            "stages": [{"name": "quantize", "steps": steps}],
            "verify": {"corpus": text_file, "split": "test", "seq_len": 32, "max_windows": 3}, **extra}


def _summary(report, out_dir=None) -> str:
    buf = io.StringIO()
    print_summary(report, out_dir, console=Console(file=buf, width=200))
    return buf.getvalue()


RTN = [{"algorithm": "rtn", "bits": 4, "group_size": 32, "sym": True}]


@pytest.fixture
def count_verify(monkeypatch):
    """The verify passes a run makes, by progress-bar name (baseline, verify)."""
    calls = []
    real = compress.pipeline.verify

    def counted(*args, desc="verify", **kw):
        calls.append(desc)
        return real(*args, desc=desc, **kw)

    monkeypatch.setattr(compress.pipeline, "verify", counted)
    return calls


def test_recalibration_summary_has_float_raw_and_calibrated_rows(tmp_path, text_file):
    steps = [*RTN]
    recipe = _recipe(tiny_model_dir(tmp_path / "m"), text_file, steps)
    recipe["stages"].append({"name": "recal", "steps": [{"algorithm": "recalibrate", "method": "temperature",
                                                        "corpus": text_file, "seq_len": 32, "max_windows": 4}]})
    res = run_recipe(recipe, progress=False, log=lambda *_: None)
    v = res.report["verify"]
    rows = dict(quality_rows(res.report))
    assert list(rows) == ["float (before)", "compressed, raw", "compressed + temperature"]
    assert rows["float (before)"] is res.report["baseline"]
    assert rows["compressed, raw"]["ece"] == v["uncalibrated"]["ece"] != v["ece"]
    assert rows["compressed, raw"]["perplexity"] == v["uncalibrated"]["perplexity"]
    text = _summary(res.report)
    for label, row in rows.items():
        line = next(ln for ln in text.splitlines() if label in ln)
        assert f"{row['perplexity']:.3f}" in line and f"{row['ece']:.4f}" in line
    # report.json's keys stay, with the raw numbers where they were
    assert {"ece_before", "uncalibrated", "calibrator", "perplexity"} <= set(v)


def test_summary_shows_zero_shot_accuracy_when_measured(tmp_path, text_file):
    res = run_recipe(_recipe(tiny_model_dir(tmp_path / "m"), text_file, RTN), progress=False, log=lambda *_: None)
    report = res.report
    assert "topic acc" not in _summary(report)
    # verify.topics scores BBC articles (a real corpus); here the keys it adds are put in by hand
    report["baseline"].update(accuracy=0.41, topics_ece=0.12)
    report["verify"].update(accuracy=0.38, topics_ece=0.15)
    text = _summary(report)
    assert "topic acc" in text and "topic ECE" in text
    assert "0.4100" in next(ln for ln in text.splitlines() if "float (before)" in ln)
    assert "0.3800" in next(ln for ln in text.splitlines() if ln.lstrip("│ ").startswith("compressed"))


@pytest.mark.parametrize("fmt,packs", [("hf", False), ("gptq", True)])
def test_report_has_size_before_and_after_and_peak_cpu_memory(tmp_path, text_file, fmt, packs):
    model_dir = tiny_model_dir(tmp_path / "m")
    out = tmp_path / "out"
    res = run_recipe(_recipe(model_dir, text_file, RTN, export={"format": fmt}), out_dir=out, progress=False,
                     log=lambda *_: None)
    size = res.report["size"]
    source = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert size["before"]["disk_bytes"] == source
    assert size["after"]["disk_bytes"] == sum(p.stat().st_size for p in out.rglob("*.safetensors"))
    params = sum(p.numel() * p.element_size() for p in res.model.parameters())
    assert size["before"]["memory_bytes"] == size["after"]["memory_bytes"] >= params
    assert size["disk_ratio"] == round(source / size["after"]["disk_bytes"], 3)
    assert (size["disk_ratio"] > 2) == packs  # 4-bit packed vs float32 (hf keeps floats)
    assert set(res.report["peak_host_mb"]) == set(res.report["timings"])  # every phase, the export's too
    assert all(mb > 10 for mb in res.report["peak_host_mb"].values())
    text = _summary(res.report, out)
    assert "weights on disk" in text and f"{size['disk_ratio']:.2f}x" in text and "peak CPU MB" in text
    assert ("format hf stores the quantized weights as floats" in text) == (not packs)


def test_pruning_shrinks_the_model_in_memory(tmp_path, text_file):
    steps = [{"algorithm": "magnitude", "sparsity": 0.5}]
    res = run_recipe(_recipe(tiny_model_dir(tmp_path / "m"), text_file, steps), progress=False, log=lambda *_: None)
    size = res.report["size"]
    assert size["after"]["memory_bytes"] < size["before"]["memory_bytes"] and size["memory_ratio"] > 1


def test_float_baseline_is_cached_across_runs(tmp_path, text_file, count_verify):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = _recipe(model_dir, text_file, RTN)
    first = run_recipe(recipe, out_dir=tmp_path / "a", progress=False, log=lambda *_: None)
    assert count_verify == ["baseline", "verify"] and first.report["baseline_cache"]["hit"] is False
    count_verify.clear()
    # another bit width into another folder: the same float model, the same verify settings
    again = _recipe(model_dir, text_file, [{**RTN[0], "bits": 3}])
    second = run_recipe(again, out_dir=tmp_path / "b", progress=False, log=lambda *_: None)
    assert count_verify == ["verify"]  # the baseline was not evaluated
    assert second.report["baseline"] == first.report["baseline"] and second.report["baseline_cache"]["hit"]
    assert "verify_baseline" not in second.report["timings"]
    assert second.report["verify"]["perplexity_before"] == first.report["baseline"]["perplexity"]
    from compress.dry_run import plan_run
    from compress.recipe import validate_recipe
    assert plan_run(validate_recipe(again), out_dir=None)["verify"]["baseline"] == "cached"  # --dry-run says so
    assert plan_run(validate_recipe(again), out_dir=None, reuse_baseline=False)["verify"]["baseline"] == "evaluated"
    count_verify.clear()
    run_recipe(again, progress=False, log=lambda *_: None, reuse_baseline=False)
    assert count_verify == ["baseline", "verify"]  # asked not to reuse it


@pytest.mark.parametrize("change", ["verify", "model"])
def test_baseline_cache_misses_when_what_it_measured_changes(tmp_path, text_file, count_verify, change):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = _recipe(model_dir, text_file, RTN)
    run_recipe(recipe, progress=False, log=lambda *_: None)
    if change == "verify":
        recipe["verify"]["max_windows"] = 2
    else:  # the same folder, another model in it
        tiny_model_dir(tmp_path / "m", seed=1)
        weights = tmp_path / "m" / "model.safetensors"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    count_verify.clear()
    res = run_recipe(recipe, progress=False, log=lambda *_: None)
    assert count_verify == ["baseline", "verify"] and res.report["baseline_cache"]["hit"] is False
