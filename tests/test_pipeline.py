"""Recipes end to end on tiny models: run, export atomically, reload, evaluate, CLI."""
import json

import pytest
import torch
import yaml

from compress.cli import main
from compress.errors import CompressError
from compress.models import load_model
from compress.pipeline import run_recipe
from tests.tiny import TINY_ARCHS, tiny_model_dir


def _recipe(model_dir, text_file, steps, **extra):
    return {
        "model": {"id": model_dir, "device": "cpu"},
        "calibration": {"corpus": text_file, "num_samples": 4, "seq_len": 32, "seed": 0, "batch_size": 2},
        "stages": [{"name": "quantize", "steps": steps}],
        "verify": {"corpus": text_file, "split": "test", "seq_len": 32, "max_windows": 4},
        **extra,
    }


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_gptq_recipe_runs_exports_and_reloads(tmp_path, text_file, arch):
    model_dir = tiny_model_dir(tmp_path / "m", arch)
    out = tmp_path / "out"
    res = run_recipe(_recipe(model_dir, text_file, [{"algorithm": "gptq", "bits": 4, "group_size": 32}]),
                     out_dir=out, progress=False, log=lambda *_: None)
    assert {p.name for p in out.iterdir()} >= {"compress_export.json", "config.json", "model.safetensors",
                                               "recipe.yaml", "report.json", "tokenizer.json"}
    assert not list(tmp_path.glob(".out.tmp-*"))  # the temporary folder was renamed, not left behind
    report = json.loads((out / "report.json").read_text())
    for key in ("model", "stages", "timings", "versions", "verify", "baseline", "calibration"):
        assert key in report
    assert report["calibration"]["digest"]
    step = report["stages"][0]["steps"][0]
    assert step["summary"]["gptq_over_rtn"] <= 1.0  # the GPTQ quality oracle, over the whole model
    # The resolved recipe is complete: defaults are spelled out.
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["stages"][0]["steps"][0]["damp"] == 0.01 and resolved["export"]["format"] == "hf"
    # Reload gives the same logits as the in-memory model.
    again = load_model(str(out))
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, res.model(ids).logits)
    # Only targeted modules changed: lm_head and embeddings are untouched.
    base = load_model(model_dir).model
    assert torch.equal(base.lm_head.weight, again.model.lm_head.weight)
    assert not torch.equal(base.model.layers[0].mlp.down_proj.weight, again.model.model.layers[0].mlp.down_proj.weight)


