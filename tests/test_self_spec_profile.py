"""bench/self_spec_profile.py on the CPU: the loop's spans become profiler ranges, one per call, so a
GPU run can split each round's kernels between drafting and verification (no kernels on the CPU)."""
from __future__ import annotations

import sys
from pathlib import Path

from compress.draft import loop
from compress.draft.selfspec.head import FORMAT, eos_ids, target_fingerprint, trimmed_vocabulary, write_manifest
from tests.test_selfspec import _head
from tests.tiny import tiny_model_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import self_spec_profile  # noqa: E402


def test_profile_has_one_range_per_loop_span_and_restores_the_clock(tmp_path):
    from compress.models import load_model
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    target = load_model(mdir).model
    out = tmp_path / "drafter"
    out.mkdir()
    vocab = trimmed_vocabulary([list(range(32, 127))], 64, vocab_size=264, always=eos_ids(target))
    _head(target, 2, vocab, "deep").save_as(out, "head-k2.safetensors")
    write_manifest(out, {"format": FORMAT, "target": {"source": str(mdir), **target_fingerprint(target)},
                         "heads": {"k2": {"exit_layer": 2, "vocab_size": 64, "context": "deep",
                                          "file": "head-k2.safetensors"}},
                         "default": "k2", "gamma": 2, "confidence_threshold": None})
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    real = loop.RoundClock
    res = self_spec_profile.main(["--target", str(mdir), "--self-spec", str(out), "--prompts", str(prompts),
                                  "--gamma", "2", "--max-new-tokens", "12", "--device", "cpu", "--dtype", "float32",
                                  "--out", str(tmp_path / "p.json")])
    assert loop.RoundClock is real
    spans = res["spans"]
    assert res["prompts"] == 2 and res["context"] == "deep" and res["new_tokens"] == 24
    assert spans["prefill"]["calls"] == 2
    assert spans["verify"]["calls"] == spans["draft"]["calls"] == res["rounds"] > 0
    assert all(s["host_us_per_call"] > 0 for s in spans.values())
    assert (tmp_path / "p.json").is_file()
