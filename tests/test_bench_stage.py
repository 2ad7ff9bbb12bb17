"""GPU staging (bench/device/stage.py, gpu_setup.sh): split a fake file, carry, add, join, verify."""
import hashlib
import importlib.util
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_stage", ROOT / "bench/device/stage.py")
stage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage)


@pytest.fixture
def source(tmp_path):
    data = random.Random(0).randbytes(10_000)
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return path, data, hashlib.sha256(data).hexdigest()


def _split(source, tmp_path, chunk=3000):
    path, data, sha = source
    return stage.split_file(path, tmp_path / ".stage", "toy", "toy-model.gguf", chunk, sha256=sha, size=len(data))


def test_split_writes_ordered_chunks_and_a_manifest_in_each_folder(source, tmp_path):
    path, data, sha = source
    manifest = _split(source, tmp_path)
    folder = tmp_path / ".stage/toy"
    assert [c["folder"] for c in manifest["chunks"]] == ["p01", "p02", "p03", "p04"]
    assert [c["size"] for c in manifest["chunks"]] == [3000, 3000, 3000, 1000]
    assert manifest["sha256"] == sha and manifest["size"] == len(data) and manifest["dest_name"] == "toy-model.gguf"
    pieces = b"".join((folder / c["folder"] / c["file"]).read_bytes() for c in manifest["chunks"])
    assert pieces == data
    for c in manifest["chunks"]:
        assert hashlib.sha256((folder / c["folder"] / c["file"]).read_bytes()).hexdigest() == c["sha256"]
        assert json.loads((folder / c["folder"] / "manifest.json").read_text()) == manifest
    # an exact multiple leaves no empty last chunk
    assert [c["size"] for c in _split(source, tmp_path, chunk=2500)["chunks"]] == [2500] * 4
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "p01", "p02", "p03", "p04"]


def test_split_refuses_a_source_that_is_not_the_expected_file(source, tmp_path):
    path, data, sha = source
    with pytest.raises(stage.StageError, match="sha256"):
        stage.split_file(path, tmp_path / ".stage", "toy", "x", 3000, sha256="0" * 64)
    with pytest.raises(stage.StageError, match="9999"):
        stage.split_file(path, tmp_path / ".stage", "toy", "x", 3000, size=9999)
    assert not (tmp_path / ".stage/toy").exists()


def test_add_in_any_order_then_join_gives_the_same_bytes(source, tmp_path):
    path, data, sha = source
    _split(source, tmp_path)
    staged, dest = tmp_path / "gpu-stage", tmp_path / "cache/sources"
    for name in ["p03", "p01", "p04"]:  # one call per folder, any order
        stage.add_chunk_folder(tmp_path / ".stage/toy" / name, staged)
    assert stage.missing_chunks(staged, "toy") == ["p02"]
    with pytest.raises(stage.StageError, match="p02"):
        stage.join_model(staged, "toy", dest)
    assert stage.pending_models(staged, dest) == []
    stage.add_chunk_folder(tmp_path / ".stage/toy/p02", staged)
    stage.add_chunk_folder(tmp_path / ".stage/toy/p02", staged)  # carried twice: harmless
    assert stage.pending_models(staged, dest) == ["toy"]
    out = stage.join_model(staged, "toy", dest)
    assert out == dest / "toy-model.gguf" and out.read_bytes() == data
    assert stage.pending_models(staged, dest) == []  # joined once
    assert sorted(p.name for p in dest.iterdir()) == ["toy-model.gguf"]


def test_a_damaged_chunk_is_refused_when_added_and_when_joined(source, tmp_path):
    _split(source, tmp_path)
    staged, dest = tmp_path / "gpu-stage", tmp_path / "sources"
    carried = tmp_path / ".stage/toy/p02/toy.part02"
    good = carried.read_bytes()
    carried.write_bytes(b"x" + good[1:])
    with pytest.raises(stage.StageError, match="damaged in transfer"):
        stage.add_chunk_folder(carried.parent, staged)
    assert not (staged / "toy/toy.part02").exists()
    carried.write_bytes(good)
    for name in ["p01", "p02", "p03", "p04"]:
        stage.add_chunk_folder(tmp_path / ".stage/toy" / name, staged)
    # a staged chunk damaged afterwards (same size): join names it and leaves nothing behind
    (staged / "toy/toy.part03").write_bytes(b"y" * 3000)
    with pytest.raises(stage.StageError, match=r"toy.part03.*carry p03 again"):
        stage.join_model(staged, "toy", dest)
    assert list(dest.iterdir()) == []