def test_rtn_recipe_needs_no_calibration_and_is_deterministic(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = _recipe(model_dir, text_file, [{"algorithm": "rtn", "bits": 3, "group_size": 32}])
    recipe.pop("calibration")
    a = run_recipe(recipe, progress=False, log=lambda *_: None)
    b = run_recipe(recipe, progress=False, log=lambda *_: None)
    assert "calibration" not in a.report
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    levels = a.state.quant["model.layers.0.self_attn.q_proj"].qweight
    assert int(levels.max()) <= 7 and int(levels.min()) >= 0


def test_existing_output_is_refused_before_any_work(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CompressError, match="already exists; pass force=True") as raised:
        run_recipe(_recipe(model_dir, text_file, [{"algorithm": "rtn"}]), out_dir=out, progress=False)
    assert "--" not in str(raised.value)  # a Python caller is not told about command-line flags
    assert (out / "keep.txt").read_text() == "precious"
    run_recipe(_recipe(model_dir, text_file, [{"algorithm": "rtn", "group_size": 32}]), out_dir=out, force=True,
               progress=False, log=lambda *_: None)
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()


def test_step_matching_nothing_is_an_error(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = _recipe(model_dir, text_file, [{"algorithm": "rtn", "targets": ["re:^nothing$"]}])
    with pytest.raises(CompressError, match=r"stages\[0\]\.steps\[0\] \(rtn\): targets .* match no module"):
        run_recipe(recipe, progress=False, log=lambda *_: None)


def test_cli_run_and_eval(tmp_path, text_file, capsys):
    model_dir = tiny_model_dir(tmp_path / "m")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(model_dir, text_file, [{"algorithm": "rtn", "group_size": 32}])))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet", "--set", "stages[0].steps[0].bits=8"]) == 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["steps"][0]["bits"] == 8
    capsys.readouterr()
    assert main(["eval", str(out), "--text", text_file, "--seq-len", "32", "--max-windows", "3", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("perplexity", "nll", "tokens", "ece", "window", "seq_len"):
        assert key in result
    assert result["tokens"] == 3 * 31 and result["perplexity"] > 1
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err  # the CLI's own wording


@pytest.mark.parametrize("strategy", ["diversity", "kl"])
def test_calibration_selection_strategies_in_a_recipe(tmp_path, text_file, strategy):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = _recipe(model_dir, text_file, [{"algorithm": "gptq", "bits": 3, "group_size": 32}])
    recipe["calibration"].update(strategy=strategy, candidates=3, pool_factor=2, probe_samples=4, probe_seq_len=16)
    res = run_recipe(recipe, progress=False, log=lambda *_: None)
    sel = res.report["calibration"]["selection"]
    assert sel["strategy"] == strategy and res.report["calibration"]["strategy"] == strategy
    if strategy == "kl":
        kls = [c["kl"] for c in sel["candidates"]]
        assert len(kls) == 3 and sel["chosen_kl"] == min(kls) > 0
        best = next(c for c in sel["candidates"] if c["kl"] == min(kls))
        assert sel["chosen_seed"] == best["seed"] and sel["digest"] == res.report["calibration"]["digest"]


@pytest.mark.parametrize("kl_steps", [None, ["gptq"]])
def test_kl_steps_choose_what_scores_a_candidate(tmp_path, text_file, monkeypatch, kl_steps):
    import dataclasses
    from compress.algorithms import ALGORITHMS
    calls = {"gptq": 0, "adaquant": 0}
    for name in calls:
        def counted(model, step, ctx, _apply=ALGORITHMS[name].apply, _name=name):
            calls[_name] += 1
            return _apply(model, step, ctx)
        monkeypatch.setitem(ALGORITHMS, name, dataclasses.replace(ALGORITHMS[name], apply=counted))
    recipe = _recipe(tiny_model_dir(tmp_path / "m"), text_file,
                     [{"algorithm": "gptq", "bits": 3, "group_size": 32}, {"algorithm": "adaquant", "steps": 2}])
    recipe["calibration"].update(strategy="kl", candidates=2, probe_samples=4, probe_seq_len=16, kl_steps=kl_steps)
    res = run_recipe(recipe, progress=False, log=lambda *_: None)
    # two candidates scored, then the winner run through the whole recipe
    assert calls == {"gptq": 3, "adaquant": 1 if kl_steps else 3}
    assert res.report["calibration"]["selection"]["scored_with"] == (kl_steps or ["gptq", "adaquant"])


@pytest.mark.parametrize("kl_steps,strategy", [(["rtn"], "kl"), ([], "kl"), (["gptq"], "random")])
def test_kl_steps_must_name_recipe_steps(tmp_path, text_file, kl_steps, strategy):
    from compress.errors import RecipeError
    from compress.recipe import validate_recipe
    recipe = _recipe(tiny_model_dir(tmp_path / "m"), text_file, [{"algorithm": "gptq"}])
    recipe["calibration"].update(strategy=strategy, kl_steps=kl_steps)
    with pytest.raises(RecipeError, match="kl_steps"):
        validate_recipe(recipe)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_report_has_each_phase_peak_device_memory(tmp_path, text_file):
    recipe = _recipe(tiny_model_dir(tmp_path / "m"), text_file, [{"algorithm": "gptq", "bits": 4, "group_size": 32}])
    recipe["model"]["device"] = "cuda"
    res = run_recipe(recipe, progress=False, log=lambda *_: None)
    peaks = res.report["peak_device_mb"]
    assert set(peaks) == set(res.report["timings"]) and peaks["stage:quantize"] > 0


def test_cpu_report_has_no_device_memory(tmp_path, text_file):
    res = run_recipe(_recipe(tiny_model_dir(tmp_path / "m"), text_file, [{"algorithm": "rtn", "bits": 4, "group_size": 32}]),
                     progress=False, log=lambda *_: None)
    assert "peak_device_mb" not in res.report and "stage:quantize" in res.report["timings"]


def test_kl_on_its_own_probe_split_is_refused(tmp_path, text_file):
    from compress.errors import RecipeError
    from compress.recipe import validate_recipe
    recipe = _recipe(tiny_model_dir(tmp_path / "m"), text_file, [{"algorithm": "gptq"}])
    recipe["calibration"].update(strategy="kl", split="validation")
    with pytest.raises(RecipeError, match="calibration: .*strategy kl scores candidates on the validation split"):
        validate_recipe(recipe)


def test_export_folder_has_plain_permissions(tmp_path, text_file):
    import os
    out = tmp_path / "out"
    run_recipe(_recipe(tiny_model_dir(tmp_path / "m"), text_file, [{"algorithm": "rtn", "group_size": 32}]),
               out_dir=out, progress=False, log=lambda *_: None)
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o777 & ~umask)


@pytest.mark.parametrize("fmt", ["hf", "gptq", "compressed-tensors"])
def test_every_exported_file_is_readable_by_others(tmp_path, text_file, fmt):
    """Under a 022 umask every file of an export is 0644 and every folder 0755: safetensors writes its
    weights 0600, which a serving process under another user cannot read (issue 15, part 4)."""
    import os
    import stat
    before = os.umask(0o022)
    try:
        out = tmp_path / "out"
        steps = [{"algorithm": "rtn", "bits": 4, "group_size": 32, "sym": True}]
        run_recipe(_recipe(tiny_model_dir(tmp_path / "m"), text_file, steps, export={"format": fmt}),
                   out_dir=out, progress=False, log=lambda *_: None)
    finally:
        os.umask(before)
    paths = [out, *out.rglob("*")]
    assert any(p.name == "model.safetensors" for p in paths)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in paths}
    assert modes == {k: ("0o755" if (tmp_path / k).is_dir() else "0o644") for k in modes}


