"""Deep-context exit heads (the target's final state of the previous position fed to the head):
the unrolled teacher-forced forward against a draft-by-draft recurrence, files, bad input."""
import torch
import torch.nn.functional as F
import pytest

from compress.draft.selfspec.head import ExitHead
from compress.errors import CompressError
from tests.tiny import tiny_model


def _setup(arch="llama", t=12, seed=0):
    torch.manual_seed(seed)
    model = tiny_model(arch)
    head = ExitHead(model, 1, torch.arange(model.lm_head.weight.shape[0]), context="deep")
    with torch.no_grad():
        head.wf.normal_(0, 0.05)  # trained heads have a non-zero map; a zero one would hide mistakes
    ids = torch.randint(0, 200, (2, t))
    h = model(input_ids=ids, output_hidden_states=True).hidden_states[1]
    final = torch.randn(2, t, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(h, torch.arange(t)[None])
    return model, head, h, final, cos[0], sin[0]


def _causal_states(head, xs, cos, sin):
    q, k, v = head._qkv(xs, cos[:xs.shape[1]], sin[:xs.shape[1]])
    return head._finish(xs, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head.head_dim ** -0.5))


def check_round_by_round(head, got, h, first, cos, sin) -> int:
    """``got`` (``forward_unrolled``'s steps) against rounds built the slow way: a round begun at r reads
    ``first`` (the head's fused step-1 inputs) at the committed positions ≤ r, then each draft the head's own
    state of the draft before. Returns how many later drafts were checked."""
    t, checked = h.shape[1], 0
    for r in range(t):
        xs = first[:, :r + 1]
        states = _causal_states(head, xs, cos, sin)
        assert torch.allclose(got[0][:, r], head.logits(states[:, -1]), atol=1e-5)
        for s in range(2, len(got) + 1):
            p = r + s - 1
            if p >= t:
                break
            xs = torch.cat([xs, head.fuse(h[:, p:p + 1], states[:, -1:])], 1)
            states = _causal_states(head, xs, cos, sin)
            assert torch.allclose(got[s - 1][:, p], head.logits(states[:, -1]), atol=1e-5), (r, s)
            checked += 1
    return checked


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unrolled_steps_equal_drafting_a_round_position_by_position(arch):
    """Step s at p = the s-th draft of a round begun at p - s + 1, built the slow way: the committed positions
    from the target's final states, then each draft from the head's own state of the draft before."""
    model, head, h, final, cos, sin = _setup(arch)
    got = head.forward_unrolled(h, cos, sin, final, 3)
    checked = check_round_by_round(head, got, h, head.fuse(h, F.pad(final[:, :-1], (0, 0, 1, 0))), cos, sin)
    assert checked == 2 * h.shape[1] - 3  # every (round start, step) pair inside the window


def test_a_new_deep_head_starts_as_the_shallow_head():
    model, head, h, final, cos, sin = _setup()
    shallow = ExitHead(model, 1, head.vocab_map)
    with torch.no_grad():
        head.wf.zero_()
    deep_steps = head.forward_unrolled(h, cos, sin, final, 2)
    want = shallow.forward_sequence(h, cos, sin)
    assert torch.allclose(deep_steps[0], want, atol=1e-6)
    assert torch.allclose(deep_steps[1], want, atol=1e-6)  # with wf = 0 no step reads a state


def test_deep_heads_round_trip_through_files_and_need_their_states(tmp_path):
    model, head, h, final, cos, sin = _setup()
    head.save_as(tmp_path, "head.safetensors", dtype=torch.float32)
    back = ExitHead.load(model, tmp_path / "head.safetensors", 1, None)
    assert back.context == "deep" and torch.equal(back.wf, head.wf)
    assert torch.allclose(back.forward_sequence(h, cos, sin, final), head.forward_sequence(h, cos, sin, final))
    with pytest.raises(CompressError, match="needs the previous positions' final states"):
        head.forward_sequence(h, cos, sin)
    with pytest.raises(CompressError, match="head context must be one of shallow, deep"):
        ExitHead(model, 1, head.vocab_map, context="middle")


def test_replaying_identical_steps_is_the_plain_replay():
    import random

    from compress.draft.agreement import replay_greedy_rounds
    from compress.draft.selfspec.train import replay_rounds

    rng = random.Random(0)
    for _ in range(50):
        agree = [rng.random() < 0.6 for _ in range(rng.randint(1, 40))]
        for gamma in (1, 2, 4):
            plain = replay_greedy_rounds(agree, gamma)
            steps = replay_rounds([agree, agree, agree], gamma)
            assert (steps["tokens"], steps["rounds"]) == (plain["tokens"], plain["rounds"])
    # draft 2 of a round begun at 0 is read at position 1 of step 2's sequence, not step 1's
    assert replay_rounds([[True, True, True], [False, False, False]], 2)["rounds"] == 2
    assert replay_rounds([[True, False, True], [True, True, True]], 2)["rounds"] == 1


