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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_unrolled_steps_equal_drafting_a_round_position_by_position(arch):
    """Step s at p = the s-th draft of a round begun at p - s + 1, built the slow way: the committed positions
    from the target's final states, then each draft from the head's own state of the draft before."""
    model, head, h, final, cos, sin = _setup(arch)
    steps, t = 3, h.shape[1]
    got = head.forward_unrolled(h, cos, sin, final, steps)
    prev = F.pad(final[:, :-1], (0, 0, 1, 0))
    checked = 0
    for r in range(t):
        xs = head.fuse(h[:, :r + 1], prev[:, :r + 1])
        states = _causal_states(head, xs, cos, sin)
        assert torch.allclose(got[0][:, r], head.logits(states[:, -1]), atol=1e-5)
        for s in range(2, steps + 1):
            p = r + s - 1
            if p >= t:
                break
            xs = torch.cat([xs, head.fuse(h[:, p:p + 1], states[:, -1:])], 1)
            states = _causal_states(head, xs, cos, sin)
            assert torch.allclose(got[s - 1][:, p], head.logits(states[:, -1]), atol=1e-5), (r, s)
            checked += 1
    assert checked == 2 * t - 3  # every (round start, step) pair inside the window


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
