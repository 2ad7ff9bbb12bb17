"""bench/self_spec_profile.py on the CPU: the loop's spans become profiler ranges, one per call, so a
GPU run can split each round's kernels between drafting and verification (no kernels on the CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

from compress.draft import loop
from compress.draft.selfspec.head import eos_ids, trimmed_vocabulary
from tests.test_selfspec import _export, _head
from tests.tiny import tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import self_spec_profile  # noqa: E402


def test_profile_has_one_range_per_loop_span_and_restores_the_clock(tmp_path):
    from compress.models import load_model
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    target = load_model(mdir).model
    vocab = trimmed_vocabulary([list(range(32, 127))], 64, vocab_size=264, always=eos_ids(target))
    out = _export(mdir, target, _head(target, 2, vocab, "deep"), tmp_path / "drafter", "k2", 2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    real = loop.RoundClock
    res = self_spec_profile.main(["--target", str(mdir), "--self-spec", str(out), "--prompts", str(prompts),
                                  "--gamma", "2", "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32",
                                  "--out", str(tmp_path / "p.json")])
    assert loop.RoundClock is real
    spans = res["spans"]
    assert res["prompts"] == 2 and res["context"] == "deep" and res["new_tokens"] == 24
    assert spans["prefill"]["calls"] == 3  # two speculative runs and the target-alone one
    assert spans["verify"]["calls"] == spans["draft"]["calls"] == res["rounds"] > 0
    assert all(s["host_us_per_call"] > 0 for s in spans.values())
    assert (tmp_path / "p.json").is_file()
    assert spans["target"]["calls"] == 12  # one target-alone decode step per new token
    assert res["timed"]["target_step_ms"] > 0 and res["timed"]["c"] > 0


def test_profile_on_random_weights_of_a_shape_needs_no_export(tmp_path):
    res = self_spec_profile.main(["--target", "random:tiny", "--context", "deep", "--exit-layer", "2",
                                  "--gamma", "2", "--max-new-tokens", "8", "--device", "cpu",
                                  "--out", str(tmp_path / "p.json")])
    assert res["context"] == "deep" and res["exit_layer"] == 2 and res["prompts"] == 2
    assert res["spans"]["draft"]["calls"] == res["rounds"] > 0
    assert res["timed"]["tau"] >= 1
