"""Deep-context exit heads on the self-drafter pair (linear rounds): exactness, the drafts against the
teacher-forced unrolled recurrence, shallow-pass reuse, loading, and that a draft tree takes one
(tests/test_selfspec_deep_tree.py checks deep trees in depth)."""
import json

import pytest
import torch

from compress.cli import main
from compress.draft import run_speculative, run_target, target_generate
from compress.draft.engine import BlockEngine
from compress.draft.selfspec.head import HeadAsModel, eos_ids, forward_with_final, trimmed_vocabulary
from compress.draft.selfspec.pair import SelfSpecPair
from tests.test_selfspec import EOS, NEW, _export, _head, _prompts, _target
from tests.tiny import tiny_model_dir


def _deep_head(model, k, vocab=None, scale=1e-3, seed=0):
    return _head(model, k, vocab, "deep", scale, seed)


def _deep_pair(model, k, vocab=None, scale=1e-3):
    head = _deep_head(model, k, vocab, scale)
    return SelfSpecPair(BlockEngine(model, 128, fuse=False), head), head


class _Recorder:
    """A drafter that records each round: (position of the round's first head step, drafted tokens)."""

    def __init__(self, inner):
        self.inner, self.rounds = inner, []
        self.device, self.context = inner.device, inner.context

    @property
    def length(self):
        return self.inner.length

    def prefill(self, ids):
        self.inner.prefill(ids)

    def draft(self, feed, budget, rule):
        start = self.inner.length + feed.numel() - 1  # the newest committed token's position
        tokens, q = self.inner.draft(feed, budget, rule)
        self.rounds.append((start, tokens.tolist()))
        return tokens, q

    def rewind(self, n):
        self.inner.rewind(n)

    def reset(self):
        self.inner.reset()
        self.rounds = []


