"""The command line as a person meets it (issue 15): help on every argument with its default,
--version, run --dry-run, no library noise on stderr, --log-file, progress bars that say what they
measure."""
import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import compress
from compress.cli import _parser, main
from compress.logs import QUIET_LOGGERS
from tests.tiny import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
# What the libraries print on import (compress/logs.py says where each comes from).
NOISE = ("Failed to load", "_C_mxfp8", "Detected no triton", "register_constant", "_pytree")


def _recipe_file(tmp_path, text_file, **extra) -> Path:
    recipe = {"model": {"id": tiny_model_dir(tmp_path / "m"), "device": "cpu"},
              "stages": [{"name": "quantize", "steps": [{"algorithm": "rtn", "bits": 4, "group_size": 32}]}],
              "verify": {"corpus": text_file, "split": "test", "seq_len": 32, "max_windows": 3}, **extra}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _actions(parser: argparse.ArgumentParser, where: str = "compress"):
    """Every argument of ``parser`` and of each of its subcommands, with the command it belongs to."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _actions(sub, f"{where} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield where, action


def test_every_argument_has_help_and_shows_its_default():
    parser = _parser()
    seen = 0
    for where, action in _actions(parser):
        seen += 1
        assert action.help and action.help.strip(), f"{where} {action.dest}: no help"
    assert seen > 60  # the walk reached every subcommand
    # The default is shown wherever there is one to show (not for flags, nor options with none).
    for command in (["run"], ["eval"], ["draft-eval"], ["draft-bench"], ["validate"], ["models", "fetch"]):
        sub = parser
        for name in command:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            d = action.default
            if action.option_strings and d not in (None, False, [], argparse.SUPPRESS):
                assert f"(default: {d})" in text, f"{' '.join(command)} {action.option_strings[0]}: no default shown"
    eval_help = " ".join(main_help(["eval", "--help"]).split())
    assert "--seq-len SEQ_LEN tokens per window (default: 512)" in eval_help
    assert "--topics TOPICS BBC test articles for zero-shot topic accuracy (0: none) (default: 0)" in eval_help


def main_help(argv) -> str:
    proc = subprocess.run([sys.executable, "-m", "compress", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"compress {compress.__version__}"


def test_run_needs_out_unless_dry_run(tmp_path, text_file, capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", str(_recipe_file(tmp_path, text_file))])
    assert done.value.code == 2 and "--out DIR is required" in capsys.readouterr().err


def test_dry_run_prints_the_plan_and_does_no_work(tmp_path, text_file, capsys, monkeypatch):
    import compress.models.load
    import compress.pipeline

    def no_work(*a, **k):
        raise AssertionError("a dry run loaded a model or ran the recipe")

    monkeypatch.setattr(compress.pipeline, "run_recipe", no_work)
    monkeypatch.setattr(compress.models.load, "load_model", no_work)
    path = _recipe_file(tmp_path, text_file, calibration={"corpus": text_file, "num_samples": 4, "seq_len": 32})
    data = yaml.safe_load(path.read_text())
    data["stages"][0]["steps"] = [{"algorithm": "gptq", "bits": 3, "group_size": 32, "ignore": ["lm_head", "re:.*down_proj"]}]
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # nothing written
    from compress.sizes import safetensors_elements
    params = safetensors_elements(tmp_path / "m")
    assert params > 0 and f"{params / 1e6:,.1f}M parameters" in text
    assert "calibration  4 x 32 = 128 tokens" in text
    # 3 blocks x 7 linears, less the 3 down_proj the recipe ignores
    assert "stages[0].steps[0] [quantize] gptq on 18 linears: bits=3, group_size=32" in text
    assert "verify       3 x 32 = 96 tokens" in text and "float baseline: evaluated" in text
    assert "about 320 tokens through the model" in text  # 128 calibration + 96 verify + 96 baseline
    assert f"export       hf -> {out}" in text


def test_dry_run_refuses_what_run_refuses(tmp_path, text_file, capsys):
    path = _recipe_file(tmp_path, text_file)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["run", str(path), "--out", str(out), "--dry-run"]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    data = yaml.safe_load(path.read_text())
    data["stages"][0]["steps"][0]["targets"] = ["re:^nothing$"]
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--dry-run"]) == 2
    assert "match no module" in capsys.readouterr().err


def test_progress_bars_say_what_they_measure(tmp_path, text_file, capsys):
    path = _recipe_file(tmp_path, text_file)
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    for bar in ("baseline perplexity", "rtn:", "verify perplexity", "export hf"):
        assert bar in err, bar


def test_no_library_noise_on_stderr_and_all_of_it_in_the_log_file(tmp_path, text_file):
    """A fresh process (the libraries speak once, on import): stderr has none of their lines; the log
    file keeps them when they were spoken (torchao installed, as the interop extra installs it)."""
    path = _recipe_file(tmp_path, text_file)
    log = tmp_path / "run.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPRESS_CACHE": str(tmp_path / "cache")}
    env.pop("TORCH_LOGS", None)
    # validate (a llama: its structure written from config.json, no torch); the run imports everything
    proc = subprocess.run([sys.executable, "-m", "compress", "validate", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)], proc.stderr
    proc = subprocess.run([sys.executable, "-m", "compress", "run", str(path), "--out", str(tmp_path / "out"),
                           "--quiet", "--log-file", str(log)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)], proc.stderr
    logged = log.read_text()
    assert "DEBUG" in logged  # every record, at every level
    try:
        import importlib.util
        torchao = importlib.util.find_spec("torchao") is not None
    except ValueError:
        torchao = False
    if torchao:
        assert "torchao" in logged and ("Detected no triton" in logged or "Failed to load" in logged)


def test_quiet_loggers_are_silenced_on_the_console_and_shown_with_verbose(capsys):
    import logging

    from compress.logs import configure_logging
    try:
        for verbose in (False, True):
            configure_logging(verbose=verbose)
            for name in QUIET_LOGGERS:
                logging.getLogger(name).warning("noise from %s", name)
            logging.getLogger("compress.test").info("our own line")
            err = capsys.readouterr().err
            assert "our own line" in err
            assert all((f"noise from {name}" in err) == verbose for name in QUIET_LOGGERS if name.startswith("torchao"))
            logging.getLogger("torchao").error("a real failure")
            assert "a real failure" in capsys.readouterr().err  # errors always show
    finally:
        configure_logging()


@pytest.mark.parametrize("extra,hint", [
    ({}, None),  # verify needs the whole model: no stream, no hint
    ({"verify": None, "export": {"format": "gptq"}}, "this recipe could stream"),
    ({"verify": None, "export": {"format": "gptq"}, "stream": True}, "resumes at the first block"),
])
def test_ctrl_c_says_how_a_run_could_resume(tmp_path, text_file, capsys, monkeypatch, extra, hint):
    import compress.pipeline

    def interrupted(*_, **__):
        raise KeyboardInterrupt
    monkeypatch.setattr(compress.pipeline, "run_recipe", interrupted)
    stream = extra.pop("stream", False)
    path = _recipe_file(tmp_path, text_file, **extra)
    if stream:
        recipe = yaml.safe_load(path.read_text())
        recipe["model"]["stream"] = True
        path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and (hint in err if hint else "resume" not in err)
