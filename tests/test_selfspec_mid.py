"""Deep heads with a mid layer (they also read the target's state after block m of the previous position):
the unrolled forward against a round built by hand, the pair's drafts against it, exactness, trees, files,
the recipe and bad input."""
import json

import pytest
import torch
import torch.nn.functional as F

from compress.draft import run_speculative, target_generate
from compress.draft.engine import BlockEngine
from compress.draft.selfspec.head import ExitHead, forward_with_final, trimmed_vocabulary
from compress.draft.selfspec.pair import SelfSpecPair
from compress.errors import CompressError, RecipeError
from tests.test_selfspec import EOS, NEW, _prompts, _target
from tests.test_selfspec_deep import check_round_by_round
from tests.test_selfspec_deep_pair import _Recorder
from tests.tiny import tiny_model, tiny_model_dir

MID = 2  # the tiny models have 3 blocks: exit after block 1, mid state after block 2


def _mid_head(model, scale=1e-3, seed=0, vocab=None):
    """A deep head after block 1 reading block 2's state, both maps random (a zero map would hide mistakes)."""
    torch.manual_seed(seed)
    vmap = torch.arange(model.lm_head.weight.shape[0]) if vocab is None else vocab
    head = ExitHead(model, 1, vmap, context="deep", mid_layer=MID)
    with torch.no_grad():
        head.wf.normal_(0, scale)
        head.wm.normal_(0, 30 * scale)  # the normed mid state is ~1 per channel, like the final state
    return head


def _states(model, ids: torch.Tensor):
    with torch.no_grad():
        out, final = forward_with_final(model, input_ids=ids, output_hidden_states=True)
    h, mid = out.hidden_states[1], out.hidden_states[MID]
    cos, sin = model.model.rotary_emb(h, torch.arange(ids.shape[1])[None])
    return h, mid, final, cos[0], sin[0]


def test_unrolled_steps_read_the_mid_state_at_the_first_draft_only():
    """Step 1 at p reads the target's final and mid states of p − 1; step s ≥ 2 the head's own state of the
    draft before and no mid state (a draft has none) — built round by round the slow way."""
    model = tiny_model("llama")
    head = _mid_head(model, scale=0.05)
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(1))
    h, mid, final, cos, sin = _states(model, ids)
    got = head.forward_unrolled(h, cos, sin, final, 3, mid=mid)
    shift = lambda z: F.pad(z[:, :-1], (0, 0, 1, 0))  # noqa: E731
    first = head.fuse(h, shift(final), shift(head.mid_state(mid)))  # later drafts: fuse(h, own state), no mid
    assert check_round_by_round(head, got, h, first, cos, sin) == 2 * h.shape[1] - 3
    # the mid term counts: without it step 1 differs; with a zero map the head is the plain deep head
    deep = ExitHead(model, 1, head.vocab_map, context="deep")
    with torch.no_grad():
        deep.load_state_dict({k: v for k, v in head.state_dict().items() if k != "wm"}, strict=False)
    assert not torch.allclose(deep.forward_sequence(h, cos, sin, final), got[0], atol=1e-4)
    with torch.no_grad():
        head.wm.zero_()
    assert torch.allclose(head.forward_sequence(h, cos, sin, final, mid), deep.forward_sequence(h, cos, sin, final),
                          atol=1e-6)


def _unrolled_drafts(model, head, seq: torch.Tensor, steps: int) -> list[torch.Tensor]:
    h, mid, final, cos, sin = _states(model, seq[None])
    return [head.vocab_map[o[0].argmax(-1)] for o in head.forward_unrolled(h, cos, sin, final, steps, mid=mid)]


