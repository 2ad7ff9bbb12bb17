"""Tree drafting with deep-context exit heads (compress/draft/selfspec/tree.py on a deep SelfSpecPair):
exactness, the chain tree = the linear deep round (tokens and drafts), every node against the head run by
hand along its path, and the shallow-pass counts."""

import pytest
import torch

from compress.draft import run_speculative, target_generate
from compress.draft.engine import BlockEngine
from compress.draft.selfspec.head import forward_with_final
from compress.draft.selfspec.pair import SelfSpecPair
from compress.draft.selfspec.tree import DEFAULT_TREE, DraftTree
from tests.test_selfspec import NEW, _prompts, _target
from tests.test_selfspec_deep_pair import _deep_head, _Recorder, _unrolled_logits, greedy_cases

CHAIN = ((0,), (0, 0), (0, 0, 0))
SMALL = ((0,), (1,), (0, 0), (0, 1), (0, 0, 0))
WIDE = CHAIN + ((1,), (2,), (0, 1), (1, 0), (1, 1), (0, 0, 1), (1, 0, 0))


def _deep_tree_pair(model, k, tree, vocab=None, scale=1e-3, seed=0):
    head = _deep_head(model, k, vocab, scale, seed)
    return SelfSpecPair(BlockEngine(model, 160, fuse=False), head, tree=tree), head


def _record_tree_rounds(pair):
    """Wrap the drafter's draft_tree: each round's (root position, node tokens [N])."""
    rounds, inner = [], pair.drafter.draft_tree

    def draft_tree(feed):
        root = pair.drafter.length + feed.numel() - 1
        nodes = inner(feed)
        rounds.append((root, nodes.tolist()))
        return nodes

    pair.drafter.draft_tree = draft_tree
    return rounds


def node_inputs(tree, seq: torch.Tensor, root: int, nodes: list[int]):
    """Per node of a round rooted at ``root``: (node, the committed prefix up to the root + its ancestors'
    tokens, its depth, its rank) — what the head run by hand reads to draft it."""
    for i in range(tree.size):
        path, j = [], tree.parent[i]
        while j >= 0:
            path.insert(0, nodes[j])
            j = tree.parent[j]
        yield i, torch.cat([seq[:root + 1], torch.tensor(path, dtype=seq.dtype)]), tree.depth[i], tree.rank[i]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_deep_head_tree_drafting_is_token_identical_to_the_targets_greedy_output(arch):
    model = _target(arch)
    for prompt, want, vocab in greedy_cases(model):
        for k in (0, 1, 2):
            for tree in ("default", SMALL, WIDE):
                for vmap in (None, vocab):
                    pair, _ = _deep_tree_pair(model, k, tree, vmap)
                    depth = pair.tree.max_depth
                    got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=depth,
                                          tree=True)
                    assert got.tokens.tolist() == want, (k, tree, vmap is None)
                    assert got.new_tokens == NEW and len(got.drafted) == depth
                    assert sum(got.accepted) + got.target_calls >= NEW


def test_a_one_token_prompt_drafts_a_deep_tree_from_position_zero():
    model = _target("llama")
    pair, _ = _deep_tree_pair(model, 2, "default")
    one = _prompts()[1][:1]
    want = target_generate(model, one, NEW).tokens.tolist()
    assert run_speculative(pair.target, pair.drafter, one, max_new_tokens=NEW, gamma=4, tree=True).tokens.tolist() \
        == want


