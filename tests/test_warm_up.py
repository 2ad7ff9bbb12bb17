"""``warm_up`` records every step program a timed run will use: after it, no speculative round of any
prompt asks for a program key it has not seen. On the GPU a new key inside a timed run is a CUDA-graph
capture, and for a new row count a compile — seconds charged to the drafter (the H200's first
deep-head row, bench/results/draft/h200-selfspec-deep/README.md). The keys are logged on the CPU,
where the programs run eagerly under the same keys."""
import pytest
import torch

from compress.draft import run_speculative
from compress.draft.bench import warm_up
from compress.draft.decoders import self_spec_pair
from compress.draft.engine import BlockEngine, StepGraphs
from tests.test_selfspec import _head, _prompts, _target
from tests.tiny import TEXT, byte_tokenizer


@pytest.fixture
def program_keys(monkeypatch):
    seen = set()
    real = StepGraphs.run

    def run(self, key, fn, *inputs):
        seen.add(key)
        return real(self, key, fn, *inputs)

    monkeypatch.setattr(StepGraphs, "run", run)
    return seen


def _more_prompts():
    tok = byte_tokenizer()
    return _prompts() + [torch.tensor(tok(TEXT[i:i + 25])["input_ids"]) for i in (60, 220, 300, 400)]


@pytest.mark.parametrize("tree", [None, "default"], ids=["linear", "tree"])
@pytest.mark.parametrize("context", ["shallow", "deep"])
def test_warm_up_records_every_program_a_timed_run_uses(program_keys, context, tree):
    model = _target("llama")
    head = _head(model, 2, context=context)
    target, drafter = self_spec_pair(BlockEngine(model, 192, fuse=False), head, tree=tree)
    gamma = 3
    kw = dict(tree=True) if tree else dict(pad_verify=True)
    depth = drafter.pair.tree.max_depth if tree else gamma
    prompts = _more_prompts()
    warm_up(target, drafter, prompts[0], depth, **kw)
    warmed = set(program_keys)
    for p in prompts:
        run_speculative(target, drafter, p, max_new_tokens=48, gamma=depth, **kw)
    assert program_keys - warmed == set(), f"programs first used after warm_up: {sorted(program_keys - warmed, key=str)}"


def test_a_greedy_round_is_one_drafting_program_with_its_catch_up(program_keys):
    """A greedy linear round records the exit head's catch-up over the accepted drafts in the round's own
    program: between the last verify's read and the next draft the host launches one program, not two."""
    model = _target("llama")
    for context in ("shallow", "deep"):
        program_keys.clear()
        head = _head(model, 2, context=context)
        target, drafter = self_spec_pair(BlockEngine(model, 192, fuse=False), head)
        for p in _more_prompts():
            run_speculative(target, drafter, p, max_new_tokens=48, gamma=3, pad_verify=True)
        assert not any(k[0] == "head-kv" for k in program_keys), sorted(program_keys, key=str)
        assert any(k[0] == "round" and k[2] > 0 for k in program_keys), sorted(program_keys, key=str)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_acceptance_in_one_read_agrees_with_the_rule(seed):
    from compress.draft.speculative import accept_greedy, verify_greedy
    g = torch.Generator().manual_seed(seed)
    for k in range(0, 5):
        logits = torch.randn(k + 1, 7, generator=g)
        argmax = logits.argmax(-1)
        drafts = torch.where(torch.rand(k, generator=g) < 0.7, argmax[:k], torch.randint(0, 7, (k,), generator=g))
        n, nxt = verify_greedy(argmax, drafts)
        m, new, host = accept_greedy(logits, drafts)
        assert m == n and new.tolist() == host == drafts[:n].tolist() + [int(nxt)]
        # the rule itself, written out: the first disagreement ends the accepted prefix
        want = next((i for i in range(k) if int(drafts[i]) != int(argmax[i])), k)
        assert n == want and int(nxt) == int(argmax[want])