def test_a_manifest_that_lies_about_the_whole_file_is_refused(source, tmp_path):
    _split(source, tmp_path)
    staged, dest = tmp_path / "gpu-stage", tmp_path / "sources"
    for name in ["p01", "p02", "p03", "p04"]:
        stage.add_chunk_folder(tmp_path / ".stage/toy" / name, staged)
    manifest = json.loads((staged / "toy/manifest.json").read_text())
    manifest["sha256"] = "f" * 64
    (staged / "toy/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(stage.StageError, match="f" * 64):
        stage.join_model(staged, "toy", dest)
    assert list(dest.iterdir()) == []


def test_chunks_of_two_preparations_are_not_mixed(source, tmp_path):
    staged = tmp_path / "gpu-stage"
    _split(source, tmp_path)
    stage.add_chunk_folder(tmp_path / ".stage/toy/p01", staged)
    _split(source, tmp_path, chunk=4000)  # re-prepared with another chunk size
    with pytest.raises(stage.StageError, match="differs from the one already staged"):
        stage.add_chunk_folder(tmp_path / ".stage/toy/p02", staged)


def test_pack_calls_fills_calls_first_fit_and_refuses_what_cannot_fit():
    mib = stage.MiB
    calls = stage.pack_calls([("a/p1", 57 * mib), ("a/p2", 40 * mib), (".whl", 6 * mib), ("pkgs", 8 * mib)],
                             budget=60 * mib)
    assert calls == [["a/p1"], ["a/p2", ".whl", "pkgs"]]  # ordered as listed
    calls = stage.pack_calls([(".whl", 6 * mib), ("a/p1", 57 * mib), ("a/p2", 40 * mib)], budget=60 * mib)
    assert calls == [[".whl", "a/p2"], ["a/p1"]]  # the wheels' call first
    assert len(stage.pack_calls([(f"p{i}", 1) for i in range(10)], budget=100)) == 2  # at most 8 carries a call
    with pytest.raises(stage.StageError, match="does not fit"):
        stage.pack_calls([("big", 61 * mib)], budget=60 * mib)


def _git_tree(tmp_path, tracked_bytes):
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "big.bin").write_bytes(b"\0" * tracked_bytes)
    return repo


def test_the_default_chunk_is_the_largest_that_fits_beside_the_working_tree(tmp_path):
    mib = stage.MiB
    assert stage.largest_chunk_bytes(_git_tree(tmp_path / "small", 1000)) == 57 * mib  # the 60 MB cap
    repo = _git_tree(tmp_path / "grown", 10 * mib)  # a tree that grew past 6 MiB: 57 MiB no longer fits
    chunk = stage.largest_chunk_bytes(repo)
    assert chunk == 52 * mib
    budget = stage.CALL_LIMIT - stage.tree_bytes(repo) - mib  # plan()'s budget
    folder = chunk + 4096  # a chunk folder: the chunk and its manifest copy
    assert stage.pack_calls([("p01", folder)], budget) == [["p01"]]
    with pytest.raises(stage.StageError, match="does not fit"):
        stage.pack_calls([("p01", chunk + mib + 4096)], budget)  # one MiB more would not
    with pytest.raises(stage.StageError, match="no room for a chunk"):
        stage.largest_chunk_bytes(_git_tree(tmp_path / "full", 63 * mib))


@pytest.mark.skipif(shutil.which("python3") is None, reason="gpu_setup.sh runs python3")
def test_gpu_setup_stage_adds_carried_chunks_and_joins_once_complete(source, tmp_path):
    """The GPU-side script over two calls: each sees only what it carried in .stage/."""
    path, data, sha = source
    prepared = tmp_path / "here"
    stage.split_file(path, prepared / ".stage", "toy", "toy-model.gguf", 6000, sha256=sha)
    gpu = tmp_path / "gpu"
    (gpu / "bench").mkdir(parents=True)
    shutil.copytree(ROOT / "bench/device", gpu / "bench/device")
    env = {**os.environ, "STAGE": str(tmp_path / "tmp-stage"), "COMPRESS_CACHE": str(tmp_path / "cache")}
    out_file = tmp_path / "cache/sources/toy-model.gguf"
    for call, folder in enumerate(["p02", "p01"]):
        shutil.rmtree(gpu / ".stage", ignore_errors=True)
        shutil.copytree(prepared / ".stage/toy" / folder, gpu / ".stage/toy" / folder)
        run = subprocess.run(["bash", "bench/device/gpu_setup.sh", "stage"], cwd=gpu, env=env,
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        if call == 0:
            assert "toy: missing p01" in run.stdout and not out_file.exists()
    assert "toy: verified" in run.stdout and "toy: complete" in run.stdout
    assert out_file.read_bytes() == data


@pytest.mark.skipif(shutil.which("python3") is None, reason="gpu_setup.sh runs python3")
def test_gpu_setup_stage_puts_carried_generations_in_the_cache(tmp_path):
    """An earlier window's greedy continuations (.stage/generations/) land where the self_spec step's
    generation cache reads them."""
    gpu = tmp_path / "gpu"
    (gpu / "bench").mkdir(parents=True)
    shutil.copytree(ROOT / "bench/device", gpu / "bench/device")
    (gpu / ".stage/generations").mkdir(parents=True)
    (gpu / ".stage/generations/abc.safetensors").write_bytes(b"tokens")
    env = {**os.environ, "STAGE": str(tmp_path / "tmp-stage"), "COMPRESS_CACHE": str(tmp_path / "cache")}
    run = subprocess.run(["bash", "bench/device/gpu_setup.sh", "stage"], cwd=gpu, env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert "generations: 1 cached continuation files" in run.stdout
    assert (tmp_path / "cache/generations/abc.safetensors").read_bytes() == b"tokens"