def test_the_pairs_drafts_equal_the_unrolled_recurrence():
    """As tests/test_selfspec_deep_pair.py checks for deep heads: every round's drafts, fused graph and
    by-steps paths, equal the unrolled forward's on the committed prefix + the round's own drafts."""
    model = _target("llama")
    gamma, checked = 4, 0
    head = _mid_head(model)
    pair = SelfSpecPair(BlockEngine(model, 128, fuse=False), head)
    assert pair.mid is not None
    drafter = _Recorder(pair.drafter)
    for prompt in _prompts():
        for threshold in (None, 0.0):
            res = run_speculative(pair.target, drafter, prompt, max_new_tokens=NEW, gamma=gamma,
                                  confidence_threshold=threshold, pad_verify=True)
            seq = torch.cat([prompt, res.tokens])
            for start, drafts in drafter.rounds:
                if drafts:
                    inputs = torch.cat([seq[:start + 1], torch.tensor(drafts[:-1], dtype=seq.dtype)])
                    want = _unrolled_drafts(model, head, inputs, len(drafts))
                    for s, tok in enumerate(drafts, 1):
                        assert tok == int(want[s - 1][start + s - 1]), (threshold, start, s)
                        checked += 1
    assert checked > 20


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_mid_head_is_token_identical_in_rounds_and_trees(arch):
    model = _target(arch)
    for prompt in _prompts():
        want = target_generate(model, prompt, NEW).tokens.tolist()
        vocab = trimmed_vocabulary([want], 40, vocab_size=264, always=[EOS])
        for vmap in (None, vocab):
            pair = SelfSpecPair(BlockEngine(model, 128, fuse=False), _mid_head(model, vocab=vmap))
            for gamma in (1, 3):
                for threshold in (None, 0.5):
                    got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=gamma,
                                          confidence_threshold=threshold, pad_verify=True)
                    assert got.tokens.tolist() == want, (vmap is None, gamma, threshold)
        tree = SelfSpecPair(BlockEngine(model, 128, fuse=False), _mid_head(model), tree="default")
        got = run_speculative(tree.target, tree.drafter, prompt, max_new_tokens=NEW, gamma=4, tree=True)
        assert got.tokens.tolist() == want


def test_mid_heads_round_trip_through_files_and_refuse_bad_input(tmp_path):
    model = tiny_model("llama")
    head = _mid_head(model, scale=0.05)
    head.save_as(tmp_path, "head.safetensors", dtype=torch.float32)
    back = ExitHead.load(model, tmp_path / "head.safetensors", 1, None, "deep", MID)
    assert back.mid_layer == MID and torch.equal(back.wm, head.wm)
    assert back.with_vocabulary(model, torch.arange(264)).mid_layer == MID
    with pytest.raises(CompressError, match="the manifest gives mid_layer None, the file has its map"):
        ExitHead.load(model, tmp_path / "head.safetensors", 1, None, "deep")
    ids = torch.randint(0, 200, (1, 6))
    h, mid, final, cos, sin = _states(model, ids)
    with pytest.raises(CompressError, match="needs the target's states after that block"):
        head.forward_sequence(h, cos, sin, final)
    vmap = head.vocab_map
    for k, m, context in ((1, 1, "deep"), (1, 3, "deep"), (1, 2, "shallow"), (2, 2, "deep")):
        with pytest.raises(CompressError, match="mid_layer must be an integer in"):
            ExitHead(model, k, vmap, context=context, mid_layer=m)


def _recipe(mdir, text_file, **step):
    return {"version": 1, "model": {"id": mdir, "device": "cpu"}, "stages": [{"name": "draft", "steps": [
        {"algorithm": "self_spec", "exit_layers": [1], "vocab_size": 64, "context": "deep", "unroll": 2,
         "gammas": [1, 2], "train_corpora": [text_file], "train_windows": 8, "eval_windows": 4, "seq_len": 32,
         "steps": 3, "batch_size": 2, "lr": 1e-3, "eval_generations": False, **step}]}],
        "export": {"format": "self-spec"}}