def test_distilling_a_deep_head_trains_its_map_over_unrolled_drafts():
    from compress.draft.selfspec.train import distill_heads, head_events, summarise_heads

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(1))
    vocab = torch.arange(model.lm_head.weight.shape[0])
    heads, hist = distill_heads(model, ids, {"deep": (1, vocab, "deep"), "flat": (1, vocab)}, steps=12,
                                batch_size=4, lr=3e-3, progress=False, unroll=3)
    assert hist["unroll"] == 3 and heads["flat"].context == "shallow" and heads["flat"].wf is None
    assert heads["deep"].wf.abs().max() > 0  # the map moved off its zero start
    events = head_events(model, heads, ids[:4], steps=3)
    deep, flat = events["deep"], events["flat"]
    assert "agree_steps" not in flat and len(deep["agree_steps"]) == 4
    assert all(len(w) == 3 and all(len(a) == 23 for a in w) for w in deep["agree_steps"])
    assert [w[0] for w in deep["agree_steps"]] == deep["agree"]  # step 1 is the round's first draft
    curve = summarise_heads(events, heads, model.config.num_hidden_layers, gammas=(1, 2, 3))
    assert curve["deep"]["context"] == "deep" and len(curve["deep"]["greedy_agreement_by_draft"]) == 3
    assert curve["deep"]["greedy_agreement_by_draft"][0] == pytest.approx(curve["deep"]["greedy_agreement"])
    assert "greedy_agreement_by_draft" not in curve["flat"]


def test_unroll_below_one_is_refused():
    from compress.draft.selfspec.train import distill_heads

    model = tiny_model("llama")
    with pytest.raises(CompressError, match="unroll must be >= 1"):
        distill_heads(model, torch.zeros(2, 8, dtype=torch.long), {"a": (1, torch.arange(264), "deep")}, steps=1,
                      unroll=0)


def test_argmax_weight_mixes_the_hard_cross_entropy_on_the_targets_top_id():
    from compress.draft.selfspec.train import _drafts_loss, distill_heads

    model, head, h, final, cos, sin = _setup()
    p = torch.softmax(torch.randn(2, h.shape[1], head.vocab_map.numel()) * 3, -1)
    mask = torch.ones(2, h.shape[1])
    args = (head, {1: h}, cos, sin, final, p, mask, 2)
    soft, hard = _drafts_loss(*args), _drafts_loss(*args, argmax_weight=1.0)
    steps = head.forward_unrolled(h, cos, sin, final, 2)
    top = p.argmax(-1)
    want = sum(F.cross_entropy(lg[:, s:].flatten(0, 1), top[:, s:].flatten()) for s, lg in enumerate(steps)) / 2
    assert hard.item() == pytest.approx(want.item(), rel=1e-5)
    assert _drafts_loss(*args, argmax_weight=0.25).item() == pytest.approx(0.75 * soft.item() + 0.25 * hard.item(),
                                                                           rel=1e-5)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    vocab = torch.arange(model.lm_head.weight.shape[0])
    _, hist = distill_heads(model, ids, {"k1": (1, vocab, "deep")}, steps=2, batch_size=2, progress=False,
                            argmax_weight=0.5)
    assert hist["argmax_weight"] == 0.5
    with pytest.raises(CompressError, match=r"argmax_weight must be in \[0, 1\], got 1.5"):
        distill_heads(model, ids, {"k1": (1, vocab)}, steps=1, argmax_weight=1.5)


