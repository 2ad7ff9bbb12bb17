"""A streamed recipe (model.stream) under torchrun: two gloo processes on the CPU, a tiny model.

Every rank streams the blocks and shares the runner's work; rank 0 alone writes the work folder and
the export. Equality: the 2-rank streamed export is the 1-process streamed export bit for bit (one
thread per process in both). Faults: a rank that raises mid-stream ends both ranks with an error
and no export; run again (two ranks, or one process), the run resumes at rank 0's first unwritten
block, and the export is the uninterrupted one.
"""
import json
import multiprocessing
import os
import sys

import pytest
import torch
import yaml

from compress.pipeline import run_recipe
from compress.recipe import load_recipe
from compress.stream import work_dir_for
from tests.test_distributed import GPTQ, _env, _free_port, _recipe, _run
from tests.test_stream import _same_export


def _streamed(tmp_path, text_file, steps, name, arch="llama") -> str:
    path = _recipe(tmp_path, text_file, verify=False, steps=steps, name=name, arch=arch)  # verify: not streamed
    recipe = yaml.safe_load(path.read_text())
    recipe["model"]["stream"] = True
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_two_ranks_stream_the_same_export_as_one(tmp_path, text_file):
    """gptq then adaquant: two passes, so rank 1 reads in the second pass the blocks rank 0 wrote."""
    recipe = _streamed(tmp_path, text_file, [GPTQ, {"algorithm": "adaquant", "steps": 2}], "two-pass")
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe(load_recipe(recipe), out_dir=one, progress=False, log=lambda *_: None)  # one thread (conftest)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "compress", "run", recipe, "--out", str(two), "--quiet"], tmp_path)
    assert "Traceback" not in out.stderr
    _same_export(one, two)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert rb["distributed"]["world_size"] == 2 and len(rb["distributed"]["ranks"]) == 2
    assert ra["stream"]["passes"] == rb["stream"]["passes"] == 2 and not rb["stream"]["resumed"]
    for sa, sb in zip(ra["stages"][0]["steps"], rb["stages"][0]["steps"]):
        assert sa["modules"] == sb["modules"], sa["algorithm"]
    assert not work_dir_for(two).exists() and not list(tmp_path.glob(".two.tmp-*"))


def test_two_ranks_stream_a_mixture_of_experts_as_one(tmp_path, text_file):
    """The experts' solves split over the ranks; the routed tokens of every rank added block by block
    (what the manifest keeps for a resumed run): the one-process export and tokens per expert."""
    recipe = _streamed(tmp_path, text_file, [GPTQ], "moe", arch="qwen3_moe")
    one, two = tmp_path / "one", tmp_path / "two"
    run_recipe(load_recipe(recipe), out_dir=one, progress=False, log=lambda *_: None)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "compress", "run", recipe, "--out", str(two), "--quiet"], tmp_path)
    assert "Traceback" not in out.stderr
    _same_export(one, two)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    sa, sb = ra["stages"][0]["steps"][0], rb["stages"][0]["steps"][0]
    assert sa["modules"] == sb["modules"] and sa["experts"] == sb["experts"]
    assert sum(sb["experts"]["model.layers.0.mlp.experts"]["routed_tokens"]) == 10 * 32 * 2  # both ranks' tokens


def _rank(rank: int, port: int, recipe: str, out: str, fail: bool) -> None:
    """One rank, as torchrun would start it; with ``fail``, rank 1 raises reading block 1."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), COMPRESS_DIST_TIMEOUT_S="60")
    torch.set_num_threads(1)
    import compress.stream
    from compress.cli import main

    if fail and rank == 1:
        acquire = compress.stream.StreamSource.acquire

        def failing(self, i, device):
            if i == 1:  # block 0 is solved and written, block 1 not yet
                raise RuntimeError("rank 1 fails on purpose")
            return acquire(self, i, device)

        compress.stream.StreamSource.acquire = failing
    sys.exit(main(["run", recipe, "--out", out, "--quiet"]))


def _two_ranks(recipe: str, out, fail: bool) -> list[int]:
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    ranks = [ctx.Process(target=_rank, args=(r, port, recipe, str(out), fail)) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        for p in ranks:
            p.join(240)
    finally:
        for p in ranks:
            if p.exitcode is None:
                p.kill()
                p.join()
    return [p.exitcode for p in ranks]


def _fail_mid_stream(tmp_path, text_file, monkeypatch):
    """Two ranks, rank 1 raising in block 1: both end with an error, no export, block 0 on disk."""
    recipe = _streamed(tmp_path, text_file, [GPTQ], "fault")
    out = tmp_path / "out"
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    codes = _two_ranks(recipe, out, fail=True)
    assert all(c not in (None, 0) for c in codes), codes
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # no export, not even half of one
    manifest = json.loads((work_dir_for(out) / "manifest.json").read_text())
    assert manifest["finished"] == [0, -1]  # rank 0 wrote block 0 alone, and nothing of block 1
    assert list(manifest["shards"]) == ["0"]
    return recipe, out


def test_a_rank_failing_mid_stream_ends_both_and_one_process_resumes(tmp_path, text_file, monkeypatch):
    """The work folder rank 0 left does not depend on the world size: one process resumes it."""
    recipe, out = _fail_mid_stream(tmp_path, text_file, monkeypatch)
    logs = []
    resumed = run_recipe(load_recipe(recipe), out_dir=out, progress=False, log=logs.append)
    assert resumed.report["stream"]["resumed"] and any("1 of 2 blocks written" in line for line in logs)
    run_recipe(load_recipe(recipe), out_dir=tmp_path / "ref", progress=False, log=lambda *_: None)
    _same_export(tmp_path / "ref", out)


# Two launches of two processes (about 45 s each on a loaded 2-core box): marked slow.
@pytest.mark.slow
def test_a_rank_failing_mid_stream_ends_both_and_the_rerun_resumes(tmp_path, text_file, monkeypatch):
    recipe, out = _fail_mid_stream(tmp_path, text_file, monkeypatch)
    assert _two_ranks(recipe, out, fail=False) == [0, 0]
    report = json.loads((out / "report.json").read_text())
    assert report["stream"]["resumed"] and report["distributed"]["world_size"] == 2
    run_recipe(load_recipe(recipe), out_dir=tmp_path / "ref", progress=False, log=lambda *_: None)  # uninterrupted
    _same_export(tmp_path / "ref", out)
    assert not work_dir_for(out).exists()
