"""Tree drafting for the self-drafter (compress/draft/selfspec/tree.py): the tree, the greedy path,
exactness against the target's own greedy output, and the chain tree = the linear round."""
import copy

import pytest
import torch

from compress.draft import run_speculative, run_target, target_generate
from compress.draft.engine import BlockEngine
from compress.draft.selfspec.head import ExitHead, trimmed_vocabulary
from compress.draft.selfspec.pair import SelfSpecPair
from compress.draft.selfspec.tree import DEFAULT_TREE, DraftTree, accept_path
from compress.errors import CompressError
from tests.test_selfspec import EOS, NEW, _head, _prompts, _target
from tests.tiny import TINY_ARCHS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CHAIN = ((0,), (0, 0), (0, 0, 0))


def _tree_pair(model, k, tree, vocab=None, **kw):
    vmap = torch.arange(model.lm_head.weight.shape[0]) if vocab is None else vocab
    return SelfSpecPair(BlockEngine(model, 160, fuse=False, **kw), ExitHead(model, k, vmap), tree=tree)


def test_the_tree_orders_nodes_and_knows_parents_depths_and_choices():
    tree = DraftTree(((0, 1), (1,), (0,), (0, 0), (0, 0, 2), (0, 0, 0), (0, 0, 1)))
    assert tree.choices[:3] == ((0,), (1,), (0, 0))
    assert tree.parent == [-1, -1, 0, 0, 2, 2, 2] and tree.depth == [1, 1, 2, 2, 3, 3, 3]
    assert [tree.topk(d) for d in range(4)] == [2, 2, 3, 0]
    anc = tree.ancestors()
    assert anc[6].tolist() == [True, False, True, False, False, False, True]
    with pytest.raises(CompressError, match=r"no parent \[1\]"):
        DraftTree(((0,), (1, 0)))
    with pytest.raises(CompressError, match="at least one node"):
        DraftTree(())


def test_the_accepted_path_follows_the_targets_tokens_through_any_rank():
    tree = DraftTree(((0,), (1,), (1, 0), (1, 1), (1, 1, 0)))
    nodes = [7, 8, 9, 10, 11]  # (0,)=7 (1,)=8 (1,0)=9 (1,1)=10 (1,1,0)=11
    # target: after root 8 (the second choice), after (1,) 10, after (1,1) 11, after (1,1,0) 5
    assert accept_path(tree, nodes, [8, 0, 10, 0, 11, 5]) == ([1, 3, 4], 5)
    assert accept_path(tree, nodes, [3, 0, 0, 0, 0, 0]) == ([], 3)
    assert accept_path(tree, nodes, [7, 4, 0, 0, 0, 0]) == ([0], 4)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tree_drafting_is_token_identical_to_the_targets_greedy_output(arch):
    model = _target(arch)
    for prompt in _prompts():
        want = target_generate(model, prompt, NEW).tokens.tolist()
        for k in (1, 2):
            for vocab in (None, trimmed_vocabulary([want], 40, vocab_size=264, always=[EOS])):
                pair = _tree_pair(model, k, "default", vocab)
                got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=4, tree=True)
                assert got.tokens.tolist() == want, (k, vocab is None)
                assert got.new_tokens == NEW and len(got.drafted) == 4
                # the path's tokens plus the target's own one per round
                assert sum(got.accepted) + got.target_calls >= NEW


def test_the_last_block_as_exit_head_accepts_the_whole_depth_every_round():
    model = _target("llama")
    pair = _tree_pair(model, 2, "default")
    res = run_speculative(pair.target, pair.drafter, _prompts()[0], max_new_tokens=NEW, gamma=4, tree=True)
    depth = DraftTree(DEFAULT_TREE).max_depth
    assert res.acceptance_rate == 1.0 and res.target_calls == -(-NEW // (depth + 1))


def test_a_chain_tree_is_the_linear_round():
    model = _target("qwen2")
    prompt = _prompts()[1]
    linear_pair = _tree_pair(model, 1, None)
    linear = run_speculative(linear_pair.target, linear_pair.drafter, prompt, max_new_tokens=NEW, gamma=3)
    pair = _tree_pair(model, 1, CHAIN)
    chain = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=3, tree=True)
    assert chain.tokens.tolist() == linear.tokens.tolist()
    assert chain.target_calls == linear.target_calls and chain.accepted == linear.accepted


def test_a_wider_tree_accepts_at_least_as_much_as_its_chain():
    model = _target("llama")
    prompt = _prompts()[0]
    res = {}
    for name, tree in (("chain", CHAIN), ("wide", CHAIN + ((1,), (2,), (0, 1), (1, 0), (0, 0, 1)))):
        pair = _tree_pair(model, 1, tree)
        res[name] = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=3, tree=True)
    assert res["wide"].tokens.tolist() == res["chain"].tokens.tolist()
    assert res["wide"].target_calls <= res["chain"].target_calls


def test_tree_drafting_refuses_what_it_cannot_do():
    model = _target("llama")
    pair = _tree_pair(model, 1, None)
    with pytest.raises(CompressError, match="built with a draft tree"):
        run_speculative(pair.target, pair.drafter, _prompts()[0], max_new_tokens=4, gamma=3, tree=True)
    pair = _tree_pair(model, 1, "default")
    with pytest.raises(CompressError, match="greedy"):
        run_speculative(pair.target, pair.drafter, _prompts()[0], max_new_tokens=4, gamma=3, tree=True,
                        mode="sample")
    with pytest.raises(CompressError, match="context"):  # the scratch slots are not the sequence's
        run_speculative(pair.target, pair.drafter, torch.arange(140) % 200, max_new_tokens=12, gamma=3, tree=True)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("context, k", [("shallow", 1), ("deep", 2), ("deep", 0)])