def _unrolled_logits(model, head, seq: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Teacher-forced trimmed logits [steps][T, N] on ``seq`` with the target's own final-normed states
    (the final norm's output, hooked)."""
    with torch.no_grad():
        out, final = forward_with_final(model, input_ids=seq[None], output_hidden_states=True)
        h = out.hidden_states[head.exit_layer]
        cos, sin = model.model.rotary_emb(h, torch.arange(seq.numel())[None])
        return [o[0] for o in head.forward_unrolled(h, cos[0], sin[0], final, steps)]


def _unrolled_drafts(model, head, seq: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The drafts (vocabulary ids) [steps][T] of ``_unrolled_logits``."""
    return [head.vocab_map[o.argmax(-1)] for o in _unrolled_logits(model, head, seq, steps)]


def greedy_cases(model):
    """Per test prompt: (prompt, the target's own greedy tokens, a 40-id trimmed vocabulary of them)."""
    for prompt in _prompts():
        want = target_generate(model, prompt, NEW).tokens.tolist()
        yield prompt, want, trimmed_vocabulary([want], 40, vocab_size=264, always=[EOS])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_deep_head_greedy_is_token_identical_for_every_depth_gamma_vocab_and_stop(arch):
    model = _target(arch)
    for prompt, want, vocab in greedy_cases(model):
        for k in (0, 1, 2):  # 0: no shared block, the head reads the token's embedding (EAGLE's head)
            for vmap in (None, vocab):
                pair, _ = _deep_pair(model, k, vmap)
                for gamma in (1, 2, 3, 4):
                    assert run_target(pair.target, prompt, NEW, pad_to=gamma + 1).tokens.tolist() == want
                    for threshold in (None, 0.5):
                        got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=gamma,
                                              confidence_threshold=threshold, pad_verify=True)
                        assert got.tokens.tolist() == want, (k, vmap is None, gamma, threshold)
                        assert sum(got.accepted) + got.target_calls == NEW
                assert pair.drafter.rounds_fused > 0


def test_deep_head_sampling_runs_and_a_one_token_prompt_works():
    model = _target("llama")
    pair, _ = _deep_pair(model, 2)
    prompt = _prompts()[1]
    for seed in range(3):
        res = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=3, mode="sample",
                              top_p=0.9, seed=seed)
        assert 1 <= res.tokens.numel() <= NEW and res.target_calls >= 1
    # no prefill at all: the first draft step is at position 0 and reads the zero state
    one = prompt[:1]
    want = target_generate(model, one, NEW).tokens.tolist()
    for threshold in (None, 0.5):
        got = run_speculative(pair.target, pair.drafter, one, max_new_tokens=NEW, gamma=3,
                              confidence_threshold=threshold, pad_verify=True)
        assert got.tokens.tolist() == want


@pytest.mark.parametrize("k", [0, 1, 2])
def test_deep_drafts_equal_the_unrolled_teacher_forced_recurrence(k):
    """The decisive check: a round begun at position r (the newest committed token) drafts, at step s,
    the unrolled forward's step-s argmax at position r + s − 1 on the sequence (committed prefix up to r
    + the round's own drafts), with the target's final states. Step 1 reads the target's final state of
    r − 1, steps ≥ 2 the head's own states, and every committed position's head KV must come from the
    target's states — including drafts accepted in earlier rounds (recomputed after verification).
    Every round and every step is checked, accepted or not: the drafts are the round's own inputs."""
    model = _target("llama")
    gamma = 4
    checked = {s: 0 for s in range(1, gamma + 1)}
    accepted = 0
    for scale in (1e-3, 3e-4):
        pair, head = _deep_pair(model, k, scale=scale)
        drafter = _Recorder(pair.drafter)
        for prompt in _prompts():
            for threshold in (None, 0.0):  # the fused round graph and the by-steps path
                res = run_speculative(pair.target, drafter, prompt, max_new_tokens=NEW, gamma=gamma,
                                      confidence_threshold=threshold, pad_verify=True)
                accepted += sum(res.accepted)
                seq = torch.cat([prompt, res.tokens])
                assert drafter.rounds
                for start, drafts in drafter.rounds:
                    if not drafts:
                        continue
                    inputs = torch.cat([seq[:start + 1], torch.tensor(drafts[:-1], dtype=seq.dtype)])
                    want = _unrolled_drafts(model, head, inputs, len(drafts))
                    for s, tok in enumerate(drafts, 1):
                        assert tok == int(want[s - 1][start + s - 1]), (scale, threshold, start, s)
                        checked[s] += 1
    assert all(n > 0 for n in checked.values()), checked
    if k == 2:  # a near-copy of the target: accepted drafts' head state is recomputed in later rounds
        assert accepted > 0


def test_tree_drafting_takes_a_deep_head():
    """Formerly refused; tests/test_selfspec_deep_tree.py checks deep trees in depth."""
    model = _target("llama")
    head = _deep_head(model, 1)
    pair = SelfSpecPair(BlockEngine(model, 128, fuse=False), head, tree="default")
    assert pair.deep and pair.tree is not None
    prompt = _prompts()[0]
    want = target_generate(model, prompt, NEW).tokens.tolist()
    got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=4, tree=True)
    assert got.tokens.tolist() == want


def test_head_as_model_scores_a_deep_head_with_the_targets_final_states():
    model = _target("llama")
    head = _deep_head(model, 2)
    seq = _prompts()[0]
    full = HeadAsModel(model, head)(seq[None]).logits[0]
    assert torch.equal(head.vocab_map[full[:, head.vocab_map].argmax(-1)], _unrolled_drafts(model, head, seq, 1)[0])


def test_cli_draft_bench_with_a_deep_head_export(tmp_path, capsys):
    from compress.models import load_model
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    target = load_model(mdir).model
    head = _deep_head(target, 2, trimmed_vocabulary([list(range(32, 127))], 64, vocab_size=264, always=eos_ids(target)))
    out = _export(mdir, target, head, tmp_path / "drafter", "k2d", 3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    args = ["draft-bench", "--target", mdir, "--drafter", str(out), "--prompts", str(prompts), "--gamma", "3",
            "--max-new-tokens", "12", "--device", "cpu"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["self_spec"]["head"] == "k2d" and res["identical"] and res["identical_prompts"] == 2
    assert main([*args, "--tree", "default"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["self_spec"]["head"] == "k2d" and res["identical"] and res["identical_prompts"] == 2
    assert res["self_spec"]["tree"] and res["gamma"] == 4
