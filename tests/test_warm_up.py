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