def test_gpu_compiled_graphs_tree_drafting_matches_the_target(arch, context, k):
    """bf16, compiled layers, CUDA graphs (a deep head's final-state reads and writes record too)."""
    model = copy.deepcopy(_target(arch)).to("cuda", torch.bfloat16)
    vocab = trimmed_vocabulary([list(range(40, 120))], 64, vocab_size=264, always=[EOS])
    head = _head(model, k, vocab, context).cuda()
    pair = SelfSpecPair(BlockEngine(model, 160, compile=True), head, graphs=True, tree="default")
    for prompt in _prompts():
        prompt = prompt.cuda()
        ref = run_target(pair.target, prompt, NEW, pad_to=len(DEFAULT_TREE) + 1).tokens.tolist()
        got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=4, tree=True)
        # the tree's rows run other shapes than the padded reference's in the shallow blocks, so a
        # bf16 near-tie may flip: identity is measured by the bench; here the first tokens must agree
        assert got.tokens.tolist()[:8] == ref[:8]
    assert pair.graphs.enabled and pair.graphs.error is None


def test_the_side_by_side_bench_runs_tree_rows(tmp_path, text_file):
    """bench/self_spec_bench.py on a tiny export, CPU: its rows and their fields, not their speed."""
    import importlib.util
    import json
    from pathlib import Path

    from tests.test_selfspec import _self_spec_export
    mdir, out, _ = _self_spec_export(tmp_path, text_file, "llama")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    spec = importlib.util.spec_from_file_location("ssb", Path(__file__).parents[1] / "bench" / "self_spec_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res_path = tmp_path / "r.json"
    assert bench.main(["--target", mdir, "--self-spec", str(out), "--heads", "k2", "--prompts", str(prompts),
                       "--gamma", "3", "--max-new-tokens", "10", "--device", "cpu", "--dtype", "float32",
                       "--tree", "[[0],[1],[0,0],[0,1],[0,0,0]]", "--tree", "default", "--untrimmed",
                       "--also-gamma", "2", "--repeats", "2", "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    rows = res["sets"]["prompts"]["rows"]
    assert res["repeats"] == 2
    other = next(r for r in rows if r["row"] == "self k2 gamma=2")  # the same head at another draft length
    assert other["gamma"] == 2 and len(other["speculative"]["drafted"]) == 2 and other["identical_prompts"] == 2
    full = next(r for r in rows if r["row"] == "self k2 untrimmed")  # the same head over every LM row
    trimmed = next(r for r in rows if r["row"] == "self k2")
    assert full["vocab_size"] == 264 > trimmed["vocab_size"] and full["identical_prompts"] == 2
    tree_rows = [r for r in rows if r["row"].startswith("self k2 tree")]  # two trees of other sizes, one engine
    assert [r["tree"] for r in tree_rows] == [[[0], [1], [0, 0], [0, 1], [0, 0, 0]],
                                              [list(c) for c in DraftTree(DEFAULT_TREE).choices]]
    for tree_row in tree_rows:
        assert tree_row["identical_prompts"] == 2
        assert tree_row["speculative"]["tau"] >= 1 and set(tree_row["time_split"]) >= {"draft", "verify"}


def test_cli_draft_bench_drafts_a_tree_with_a_self_spec_export(tmp_path, text_file, capsys):
    import json

    from compress.cli import main
    from tests.test_selfspec import _self_spec_export
    mdir, out, _ = _self_spec_export(tmp_path, text_file, "qwen2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    def args(tree):
        return ["draft-bench", "--target", mdir, "--drafter", str(out), "--prompts", str(prompts), "--tree", tree,
                "--max-new-tokens", "12", "--device", "cpu", "--head", "k1"]
    assert main(args("default")) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["self_spec"]["tree"] == [list(c) for c in DraftTree(DEFAULT_TREE).choices]
    assert res["gamma"] == 4 and res["identical_prompts"] == 2 and res["matched_reference"]["pad_to"] == 12
    assert main(args("[[0, 1]]")) == 2
    assert "no parent [0]" in capsys.readouterr().err
    assert main(args("[0, 1")) == 2
    assert "--tree '[0, 1'" in capsys.readouterr().err


def test_acceptance_on_the_device_is_the_host_walk():
    from compress.draft.selfspec.tree import TreeBuffers, accept_on_device
    tree = DraftTree(DEFAULT_TREE)
    buf = TreeBuffers(tree, 64, "cpu")
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        # few distinct tokens, so paths of every length occur; siblings kept distinct, as top-k makes them
        nodes = torch.randint(0, 4, (tree.size,), generator=gen)
        for i in range(tree.size):
            sibs = [j for j in range(i) if tree.parent[j] == tree.parent[i]]
            while int(nodes[i]) in [int(nodes[j]) for j in sibs]:
                nodes[i] = (nodes[i] + 1) % 4
        want = torch.randint(0, 4, (tree.size + 1,), generator=gen)
        path, nxt = accept_path(tree, nodes.tolist(), want.tolist())
        m, chosen, got_next = accept_on_device(buf, nodes, want)
        assert int(m) == len(path) and int(got_next) == nxt
        assert chosen.tolist()[:len(path)] == path
        assert [tree.depth[c] for c in chosen.tolist()] == list(range(1, tree.max_depth + 1))