def test_recipe_trains_a_mid_head_beside_the_deep_one(tmp_path, text_file):
    from compress.draft.selfspec.step import load_self_spec
    from compress.models import load_model
    from compress.pipeline import run_recipe
    from compress.recipe import validate_recipe
    mdir = tiny_model_dir(tmp_path / "tiny", "qwen2")
    result = run_recipe(validate_recipe(_recipe(mdir, text_file, mid_layers=[1], mid_depth=MID)),
                        out_dir=tmp_path / "drafter", progress=False, log=lambda *_: None)
    step = result.report["stages"][0]["steps"][0]
    assert set(step["depth_curve"]) == {"k1", "k1-mid"} and step["default"] == "k1"  # compared, never chosen
    manifest = json.loads((tmp_path / "drafter" / "self_spec.json").read_text())
    assert manifest["heads"]["k1-mid"]["mid_layer"] == MID and "mid_layer" not in manifest["heads"]["k1"]
    trained = result.state.self_spec.heads["k1-mid"]
    assert trained.wm.abs().sum() > 0  # its map was trained (it starts at zero)
    head, _, _ = load_self_spec(tmp_path / "drafter", load_model(mdir).model, "k1-mid")
    assert head.mid_layer == MID and torch.equal(head.wm, trained.wm.detach().to(torch.bfloat16).float())
    # half of 3 blocks is block 1, the exit block itself: the default depth is refused by name
    with pytest.raises(CompressError, match="mid_depth 1 must lie after every exit block of mid_layers"):
        run_recipe(validate_recipe(_recipe(mdir, text_file, mid_layers=[1])), out_dir=tmp_path / "again",
                   progress=False, log=lambda *_: None)


def test_config_names_mid_layers_without_deep_context_and_a_lone_mid_depth():
    from compress.recipe import validate_recipe
    base = {"algorithm": "self_spec", "exit_layers": [1]}
    for bad, field in (({"mid_layers": [1]}, "mid_layers adds deep heads"),
                       ({"context": "deep", "mid_depth": 4}, r"mid_depth \(4\) is for the heads of mid_layers")):
        with pytest.raises(RecipeError, match=field):
            validate_recipe({"version": 1, "model": {"id": "smollm2-135m"},
                             "stages": [{"name": "d", "steps": [{**base, **bad}]}]})


def _skipping_target(arch="llama"):
    """A target whose block 2 passes its input through (attention and MLP outputs zeroed): the head after
    block 1, a copy of block 3, then drafts what the target says — acceptances, so commits are exercised."""
    model = _target(arch)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    return model


def test_every_tree_node_of_a_mid_head_is_its_choice_along_the_path_and_commits_keep_mid_states():
    """As tests/test_selfspec_deep_tree.py checks for deep heads: each node is the head's rank-r choice run by
    hand along its path; accepted nodes' mid states are copied to their positions (the next round's catch-up
    reads them), so afterwards every committed position holds the target's normed state after block m."""
    from compress.draft.selfspec.tree import DraftTree
    from tests.test_selfspec_deep_tree import WIDE, _record_tree_rounds, node_inputs
    model = _skipping_target()
    tree = DraftTree(WIDE)
    head = _mid_head(model, scale=1e-4)
    checked, accepted = 0, 0
    for prompt in _prompts():
        pair = SelfSpecPair(BlockEngine(model, 160, fuse=False), head, tree=WIDE)
        rounds = _record_tree_rounds(pair)
        res = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=tree.max_depth, tree=True)
        assert res.tokens.tolist() == target_generate(model, prompt, NEW).tokens.tolist()
        accepted += sum(res.accepted)
        seq = torch.cat([prompt, res.tokens])
        for root, nodes in rounds:
            for i, inputs, d, rank in node_inputs(tree, seq, root, nodes):
                h, mid, final, cos, sin = _states(model, inputs[None])
                logits = head.forward_unrolled(h, cos, sin, final, d, mid=mid)[d - 1][0, root + d - 1]
                assert nodes[i] == int(head.vocab_map[logits.topk(rank + 1).indices[rank]]), (root, i)
                checked += 1
        _, mid, _, _, _ = _states(model, seq[None])
        n = pair.deep_len
        torch.testing.assert_close(pair.mid[:n], head.mid_state(mid)[0, :n], atol=1e-4, rtol=1e-4)
    assert checked > 0 and accepted > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tree", [None, "default"])
