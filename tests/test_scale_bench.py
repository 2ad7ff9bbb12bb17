"""bench/scale_gptq.py at its tiny shape on the CPU: the checkpoint it writes is a sharded folder whose
bytes are the seeded generator's, the streamed run reports per-block times and peaks, and a generated
(never written) checkpoint gives the same export as the written one."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from compress.formats.packed import read_tensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import scale_gptq  # noqa: E402

ARGS = ["--shape", "tiny", "--layers", "2", "--samples", "2", "--seq-len", "16", "--batch-size", "2"]


def test_write_then_stream_and_generated_equals_written(tmp_path):
    folder = tmp_path / "tiny"
    scale_gptq.main(["write", "--dir", str(folder), "--out", str(tmp_path / "w.json"), *ARGS])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # the rest + one shard per block
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 256

    scale_gptq.main(["run", "--dir", str(folder), "--out", str(tmp_path / "r.json"),
                     "--export-dir", str(tmp_path / "e1"), *ARGS])
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r["block_seconds"]) == {"0", "1"} and r["peak_host_rss_mb"] > 0 and r["peak_gpu_mb"] is None
    assert r["calibration"]["tokens"].startswith("random ids") and r["total_seconds"] > 0

    gen = tmp_path / "gen"
    scale_gptq.main(["run", "--generate", "--dir", str(gen), "--out", str(tmp_path / "g.json"),
                     "--export-dir", str(tmp_path / "e2"), *ARGS])
    assert not list(gen.glob("*.safetensors"))  # nothing but config.json (and the seed) on disk
    a, b = read_tensors(tmp_path / "e1"), read_tensors(tmp_path / "e2")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