def test_report_json_is_written_once_and_carries_the_export_time(tmp_path, text_file, monkeypatch):
    import compress.export
    written = []
    real = compress.export.write_json_atomic
    monkeypatch.setattr(compress.export, "write_json_atomic", lambda path, obj: (written.append(path.name),
                                                                                 real(path, obj)))
    out = tmp_path / "out"
    res = run_recipe(_recipe(tiny_model_dir(tmp_path / "m"), text_file, [{"algorithm": "rtn", "group_size": 32}]),
                     out_dir=out, progress=False, log=lambda *_: None)
    assert written == ["report.json"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["timings"]["export"] > 0 and on_disk["timings"] == res.report["timings"]


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from compress.fs import write_atomic, write_text_atomic
    path = tmp_path / "cache.json"
    write_text_atomic(path, "old")

    def broken(tmp):
        tmp.write_text("half of the new")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, broken)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["cache.json"]
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["cache.json"]


def test_eval_checks_the_text_before_loading_the_model(tmp_path, capsys):
    model_dir = tiny_model_dir(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()  # loading the model would fail: it must not get that far
    short = tmp_path / "short.txt"
    short.write_text("too short for one window")
    assert main(["eval", model_dir, "--text", str(short), "--seq-len", "512", "--device", "cpu"]) == 2
    assert "fewer than one window of seq_len=512" in capsys.readouterr().err
