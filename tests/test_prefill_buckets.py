"""Prefills padded to a bucket's rows (engine.prefill_bucket): the padding rows change nothing a later
row reads, the self-drafter stays token-identical to its matched reference, and a bench's warm-up
records every bucket before timing. On the GPU each bucket is a recorded graph; here (no graphs) the
same padded programs run eagerly under the same keys."""
import copy

import pytest
import torch

from compress.draft import run_speculative, run_target
from compress.draft.bench import warm_prefills, warm_up
from compress.draft.engine import PREFILL_BUCKETS, BlockEngine, EngineDecoder, StepGraphs, prefill_bucket
from compress.draft.selfspec.pair import SelfSpecPair
from tests.test_selfspec import NEW, _head, _prompts, _target
from tests.test_warm_up import _more_prompts


def test_the_bucket_is_the_smallest_that_holds_the_rows_and_fits():
    assert prefill_bucket(1, 0, 128) == 32 and prefill_bucket(32, 0, 128) == 32 and prefill_bucket(33, 0, 128) == 64
    assert prefill_bucket(40, 70, 128) is None  # 70 + 64 > 128: unpadded
    assert prefill_bucket(PREFILL_BUCKETS[-1] + 1, 0, 10_000) is None  # longer than the largest bucket


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_padded_prefill_decodes_as_the_unpadded_one(arch):
    model = _target(arch)
    for prompt in _prompts():
        plain = EngineDecoder(BlockEngine(copy.deepcopy(model), 128, fuse=False), prefill_buckets=False)
        padded = EngineDecoder(BlockEngine(model, 128, fuse=False), prefill_buckets=True)
        a, b = plain(prompt[:-1], 1), padded(prompt[:-1], 1)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        assert padded.length == plain.length == prompt.numel() - 1
        assert (run_target(padded, prompt, NEW).tokens.tolist() == run_target(plain, prompt, NEW).tokens.tolist())


@pytest.mark.parametrize("tree", [None, "default"], ids=["linear", "tree"])
@pytest.mark.parametrize("context", ["shallow", "deep"])
def test_the_self_drafter_with_padded_prefills_is_identical_to_its_reference(context, tree):
    model = _target("llama")
    head = _head(model, 2, context=context)
    pair = SelfSpecPair(BlockEngine(model, 192, fuse=False), head, tree=tree, prefill_buckets=True)
    plain = SelfSpecPair(BlockEngine(copy.deepcopy(model), 192, fuse=False), head, tree=tree, prefill_buckets=False)
    kw = dict(tree=True) if tree else dict(pad_verify=True)
    gamma = pair.tree.max_depth if tree else 3
    pad = pair.tree.size + 1 if tree else gamma + 1
    for prompt in _prompts() + [_prompts()[0][:1]]:  # and a one-token prompt: no prefill, a bucketed first step
        ref = run_target(pair.target, prompt, NEW, pad_to=pad).tokens.tolist()
        got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=gamma, **kw)
        assert got.tokens.tolist() == ref
        # and as without padding (float32: the padded GEMMs round alike here)
        assert run_speculative(plain.target, plain.drafter, prompt, max_new_tokens=NEW, gamma=gamma,
                               **kw).tokens.tolist() == ref
        assert pair.shallow_rows["drafter"] >= prompt.numel() - 1  # the real rows are counted, not the padding


def test_warm_prefills_records_every_bucket_a_timed_run_uses(monkeypatch):
    seen = []
    real = StepGraphs.run
    def run(self, key, fn, *inputs):
        seen.append(key)
        return real(self, key, fn, *inputs)
    monkeypatch.setattr(StepGraphs, "run", run)
    model = _target("llama")
    pair = SelfSpecPair(BlockEngine(model, 192, fuse=False), _head(model, 2, context="deep"), prefill_buckets=True)
    prompts = _more_prompts()
    warm_up(pair.target, pair.drafter, prompts[0], 3, pad_verify=True)
    warm_prefills(pair.target, prompts, pair.drafter)
    warmed = set(seen)
    assert {("shallow", 32), ("deep", 32), ("head-kv", 32)} <= warmed
    for p in prompts:
        run_speculative(pair.target, pair.drafter, p, max_new_tokens=48, gamma=3, pad_verify=True)
        run_target(pair.target, p, 48, pad_to=4)
    assert set(seen) - warmed == set()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_a_replayed_padded_prefill_decodes_as_the_eager_one():
    model = copy.deepcopy(_target("qwen2")).to("cuda", torch.bfloat16)
    graphed = EngineDecoder(BlockEngine(model, 128, compile=True), graphs=True)
    plain = EngineDecoder(BlockEngine(copy.deepcopy(model), 128, compile=True), graphs=True, prefill_buckets=False)
    for prompt in _prompts():
        prompt = prompt.cuda()
        for _ in range(2):  # the second prefill of a bucket replays its graph
            torch.testing.assert_close(graphed(prompt[:-1], 1), plain(prompt[:-1], 1), rtol=0.05, atol=0.05)
            graphed.reset()
            plain.reset()
    assert graphed.prefill_graphs.error is None and {k[1] for k in graphed.prefill_graphs._graphs} == {32, 64}
