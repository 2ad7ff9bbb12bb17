"""bench/self_spec_draft_cost.py on the CPU: its parts compute what a fused round computes (so their
times on the GPU split that round's), the fused programs draft the same tokens, and bad positions are
refused before anything loads."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from compress.draft.decoders import self_spec_pair, target_engine
from compress.draft.selfspec.head import ExitHead

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import self_spec_draft_cost  # noqa: E402
from self_spec_smoke import random_model  # noqa: E402


def _pair(exit_layer: int = 1):
    model = random_model("tiny", torch.device("cpu"), torch.float32)
    head = ExitHead(model, exit_layer, torch.arange(256), context="deep")
    _, drafter = self_spec_pair(target_engine(model, 64), head)
    return drafter.pair


def test_parts_draft_what_the_round_drafts():
    pair = _pair()
    with torch.no_grad():
        parts = self_spec_draft_cost.parts(pair, 20, 3, fused="eager")
        first = pair._round(torch.tensor([1]), torch.tensor([20]), 1).clone()
        assert torch.equal(parts["draft"](), first)
        assert torch.equal(parts["head_step"](), first)  # the draft less its shallow blocks, same token
        assert torch.equal(parts["head_step_fused"](), first)
        rnd = parts["round_3"]().clone()
        assert rnd.shape == (3,) and rnd[0] == first[0]
        assert torch.equal(parts["round_3_fused"](), rnd)
        target = parts["target_step"]().clone()
        assert torch.equal(parts["target_step_fused"](), target)
    assert {"embed", "block", "fuse", "head_layer", "head_tail", "lm_rows_256", "lm_rows_512", "launch"} <= set(parts)


def test_main_reports_every_part_against_the_target_step(tmp_path):
    res = self_spec_draft_cost.main(["--target", "random:tiny", "--exit-layer", "2", "--device", "cpu",
                                     "--max-len", "64", "--position", "20", "--repeats", "1", "--replays", "2",
                                     "--vocab", "256", "--out", str(tmp_path / "c.json")])
    assert res["exit_layer"] == 2 and res["vocab"] == 256 and not res["graphs"]
    assert res["of_target_step"]["target_step"] == 1.0
    assert all(v > 0 for v in res["us"].values())
    assert "round_3_fused" not in res["us"] and (tmp_path / "c.json").is_file()


def test_a_position_past_the_cache_is_refused_before_loading(tmp_path):
    with pytest.raises(SystemExit, match="--position 70"):
        self_spec_draft_cost.main(["--target", "random:tiny", "--max-len", "64", "--position", "70",
                                   "--out", str(tmp_path / "c.json")])


def test_an_exported_head_on_its_target(tmp_path):
    from compress.draft.selfspec.head import eos_ids, trimmed_vocabulary
    from compress.models import load_model
    from tests.test_selfspec import _export, _head
    from tests.tiny import tiny_model_dir
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    target = load_model(mdir).model
    vocab = trimmed_vocabulary([list(range(32, 127))], 64, vocab_size=264, always=eos_ids(target))
    out = _export(mdir, target, _head(target, 2, vocab, "deep"), tmp_path / "drafter", "k2", 2)
    res = self_spec_draft_cost.main(["--target", str(mdir), "--self-spec", str(out), "--device", "cpu",
                                     "--dtype", "float32", "--max-len", "64", "--position", "20", "--repeats", "1",
                                     "--replays", "1", "--out", str(tmp_path / "c.json")])
    assert res["exit_layer"] == 2 and res["context"] == "deep" and res["vocab"] == vocab.numel() < 264
    assert "fuse" in res["us"] and res["draft_parts_sum_us"] > 0