@pytest.mark.parametrize("source", ["corpus", "generations"])
def test_recipe_with_deep_context_reports_each_draft_and_exports_deep_heads(tmp_path, text_file, source):
    import json

    from compress.draft.selfspec.head import HeadAsModel
    from compress.draft.selfspec.step import load_self_spec
    from compress.models import load_model
    from compress.pipeline import run_recipe
    from compress.recipe import validate_recipe
    from tests.tiny import tiny_model_dir

    mdir = tiny_model_dir(tmp_path / "tiny", "qwen2")
    recipe = validate_recipe({"version": 1, "model": {"id": mdir, "device": "cpu"}, "stages": [{"name": "draft", "steps": [
        {"algorithm": "self_spec", "exit_layers": [1], "vocab_size": 64, "context": "deep", "unroll": 2,
         "shallow_layers": [1],
         "gammas": [1, 2, 3], "train_corpora": [text_file], "train_windows": 8, "eval_windows": 4, "seq_len": 32,
         "steps": 4, "batch_size": 2, "lr": 1e-3, "eval_generations": False, "train_source": source,
         **({"prompt_tokens": 10, "generate_tokens": 14} if source == "generations" else {})}]}],
        "export": {"format": "self-spec"}})
    result = run_recipe(recipe, out_dir=tmp_path / "drafter", progress=False, log=lambda *_: None)
    step = result.report["stages"][0]["steps"][0]
    assert step["training"]["unroll"] == 2 and step["training"]["source"] == source
    assert ("generations" in step["training"]["phase_seconds"]) == (source == "generations")
    assert len(step["depth_curve"]["k1"]["greedy_agreement_by_draft"]) == 3  # max(gammas) drafts scored
    manifest = json.loads((tmp_path / "drafter" / "self_spec.json").read_text())
    assert manifest["heads"]["k1"]["context"] == "deep" and manifest["heads"]["k1-shallow"]["context"] == "shallow"
    assert manifest["default"] == "k1"  # the comparison heads are reported, never chosen
    # no gamma in the recipe: the export ships the corpus curve's best draft length
    assert manifest["gamma"] == step["gamma"] == step["depth_curve"]["k1"]["best_gamma"]
    assert step["stop"]["gamma_from"] == manifest["chosen_on"] == "depth_curve"  # no held-out continuations
    target = load_model(mdir).model
    head, _, _ = load_self_spec(tmp_path / "drafter", target)
    assert head.context == "deep"
    logits = HeadAsModel(target, head)(torch.arange(10)[None], logits_to_keep=2).logits
    assert logits.shape == (1, 2, 264) and torch.isfinite(logits).any()


def test_config_names_a_bad_context_and_unroll():
    from compress.recipe import validate_recipe
    from compress.errors import RecipeError

    base = {"algorithm": "self_spec", "exit_layers": [1]}
    for bad, field in (({"context": "middle"}, "context"), ({"unroll": 0}, "unroll"),
                       ({"argmax_weight": 1.5}, "argmax_weight"),
                       ({"shallow_layers": [1]}, "shallow_layers adds shallow heads beside deep ones"),
                       ({"gamma": 7}, r"gamma \(7\) must be one of gammas \[2, 3, 4, 5, 6\]")):
        with pytest.raises(RecipeError, match=field):
            validate_recipe({"version": 1, "model": {"id": "smollm2-135m"},
                             "stages": [{"name": "d", "steps": [{**base, **bad}]}]})


def test_a_stop_counts_drafts_past_a_rejection_and_pays_for_its_reads():
    from compress.draft.agreement import replay_greedy_rounds
    from compress.draft.selfspec.train import STOP_READ_OVERHEAD, choose_threshold

    # γ = 3, sure of everything: a stop cuts nothing, and the rejected round's last two drafts count
    agree, sure = [True, False, True, True, True, True], [0.9] * 6
    fixed, stop = replay_greedy_rounds(agree, 3), replay_greedy_rounds(agree, 3, sure, 0.5)
    assert stop["drafted"] == fixed["drafted"] and stop["rounds"] == fixed["rounds"]
    # unsure after an accepted draft: that round stops there (the draft itself is verified)
    cut = replay_greedy_rounds([True, True, True, True], 3, [0.1, 0.9, 0.9, 0.9], 0.5)
    assert cut["drafted"][:2] == [2, 0] and cut["accepted"][0] == 2

    agrees = [[True, False, True, True, False, True, True, True] * 4] * 3
    confs = [[0.9] * 32] * 3
    # nothing to cut: the fixed γ wins once reads cost anything, and ties it when they are free
    assert choose_threshold(agrees, confs, 3, 0.12)["threshold"] is None
    free = choose_threshold(agrees, confs, 3, 0.12, candidates=[0.05, 0.5], read_cost=0.0)
    assert {round(r["predicted_speedup"], 12) for r in free["table"]} == {round(free["predicted_speedup"], 12)}
    # a head unsure exactly where it is rejected: a stop cuts the wasted drafts and, if reads are cheap, wins
    unsure = [[0.9 if a else 0.05 for a in row] for row in agrees]
    assert choose_threshold(agrees, unsure, 3, 0.5, read_cost=0.01)["threshold"] is not None
    assert choose_threshold(agrees, unsure, 3, 0.12)["threshold"] is None  # 0.12 + 0.16 a draft: it does not
    assert STOP_READ_OVERHEAD > 0
