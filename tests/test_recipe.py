"""Recipe schema, YAML loading and the `validate` command: every error names its YAML path."""
import re
from pathlib import Path

import pytest
import yaml

from compress.cli import main
from compress.errors import RecipeError
from compress.recipe import Recipe, apply_overrides, load_recipe, validate_recipe

RECIPES = sorted(Path(__file__).parent.parent.glob("recipes/*.yaml"))
GOOD = {
    "model": "smollm2-135m",
    "stages": [{"name": "q", "steps": [{"algorithm": "rtn", "bits": 4}, {"algorithm": "gptq", "bits": 3}]}],
}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_and_round_trip(path, capsys):
    assert main(["validate", str(path)]) == 0
    recipe = load_recipe(path)
    again = validate_recipe(yaml.safe_load(recipe.to_yaml()))
    assert again == recipe  # YAML <-> Python objects map 1:1


def test_python_objects_equal_yaml():
    from compress.quantize.steps import GPTQConfig
    from compress.recipe import ModelSpec, Stage
    py = Recipe(model=ModelSpec(id="smollm2-135m"), stages=[Stage(name="q", steps=[GPTQConfig(bits=3)])])
    assert validate_recipe({"model": "smollm2-135m", "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "bits": 3}]}]}) == py


BAD = [
    ("unknown top key", {**GOOD, "stagez": []}, r"stagez: unknown key"),
    ("unknown step key", {**GOOD, "stages": [{"name": "q", "steps": [{"algorithm": "rtn", "bitz": 4}]}]},
     r"stages\[0\]\.steps\[0\]\.bitz: unknown key"),
    ("bad bits", {**GOOD, "stages": [{"name": "q", "steps": [{"algorithm": "rtn"}, {"algorithm": "gptq", "bits": 5}]}]},
     r"stages\[0\]\.steps\[1\]\.bits: Input should be 2, 3, 4 or 8 \(got 5\)"),
    ("wrong type", {**GOOD, "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "act_order": "maybe"}]}]},
     r"stages\[0\]\.steps\[0\]\.act_order: .*bool.* \(got 'maybe'\)"),
    ("unknown algorithm", {**GOOD, "stages": [{"name": "q", "steps": [{"algorithm": "magic"}]}]},
     r"stages\[0\]\.steps\[0\]\.algorithm: unknown algorithm 'magic'; known: .*gptq.*rtn"),
    ("missing algorithm", {**GOOD, "stages": [{"name": "q", "steps": [{"bits": 4}]}]},
     r"stages\[0\]\.steps\[0\]: a step needs `algorithm:`"),
    ("unknown model", {**GOOD, "model": "gpt-17"}, r"model\.id: unknown model 'gpt-17'.*smollm2-135m"),
    ("out of range", {**GOOD, "calibration": {"num_samples": 0}},
     r"calibration\.num_samples: Input should be greater than or equal to 1 \(got 0\)"),
    ("damp out of range", {**GOOD, "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "damp": 2}]}]},
     r"stages\[0\]\.steps\[0\]\.damp: Input should be less than or equal to 1"),
    ("calibrate on test", {**GOOD, "calibration": {"split": "test"}}, r"calibration\.split: Input should be 'train' or 'validation'"),
    ("unknown corpus", {**GOOD, "verify": {"corpus": "wikipedia"}}, r"verify\.corpus: unknown corpus 'wikipedia'; known: .*bbc"),
    ("bad version", {**GOOD, "version": 2}, r"version: Input should be 1"),
    ("duplicate stage", {**GOOD, "stages": GOOD["stages"] * 2}, r"stage names must be unique"),
]


@pytest.mark.parametrize("name,data,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_recipes_name_the_path(tmp_path, capsys, name, data, pattern):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    import re
    assert re.search(pattern, err), err


RAW_BAD = [
    ("syntax", b"model: [unclosed\n", r"YAML syntax error at line 2"),
    ("empty", b"", r"the recipe is empty"),
    ("comment only", b"# nothing\n", r"the recipe is empty"),
    ("list", b"- a\n- b\n", r"must be a YAML mapping .* got a list"),
    ("scalar", b"hello\n", r"must be a YAML mapping .* got a str"),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00", r"not a YAML text file"),
    ("latin1", b"model: caf\xe9\n", r"not UTF-8"),
    ("duplicate key", b"model: smollm2-135m\nmodel: smollm2-135m\n", r"duplicate key 'model'"),
    ("python tag", b"model: !!python/object/apply:os.system ['true']\n", r"YAML syntax error"),
]


@pytest.mark.parametrize("name,raw,pattern", RAW_BAD, ids=[b[0] for b in RAW_BAD])
def test_bad_files_are_clear_errors(tmp_path, capsys, name, raw, pattern):
    path = tmp_path / "r.yaml"
    path.write_bytes(raw)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    import re
    assert re.search(pattern, err) and "Traceback" not in err, err


def test_missing_file(capsys):
    assert main(["validate", "/nonexistent/r.yaml"]) == 2
    assert "cannot read the recipe" in capsys.readouterr().err


def test_overrides():
    data = {"model": "smollm2-135m", "stages": [{"name": "q", "steps": [{"algorithm": "gptq"}]}]}
    apply_overrides(data, ["stages[0].steps[0].bits=3", "calibration.num_samples=4", "verify.baseline=false"])
    r = validate_recipe(data)
    assert r.stages[0].steps[0].bits == 3 and r.calibration.num_samples == 4 and r.verify.baseline is False
    with pytest.raises(RecipeError, match="index 3 is out of range"):
        apply_overrides(data, ["stages[3].name=x"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_overrides(data, ["stages"])


def test_a_model_key_set_on_the_shorthand_expands_it():
    # `model: ID` in the file, `--set model.stream=true` or `model.id=...` on the command line
    data = {"model": "smollm2-135m", "stages": [{"name": "q", "steps": [{"algorithm": "gptq"}]}]}
    apply_overrides(data, ["model.id=qwen2.5-coder-0.5b", "model.dtype=bfloat16"])
    r = validate_recipe(data)
    assert r.model.id == "qwen2.5-coder-0.5b" and r.model.dtype == "bfloat16"


def test_set_errors_name_the_path_too(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert main(["validate", str(path), "--set", "stages[0].steps[0].group_size=100"]) == 2
    assert "stages[0].steps[0].group_size: Input should be -1, 32, 64 or 128 (got 100)" in capsys.readouterr().err


@pytest.mark.parametrize("step, where", [
    ({"algorithm": "recalibrate", "targets": ["re:q_proj"]},
     "recalibrate takes no targets/ignore: recalibrate changes no module"),
    ({"algorithm": "s2ft", "ignore": ["re:.*"]}, "s2ft takes no targets/ignore: s2ft chooses its modules"),
    ({"algorithm": "self_spec", "targets": ["Linear", "Embedding"]}, "self_spec takes no targets/ignore"),
])
def test_steps_that_take_no_targets_refuse_them(step, where):
    with pytest.raises(RecipeError, match=where):
        validate_recipe({"model": "smollm2-135m", "stages": [{"name": "s", "steps": [step]}]})
    # A resolved recipe written before these steps lost the fields carries the defaults, and an empty
    # list says "none": both still accepted.
    for given in ({"targets": ["Linear"], "ignore": ["lm_head"]}, {"targets": [], "ignore": []}):
        recipe = validate_recipe({"model": "smollm2-135m", "stages": [{"name": "s", "steps": [{**step, **given}]}]})
        assert "targets" not in recipe.stages[0].steps[0].model_dump()


@pytest.mark.parametrize("where, data", [
    ("calibration.corpus", {"calibration": {"corpus": "wikipedia"}}),
    ("calibration.probe_corpus", {"calibration": {"strategy": "kl", "probe_corpus": "wikipedia"}}),
    ("verify.corpus", {"verify": {"corpus": "wikipedia"}}),
    ("stages[0].steps[0].corpus",
     {"stages": [{"name": "r", "steps": [{"algorithm": "recalibrate", "corpus": "wikipedia"}]}]}),
    ("stages[0].steps[0].corpus", {"stages": [{"name": "f", "steps": [{"algorithm": "s2ft", "corpus": "wikipedia"}]}]}),
])
def test_every_corpus_field_is_checked_by_the_one_corpus_type(where, data):
    with pytest.raises(RecipeError, match=re.escape(f"{where}: unknown corpus 'wikipedia'; known: bbc, milton, "
                                                    "shakespeare, stdlib, or a path to a .txt/.jsonl file")):
        validate_recipe({**GOOD, **data})


def test_pruning_methods_differ_by_config_type():
    from compress.algorithms import ALGORITHMS
    from compress.prune.steps import UNIT_SCORES
    pruning = [a for a in ALGORITHMS.values() if a.apply == ALGORITHMS["nirvana"].apply]
    assert sorted(a.name for a in pruning) == ["magnitude", "nirvana", "taylor", "wanda"]
    assert {a.config for a in pruning} == set(UNIT_SCORES)


def test_readme_builds_a_recipe_from_python_objects(monkeypatch):
    """The README's Python example runs as written (run_recipe stubbed) and means the YAML it mirrors."""
    import re
    from pathlib import Path
    from types import SimpleNamespace

    import compress.pipeline
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "Recipe(" in b)
    ran = {}

    def fake_run(recipe, **kw):
        ran.update(recipe=recipe, **kw)
        return SimpleNamespace(report={"verify": {"perplexity": 1.0}, "size": {"disk_ratio": 1.0}})

    monkeypatch.setattr(compress.pipeline, "run_recipe", fake_run)
    exec(compile(block, "README.md", "exec"), {})
    assert ran["out_dir"] == "out/mine"
    assert ran["recipe"] == validate_recipe({
        "model": "smollm2-135m", "calibration": {"corpus": "bbc", "num_samples": 32, "seq_len": 512},
        "stages": [{"name": "quantize", "steps": [{"algorithm": "gptq", "bits": 4, "group_size": 128, "sym": True}]}],
        "verify": {"max_windows": 16}, "export": {"format": "gptq"}})


def test_configs_built_in_python_name_the_bad_field_as_the_cli_does():
    from compress.errors import CompressError
    from compress.quantize.config import GPTQConfig
    from compress.recipe import ModelSpec, Stage

    def message(build) -> str:
        with pytest.raises(RecipeError) as raised:
            build()
        assert isinstance(raised.value, CompressError) and isinstance(raised.value, ValueError)
        text = str(raised.value)
        assert "pydantic" not in text and "validation error" not in text  # not pydantic's own dump
        return text

    assert message(lambda: GPTQConfig(bits=5)) == "GPTQConfig: bits: Input should be 2, 3, 4 or 8 (got 5)"
    cfg = GPTQConfig()
    assert message(lambda: setattr(cfg, "group_size", 100)) == (
        "GPTQConfig: group_size: Input should be -1, 32, 64 or 128 (got 100)")
    assert cfg.group_size == 128
    assert message(lambda: GPTQConfig(bitz=4)) == "GPTQConfig: bitz: unknown key (not part of the schema here)"
    # Nested, the path is the recipe's YAML path, as `compress validate` prints it
    steps = [{"algorithm": "rtn"}, {"algorithm": "gptq", "bits": 5}]
    assert message(lambda: Stage(name="q", steps=steps)) == "Stage: steps[1].bits: Input should be 2, 3, 4 or 8 (got 5)"
    nested = message(lambda: Recipe(model=ModelSpec(id="smollm2-135m"), stages=[{"name": "q", "steps": steps}]))
    assert nested == "recipe: stages[0].steps[1].bits: Input should be 2, 3, 4 or 8 (got 5)"
    assert message(lambda: Stage(name="q", steps=[{"algorithm": "gptqq"}])).startswith(
        "Stage: steps[0].algorithm: unknown algorithm 'gptqq'; known: adaquant, bias_correction, gptq,")
    assert "the recipe names no model" in message(lambda: Recipe(stages=[]))