@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_chain_tree_with_a_deep_head_is_the_linear_deep_round(k):
    """Same tokens, same rounds and the same drafted tokens per round: the chain is the linear round
    (γ = its depth), so the deep recurrence (the root reads the target's final state, each node its
    parent's head state, accepted nodes' head state recomputed from the target's) must be the same."""
    model = _target("qwen2")
    depth = len(CHAIN)
    compared = 0
    for prompt in _prompts():
        for scale in (1e-3, 3e-4):
            linear_pair, _ = _deep_tree_pair(model, k, None, scale=scale)
            drafter = _Recorder(linear_pair.drafter)
            linear = run_speculative(linear_pair.target, drafter, prompt, max_new_tokens=NEW, gamma=depth,
                                     pad_verify=True)
            pair, _ = _deep_tree_pair(model, k, CHAIN, scale=scale)
            rounds = _record_tree_rounds(pair)
            chain = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=depth, tree=True)
            assert chain.tokens.tolist() == linear.tokens.tolist()
            assert chain.target_calls == linear.target_calls == len(rounds) == len(drafter.rounds)
            for (root, nodes), (start, drafts) in zip(rounds, drafter.rounds):
                # the linear round drafts fewer near the end (never past it); the chain always its depth
                assert root == start and nodes[:len(drafts)] == drafts, (scale, root)
                compared += len(drafts)
    assert compared > 0


@pytest.mark.parametrize("k", [0, 1, 2])
def test_every_deep_tree_node_is_the_heads_choice_along_its_path(k):
    """Node i at depth d and rank r after the root at position R: the r-th choice of the head run by hand
    (``ExitHead.forward_unrolled``, step d) at position R + d − 1 on the committed prefix up to R followed by
    the tokens of i's ancestors — the root reads the target's final state, every node its parent's own."""
    model = _target("llama")
    tree = DraftTree(WIDE)
    checked = [0] * (tree.max_depth + 1)
    accepted = 0
    for prompt in _prompts():
        pair, head = _deep_tree_pair(model, k, WIDE)
        rounds = _record_tree_rounds(pair)
        res = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=tree.max_depth, tree=True)
        accepted += sum(res.accepted)
        seq = torch.cat([prompt, res.tokens])
        for root, nodes in rounds:
            for i, inputs, d, rank in node_inputs(tree, seq, root, nodes):
                logits = _unrolled_logits(model, head, inputs, d)[d - 1][root + d - 1]
                want = int(head.vocab_map[logits.topk(rank + 1).indices[rank]])
                assert nodes[i] == want, (root, i, d, rank)
                checked[d] += 1
    assert all(n > 0 for n in checked[1:]), checked
    if k == 2:  # accepted nodes' head state is recomputed in later rounds, and checked there
        assert accepted > 0


def test_deep_tree_rounds_run_each_shallow_row_once():
    """Drafting runs the shallow blocks on the root and every node with children, verification on the
    deepest nodes only; the head's catch-up over accepted nodes reruns none."""
    model = _target("llama")
    for tree in ("default", SMALL):
        pair, _ = _deep_tree_pair(model, 2, tree)
        buf = pair.tree_buf
        prompt = _prompts()[0]
        res = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=buf.max_depth, tree=True)
        assert sum(res.accepted) > 0
        inner = sum(r.numel() for r in buf.rows[1:-1])
        assert pair.shallow_rows["drafter"] == prompt.numel() - 1 + res.target_calls * (1 + inner)
        assert pair.shallow_rows["verifier"] == res.target_calls * buf.rows[-1].numel()


def test_a_deep_tree_writes_the_targets_final_states_at_the_committed_positions():
    """After a run every committed position's row of ``final`` holds the target's final-normed state
    (copied from the scratch rows for accepted nodes), as the next round's root reads it."""
    model = _target("llama")
    pair, _ = _deep_tree_pair(model, 2, "default")
    prompt = _prompts()[0]
    res = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=4, tree=True)
    assert sum(res.accepted) > 0
    seq = torch.cat([prompt, res.tokens])
    with torch.no_grad():
        _, final = forward_with_final(model, input_ids=seq[None])
    n = pair.deep_len
    assert n >= seq.numel() - 1 - 4
    torch.testing.assert_close(pair.final[:n], final[0, :n], atol=1e-4, rtol=1e-4)


def test_the_default_tree_takes_a_deep_head():
    model = _target("llama")
    pair, _ = _deep_tree_pair(model, 1, "default")
    assert pair.deep and pair.tree.choices == DraftTree(DEFAULT_TREE).choices
