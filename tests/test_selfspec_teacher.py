"""The teacher cache (compress/draft/selfspec/teacher.py): training from the target's outputs computed
once gives the heads that training with the target run every step gives."""
import pytest
import torch

from compress.draft.selfspec import teacher as teacher_mod
from compress.draft.selfspec.teacher import TeacherCache, cache_bytes, place, teacher_outputs, teacher_probs
from compress.draft.selfspec.train import distill_heads
from compress.errors import CompressError
from tests.tiny import tiny_model


def _windows(n=6, t=20, seed=2):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_teacher_trains_the_heads_the_per_step_teacher_trains(arch):
    model = tiny_model(arch)
    ids = _windows()
    vocab = model.lm_head.weight.shape[0]
    trimmed = torch.arange(vocab // 2)  # a trimmed head: its teacher is the full softmax restricted to its ids
    specs = {"deep": (1, trimmed, "deep"), "mid": (1, trimmed, "deep", 2), "flat": (2, torch.arange(vocab))}
    kw = dict(steps=5, batch_size=3, lr=3e-3, seed=4, progress=False, unroll=2)
    off, h_off = distill_heads(model, ids, specs, teacher_cache="off", **kw)
    on, h_on = distill_heads(model, ids, specs, teacher_cache="auto", **kw)
    assert h_off["teacher_cache"] is None
    assert h_on["teacher_cache"]["device"] == "cpu" and h_on["teacher_cache"]["gb"] >= 0
    for name in specs:
        assert h_on["final_loss"][name] == pytest.approx(h_off["final_loss"][name], rel=1e-5)
        for (key, a), b in zip(on[name].state_dict().items(), off[name].state_dict().values()):
            assert torch.allclose(a, b, atol=1e-5), (name, key)
    assert on["deep"].wf.abs().max() > 0 and on["mid"].wm.abs().max() > 0  # the maps trained from the cache


def test_the_cache_holds_each_depth_the_final_state_and_the_normaliser():
    model = tiny_model("llama")
    ids = _windows(n=5, t=12)
    depths = [1, 2]
    cache = TeacherCache.build(model, ids, depths, torch.device("cpu"), batch_size=2, progress=False)
    assert cache.nbytes == cache_bytes(model, ids, depths)
    idx = torch.tensor([4, 0, 4])
    hidden, final, lse = cache.take(idx, torch.device("cpu"))
    with torch.no_grad():
        out = model(input_ids=ids[idx], output_hidden_states=True, use_cache=False)
    for k in depths:
        assert torch.allclose(hidden[k], out.hidden_states[k], atol=1e-5)
    rows = torch.tensor([3, 7, 100])
    want = torch.softmax(out.logits.float(), -1)[..., rows]
    assert torch.allclose(teacher_probs(final, lse, model.lm_head.weight[rows]), want, atol=1e-6)


def test_placement_off_and_too_large_run_the_target_every_step(monkeypatch):
    model = tiny_model("llama")
    ids = _windows()
    assert place(model, ids, [1], "off") is None
    assert place(model, ids, [1], "auto") == torch.device("cpu")
    monkeypatch.setattr(teacher_mod, "available_bytes", lambda: cache_bytes(model, ids, [1]))  # needs half
    assert place(model, ids, [1], "auto") is None
    heads, hist = distill_heads(model, ids, {"k1": (1, torch.arange(264))}, steps=1, batch_size=2, progress=False)
    assert hist["teacher_cache"] is None and heads["k1"].exit_layer == 1
    with pytest.raises(CompressError, match="teacher_cache must be one of auto, off, got 'gpu'"):
        place(model, ids, [1], "gpu")


def test_scaled_logits_refuse_the_cache():
    model = tiny_model("llama")
    forward = model.forward

    def scaled(*a, **kw):  # a model whose logits are not its LM head of its final norm's output
        out = forward(*a, **kw)
        out.logits = out.logits * 2
        return out

    model.forward = scaled
    with pytest.raises(CompressError, match="scaled or capped logits"):
        TeacherCache.build(model, _windows(n=2, t=8), [1], torch.device("cpu"), progress=False)
    with pytest.raises(CompressError, match="scaled or capped logits"):  # and without the cache
        distill_heads(model, _windows(), {"k1": (1, torch.arange(264))}, steps=1, progress=False, teacher_cache="off")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_cache_on_the_device_and_tf32_only_while_training():
    """bf16 on CUDA: the cache goes to the device, reads back what the target gives, and the heads'
    TF32 products are switched on for the steps only."""
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    ids = _windows(n=8, t=32)
    assert place(model, ids, [1, 2], "auto").type == "cuda"
    cache = TeacherCache.build(model, ids, [1, 2], torch.device("cuda"), batch_size=4, progress=False)
    idx = torch.tensor([0, 1, 2, 3])  # the build's first batch: the same rows, the same numbers (bf16 tolerance)
    hidden, final, lse = cache.take(idx, torch.device("cuda"))
    want_h, want_f, want_lse = teacher_outputs(model, ids[idx].cuda(), [1, 2])
    for k in (1, 2):
        torch.testing.assert_close(hidden[k], want_h[k])
    torch.testing.assert_close(final, want_f)
    torch.testing.assert_close(lse, want_lse)
    before = torch.get_float32_matmul_precision()
    heads, hist = distill_heads(model, ids, {"k1": (1, torch.arange(264), "deep")}, steps=3, batch_size=4,
                                progress=False, unroll=2)
    assert hist["teacher_cache"]["device"].startswith("cuda") and hist["tf32"] is True
    assert torch.get_float32_matmul_precision() == before
    assert all(torch.isfinite(p).all() for p in heads["k1"].parameters())


def test_heads_over_one_vocabulary_share_a_teacher_distribution_per_step(monkeypatch):
    from compress.draft.selfspec import train as train_mod
    model = tiny_model("llama")
    calls = []
    real = train_mod.teacher_probs
    monkeypatch.setattr(train_mod, "teacher_probs", lambda *a: calls.append(a[2].shape[0]) or real(*a))
    half, other = torch.arange(132), torch.cat([torch.arange(3), torch.arange(100, 227)])  # EOS (2) in both
    specs = {"deep": (1, half, "deep"), "mid": (1, half, "deep", 2), "other": (2, other)}
    heads, hist = distill_heads(model, _windows(), specs, steps=3, batch_size=2, progress=False, unroll=2)
    assert sorted(calls) == [130, 130, 130, 132, 132, 132]  # per step: one for deep and mid, one for other
    assert set(hist["final_loss"]) == set(specs) and all(v > 0 for v in hist["final_loss"].values())
