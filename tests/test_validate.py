"""`compress validate` refuses, before any work, what used to pass it and fail late (issue 15):
no model, no stage, targets that match nothing, impossible step orders, an export format with
nothing to pack. The model's structure comes from its config on the meta device, never its weights."""
import json
import subprocess
import sys

import pytest
import yaml

from compress.cli import main
from compress.errors import RecipeError
from compress.plan import check_plan
from compress.recipe import validate_recipe
from compress.structure import model_structure, structure_of
from tests.tiny import tiny_model, tiny_model_dir
from tests.tiny_archs import COVERAGE_ARCHS

GPTQ = {"algorithm": "gptq", "bits": 4, "group_size": 32}
RTN = {"algorithm": "rtn", "bits": 4, "group_size": 32}
PRUNE = {"algorithm": "magnitude", "sparsity": 0.2}
S2FT = {"algorithm": "s2ft", "task": "lm", "steps": 1}
RECAL = {"algorithm": "recalibrate", "method": "temperature"}


@pytest.fixture
def weightless_dir(tmp_path, monkeypatch):
    """A tiny model folder without its weights (validate must not need them), and a cache of its own."""
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    path = tiny_model_dir(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    return path


def _validate(tmp_path, capsys, recipe: dict) -> tuple[int, str]:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = main(["validate", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def _recipe(model, *steps, **extra):
    return {"model": {"id": model, "device": "cpu"}, "stages": [{"name": f"s{i}", "steps": [s]}
                                                                for i, s in enumerate(steps)], **extra}


def test_a_recipe_names_its_model_and_has_a_stage(tmp_path, capsys):
    code, err = _validate(tmp_path, capsys, {"stages": [{"name": "q", "steps": [RTN]}]})
    assert code == 2 and "model: the recipe names no model" in err
    code, err = _validate(tmp_path, capsys, {"model": "smollm2-135m", "stages": []})
    assert code == 2 and "stages: the recipe has no stage" in err and "compress eval" in err
    code, err = _validate(tmp_path, capsys, {"model": "smollm2-135m"})
    assert code == 2 and "stages: the recipe has no stage" in err


def test_targets_are_matched_against_the_structure_without_weights(weightless_dir, tmp_path, capsys):
    code, err = _validate(tmp_path, capsys, _recipe(weightless_dir, {**RTN, "targets": ["re:^nothing$"]}))
    assert code == 2
    assert "stages[0].steps[0] (rtn): targets ['re:^nothing$'] (ignore ['lm_head']) match no module" in err
    code, err = _validate(tmp_path, capsys, _recipe(weightless_dir, {**RTN, "targets": ["re:(unclosed"]}))
    assert code == 2 and "bad regular expression" in err
    code, out = _validate(tmp_path, capsys, _recipe(weightless_dir, {**RTN, "targets": ["re:mlp"]}))
    assert code == 0 and "valid" in out and "not checked" not in out


@pytest.mark.parametrize("steps, message", [
    ((GPTQ, PRUNE), r"stages\[1\]\.steps\[0\] \(magnitude\) comes after stages\[0\]\.steps\[0\] \(gptq\), which "
                    r"produced quantized weights .*put magnitude before the quantization stage"),
    ((RTN, S2FT), r"stages\[1\]\.steps\[0\] \(s2ft\) comes after stages\[0\]\.steps\[0\] \(rtn\).*put s2ft before "
                  r"the quantization stage"),
    ((RECAL, RTN), r"stages\[1\]\.steps\[0\] \(rtn\) comes after stages\[0\]\.steps\[0\] \(recalibrate\), which "
                   r"produced a calibrator .*put rtn before the recalibrate step"),
    ((RECAL, PRUNE), r"\(magnitude\) comes after stages\[0\]\.steps\[0\] \(recalibrate\)"),
    ((RTN, RECAL, RECAL), r"stages\[2\]\.steps\[0\] \(recalibrate\): stages\[1\]\.steps\[0\] \(recalibrate\) "
                          r"already fitted a calibrator"),
    (({"algorithm": "adaquant", "steps": 1},), r"stages\[0\]\.steps\[0\] \(adaquant\): module "
                                               r"model\.layers\.0\.self_attn\.q_proj has no quantization result"),
    (({**RTN, "targets": ["re:mlp"]}, {"algorithm": "bias_correction"}),
     r"\(bias_correction\): no float weight was kept for module model\.layers\.0\.self_attn\.q_proj"),
])
def test_impossible_orders_are_refused_naming_both_steps(weightless_dir, tmp_path, capsys, steps, message):
    import re
    code, err = _validate(tmp_path, capsys, _recipe(weightless_dir, *steps))
    assert code == 2 and re.search(message, err), err


def test_possible_orders_pass(weightless_dir, tmp_path, capsys):
    for steps in [(PRUNE, S2FT, GPTQ, RECAL), (RTN, {"algorithm": "adaquant"}, {"algorithm": "bias_correction"}),
                  (GPTQ, RTN, RECAL)]:
        code, out = _validate(tmp_path, capsys, _recipe(weightless_dir, *steps))
        assert code == 0, out


def test_a_packed_export_needs_a_quantizing_step(weightless_dir, tmp_path, capsys):
    for fmt in ("gptq", "compressed-tensors"):
        code, err = _validate(tmp_path, capsys, _recipe(weightless_dir, PRUNE, export={"format": fmt}))
        assert code == 2 and f"export.format {fmt} packs quantized weights, but no step produces them" in err
    assert _validate(tmp_path, capsys, _recipe(weightless_dir, PRUNE, RTN, export={"format": "gptq"}))[0] == 0


def test_order_is_checked_without_a_structure_too():
    recipe = validate_recipe(_recipe("smollm2-135m", {"algorithm": "adaquant"}))
    with pytest.raises(RecipeError, match=r"\(adaquant\) needs quantized weights, which no earlier step produces; "
                                          r"run rtn or gptq or gptq_mixed first"):
        check_plan(recipe, None)
    check_plan(validate_recipe(_recipe("smollm2-135m", RTN, {"algorithm": "adaquant"})), None)


def test_a_model_whose_config_is_not_here_is_valid_with_a_note(tmp_path, capsys):
    code, out = _validate(tmp_path, capsys, _recipe("some-org/some-model", RTN))
    assert code == 0 and "targets not checked: some-org/some-model has no local config.json" in out


def test_the_meta_structure_is_the_model_s_and_is_cached(weightless_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("compress.structure._LAYER_LINEARS", {})  # llama: built, as an unknown family is
    built, note = model_structure(weightless_dir)
    assert note == "" and built == structure_of(tiny_model())
    assert len(built.linears) == 3 * 7 + 1 and built.model_type == "llama"
    cached = list((tmp_path / "cache" / "structure").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["model_type"] == "llama"
    assert model_structure(weightless_dir) == (built, "")


def test_a_run_leaves_the_structure_cached_for_validate(tmp_path, monkeypatch):
    from compress.pipeline import run_recipe
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir(tmp_path / "m")
    run_recipe(_recipe(model_dir, RTN), progress=False, log=lambda *_: None)
    monkeypatch.setattr("compress.structure._LAYER_LINEARS", {})  # the cache, not the config, answers
    monkeypatch.setattr("compress.structure._meta_structure", lambda *a: pytest.fail("built the structure again"))
    assert model_structure(model_dir)[0] == structure_of(tiny_model())


def _validates_without_heavy_imports(path, cache) -> None:
    """`compress validate PATH` in a fresh process succeeds and imports none of the heavy libraries."""
    probe = ("import sys; from compress.cli import main; code = main(['validate', sys.argv[1]]); "
             "heavy = sorted({'torch', 'transformers', 'datasets', 'scipy'} & set(sys.modules)); "
             "print(code, heavy)")
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True,
                          env={**__import__("os").environ, "COMPRESS_CACHE": str(cache)})
    assert done.stdout.strip().endswith("0 []"), done.stdout + done.stderr


def test_validate_imports_no_torch_once_the_structure_is_cached(weightless_dir, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(weightless_dir, GPTQ, export={"format": "gptq"})))
    assert main(["validate", str(path)]) == 0  # builds and caches the structure
    _validates_without_heavy_imports(path, tmp_path / "cache")


@pytest.mark.parametrize("arch", COVERAGE_ARCHS)
def test_the_static_structure_is_the_one_transformers_builds(arch, tmp_path):
    """A dense family's linears written from config.json alone are exactly those of the model built
    on the meta device; a mixture of experts is not written (its experts are split after building)."""
    from compress.structure import _meta_structure, static_structure
    from tests.tiny_archs import MOE_ARCHS, arch_config

    arch_config(arch).save_pretrained(tmp_path)
    static = static_structure(json.loads((tmp_path / "config.json").read_text()))
    if arch in MOE_ARCHS:
        assert static is None
    else:
        assert static == _meta_structure(tmp_path, False)
    assert static_structure({**json.loads((tmp_path / "config.json").read_text()), "auto_map": {}}) is None


def test_the_first_validation_of_a_dense_model_imports_no_torch(weightless_dir, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(weightless_dir, GPTQ, export={"format": "gptq"})))
    _validates_without_heavy_imports(path, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("structure/*.json"))  # nothing built, nothing to cache


def test_a_recipe_without_stages_measures_but_does_not_export(tmp_path):
    from compress.errors import RecipeError as Refused
    from compress.pipeline import run_recipe
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = {"model": {"id": model_dir, "device": "cpu"}}
    run = run_recipe(recipe, progress=False, log=lambda *_: None)  # the model as it is (a benchmark's dense row)
    assert run.report["stages"] == [] and run.out_dir is None
    with pytest.raises(Refused, match="stages: the recipe has no stage, so it would export an unchanged copy"):
        run_recipe(recipe, out_dir=tmp_path / "out", progress=False, log=lambda *_: None)
    assert not (tmp_path / "out").exists()
