"""Runs under torchrun (compress/distributed.py) on gloo on the CPU, two processes, on a tiny model.

Equality: `compress run` under `torchrun --nproc-per-node 2` writes the same packed weights, bit for
bit, as the same recipe in one process. Faults: a rank that raises, or one that hangs past the
collective timeout, ends the run on the other rank too, with nothing written.
"""
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from compress.pipeline import run_recipe
from compress.recipe import load_recipe
from tests.tiny_archs import arch_model_dir

ROOT = Path(__file__).resolve().parents[1]


GPTQ = {"algorithm": "gptq", "bits": 4, "group_size": 32}


def _recipe(tmp_path, text_file, *, verify=True, arch="llama", steps=(GPTQ,), fmt="gptq", name="recipe") -> Path:
    recipe = {
        "model": {"id": arch_model_dir(tmp_path / f"m-{name}", arch), "device": "cpu"},
        # 5 batches of 2: the ranks' shares differ in size (3 and 2)
        "calibration": {"corpus": text_file, "num_samples": 10, "seq_len": 32, "seed": 0, "batch_size": 2},
        "stages": [{"name": "quantize", "steps": list(steps)}],
        "export": {"format": fmt},
    }
    if verify:
        recipe["verify"] = {"corpus": text_file, "split": "test", "seq_len": 32, "max_windows": 2}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _env(tmp_path) -> dict:
    # One thread per process, in both runs: the same kernels, so the same bits.
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COMPRESS_CACHE": str(tmp_path / "cache")}


def _run(args, tmp_path, timeout=240) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_ranks_write_the_same_export_as_one(tmp_path, text_file):
    recipe = _recipe(tmp_path, text_file)
    one, two = tmp_path / "one", tmp_path / "two"
    # One process: here, on one thread (conftest), as each rank below runs.
    run_recipe(load_recipe(recipe), out_dir=one, progress=False, log=lambda *_: None)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "compress", "run", str(recipe), "--out", str(two), "--quiet"], tmp_path)
    assert out.stdout.count("verify: perplexity") == 1  # rank 0 alone evaluates and speaks
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert "distributed" not in ra and rb["distributed"]["world_size"] == 2 and rb["distributed"]["backend"] == "gloo"
    assert ra["stages"][0]["steps"][0]["modules"] == rb["stages"][0]["steps"][0]["modules"]  # errors, tokens
    assert ra["verify"]["perplexity"] == rb["verify"]["perplexity"]
    assert not list(tmp_path.glob(".two.tmp-*"))


def _ranks(rank: int, port: int, jobs: list) -> None:
    """One rank, as torchrun would start it, running each (recipe, out) in one process group."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from compress.distributed import launch

    with launch("cpu"):
        for recipe, out in jobs:
            run_recipe(load_recipe(recipe), out_dir=out, progress=False, log=lambda *_: None)


def test_two_ranks_equal_one_for_experts_and_refinement_steps(tmp_path, text_file, monkeypatch):
    """A mixture of experts (many solves per subset, split over the ranks; routed-token counts added)
    and gptq -> adaquant -> bias_correction (the run state and biases travel with the solves)."""
    jobs = [(_recipe(tmp_path, text_file, verify=False, arch="qwen3_moe", name="moe"), tmp_path / "moe"),
            (_recipe(tmp_path, text_file, verify=False, fmt="hf", name="refine",
                     steps=[GPTQ, {"algorithm": "adaquant", "steps": 10}, {"algorithm": "bias_correction"}]),
             tmp_path / "refine")]
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    ranks = [ctx.Process(target=_ranks, args=(r, port, [(str(a), str(b)) for a, b in jobs])) for r in range(2)]
    for p in ranks:
        p.start()
    ones = [run_recipe(load_recipe(recipe), out_dir=tmp_path / f"{out.name}-one", progress=False,
                       log=lambda *_: None) for recipe, out in jobs]
    for p in ranks:
        p.join(300)
        assert p.exitcode == 0
    for one, (_, out) in zip(ones, jobs):
        a, b = load_file(one.out_dir / "model.safetensors"), load_file(out / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (out.name, key)
        rb = json.loads((out / "report.json").read_text())
        for sa, sb in zip(one.report["stages"][0]["steps"], rb["stages"][0]["steps"]):
            assert sa["modules"] == sb["modules"], sa["algorithm"]
            assert sa.get("experts") == sb.get("experts")
    assert ones[0].report["stages"][0]["steps"][0]["experts"]  # the MoE case did route tokens to experts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, recipe: str, out: str, fault: str, timeout_s: str) -> None:
    """One rank, as torchrun would start it; rank 1 fails in block 1's replay (``fault``)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), COMPRESS_DIST_TIMEOUT_S=timeout_s)
    torch.set_num_threads(1)
    import compress.runner
    from compress.cli import main

    if rank == 1:
        replay, calls = compress.runner._replay, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # block 1: block 0 is solved, the export not yet begun
                if fault == "raise":
                    raise RuntimeError("rank 1 fails on purpose")
                time.sleep(300)  # a hang: the other rank's next collective times out
            return replay(*args, **kwargs)

        compress.runner._replay = failing
    sys.exit(main(["run", recipe, "--out", out, "--quiet"]))


# The hang case waits out the collective timeout (8 s) on top of two process starts: marked slow.
@pytest.mark.parametrize("fault", ["raise", pytest.param("hang", marks=pytest.mark.slow)])
def test_a_failing_rank_ends_the_run_on_every_rank_and_writes_nothing(tmp_path, text_file, monkeypatch, fault):
    recipe = _recipe(tmp_path, text_file, verify=False)
    out = tmp_path / "out"
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    ranks = [ctx.Process(target=_rank, args=(r, port, str(recipe), str(out), fault, "8")) for r in range(2)]
    for p in ranks:
        p.start()
    try:
        t0 = time.monotonic()
        ranks[0].join(120)
        waited = time.monotonic() - t0
        assert ranks[0].exitcode not in (None, 0), "rank 0 did not end with an error"
        if fault == "raise":
            ranks[1].join(30)
            assert ranks[1].exitcode not in (None, 0)
    finally:
        for p in ranks:
            if p.exitcode is None:
                p.kill()
                p.join()
    assert waited < 120
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


# ----------------------------------------------------------------------------- the parts that need no processes


def test_each_rank_takes_a_contiguous_share_and_every_batch_is_taken_once(monkeypatch):
    import compress.distributed as d
    from compress.errors import CompressError

    for world, n in [(2, 5), (3, 7), (4, 4)]:
        shares = []
        for rank in range(world):
            monkeypatch.setattr(d, "_SESSION", d.Session(rank, world, rank, "gloo", torch.device("cpu"), 1, 1))
            shares.append(list(d.shard_batches(iter(range(n)))))
        assert sum(shares, []) == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(CompressError, match="every rank needs"):
        d.shard_batches(range(3))  # 4 ranks


def test_alias_maps_of_the_ranks_are_joined():
    from compress.distributed import union_alias
    from compress.errors import CompressError

    # rank 1's expert 3 received no token: no alias there, the union still has it
    parts = [{"q.k": "q.q", "e3.up": "e3.gate"}, {"q.k": "q.q"}]
    assert union_alias(parts) == {"q.k": "q.q", "e3.up": "e3.gate"}
    with pytest.raises(CompressError, match="differ"):
        union_alias([{"a": "b"}, {"a": "c"}])