def test_gpu_compiled_graphs_mid_head_matches_the_target(tree):
    """bf16, compiled layers, CUDA graphs: the mid states' reads, zeroing and writes record too."""
    import copy

    from compress.draft import run_target
    model = copy.deepcopy(_target("qwen2")).to("cuda", torch.bfloat16)
    vocab = trimmed_vocabulary([list(range(40, 120))], 64, vocab_size=264, always=[EOS])
    head = _mid_head(model, vocab=vocab).cuda()
    pair = SelfSpecPair(BlockEngine(model, 160, compile=True), head, graphs=True, tree=tree)
    pad = 5 if tree is None else pair.tree.size + 1
    for prompt in _prompts():
        prompt = prompt.cuda()
        ref = run_target(pair.target, prompt, NEW, pad_to=pad).tokens.tolist()
        if tree is None:
            for threshold in (None, 0.5):
                got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=4,
                                      confidence_threshold=threshold, pad_verify=True)
                assert got.tokens.tolist() == ref
        else:  # as for deep trees: the tree's shallow rows run other shapes, so the first tokens must agree
            got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=4, tree=True)
            assert got.tokens.tolist()[:8] == ref[:8]
    assert pair.graphs.enabled and pair.graphs.error is None


def test_a_head_at_depth_zero_trains_exports_and_drafts_the_targets_own_output(tmp_path, text_file, capsys):
    """Depth 0: the drafter runs no target block, the head reads the token's embedding and (deep) the target's
    final state of the position before, as EAGLE's head does; verification runs every block."""
    from compress.cli import main
    from compress.pipeline import run_recipe
    from compress.recipe import validate_recipe
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    result = run_recipe(validate_recipe(_recipe(mdir, text_file, exit_layers=[0, 1], mid_layers=[0], mid_depth=MID,
                                                head_init="next")),
                        out_dir=tmp_path / "drafter", progress=False, log=lambda *_: None)
    step = result.report["stages"][0]["steps"][0]
    assert step["config"]["head_init"] == "next"
    assert set(step["depth_curve"]) == {"k0", "k1", "k0-mid"}
    assert step["depth_curve"]["k0"]["c_layers"] < step["depth_curve"]["k1"]["c_layers"]  # one block fewer a draft
    trained = result.state.self_spec.heads["k0"]
    assert trained.exit_layer == 0 and trained.wf.abs().sum() > 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    for head in ("k0", "k0-mid"):
        assert main(["draft-bench", "--target", mdir, "--drafter", str(tmp_path / "drafter"), "--prompts",
                     str(prompts), "--max-new-tokens", "12", "--device", "cpu", "--head", head]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["self_spec"]["exit_layer"] == 0 and res["identical"] and res["identical_prompts"] == 2


def test_config_refuses_a_shallow_head_at_depth_zero():
    from compress.recipe import validate_recipe
    for step in ({"exit_layers": [0]}, {"exit_layers": [1], "context": "deep", "shallow_layers": [0]},
                 {"exit_layers": [1], "full_vocab_layers": [0]}):
        with pytest.raises(RecipeError, match="exit layer 0 .* needs context: deep"):
            validate_recipe({"version": 1, "model": {"id": "smollm2-135m"},
                             "stages": [{"name": "d", "steps": [{"algorithm": "self_spec", **step}]}]})
    with pytest.raises(RecipeError, match="head_init"):
        validate_recipe({"version": 1, "model": {"id": "smollm2-135m"}, "stages": [{"name": "d", "steps": [
            {"algorithm": "self_spec", "exit_layers": [1], "head_init": "first"}]}]})
    with pytest.raises(RecipeError, match="exit layers must be >= 0"):
        validate_recipe({"version": 1, "model": {"id": "smollm2-135m"}, "stages": [{"name": "d", "steps": [
            {"algorithm": "self_spec", "exit_layers": [-1]}]}]})
