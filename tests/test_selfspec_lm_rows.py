"""Exit heads whose trimmed LM-head rows train with them (``lm_rows: trained``): the rows move only then,
files keep them, another vocabulary keeps the trained ones, the pair drafts with them and stays
token-identical, the recipe exports them, bad input is named."""
import json

import pytest
import torch

from compress.draft import run_speculative, target_generate
from compress.draft.engine import BlockEngine
from compress.draft.selfspec.head import ExitHead, trimmed_vocabulary
from compress.draft.selfspec.pair import SelfSpecPair
from compress.draft.selfspec.train import distill_heads
from compress.errors import CompressError, RecipeError
from tests.test_selfspec import EOS, NEW, _prompts, _target
from tests.test_selfspec_deep_pair import _Recorder
from tests.test_selfspec_mid import _recipe, _states
from tests.tiny import tiny_model, tiny_model_dir


def _trained_rows_head(model, vocab, scale=0.3, seed=0):
    """A deep head after block 1 with its LM rows moved off the target's (as training moves them)."""
    torch.manual_seed(seed)
    head = ExitHead(model, 1, vocab, context="deep", lm_rows="trained")
    with torch.no_grad():
        head.wf.normal_(0, 1e-3)
        head.lm_rows.add_(torch.randn_like(head.lm_rows) * scale * head.lm_rows.std())
    return head


def test_only_trained_rows_move_and_the_history_names_them():
    model = tiny_model("llama")
    vocab = torch.arange(0, 264, 2)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(2))
    target_rows = model.lm_head.weight.detach()[vocab].float()
    specs = {"frozen": (1, vocab, "deep", None, "auto", "frozen"), "trained": (1, vocab, "deep", None, "auto", "trained")}
    heads, hist = distill_heads(model, ids, specs, steps=3, batch_size=2, lr=1e-2, progress=False)
    assert torch.equal(heads["frozen"].lm_rows, target_rows) and not heads["frozen"].lm_rows_trained
    assert heads["trained"].lm_rows_trained and not torch.allclose(heads["trained"].lm_rows, target_rows)
    assert hist["lm_rows_trained"] == ["trained"]
    assert torch.equal(model.lm_head.weight.detach()[vocab].float(), target_rows)  # the target is untouched
    _, plain = distill_heads(model, ids, {"frozen": specs["frozen"]}, steps=1, batch_size=2, progress=False)
    assert "lm_rows_trained" not in plain


def test_files_keep_trained_rows_and_another_vocabulary_keeps_them_where_it_can(tmp_path):
    model = tiny_model("llama")
    vocab = torch.cat([torch.tensor([2]), torch.arange(10, 110)])  # EOS (2) and a run of ids
    head = _trained_rows_head(model, vocab)
    head.save_as(tmp_path, "head.safetensors", dtype=torch.float32)
    back = ExitHead.load(model, tmp_path / "head.safetensors", 1, None, "deep")
    assert back.lm_rows_trained and torch.equal(back.lm_rows, head.lm_rows)
    frozen = ExitHead(model, 1, vocab, context="deep")
    frozen.save_as(tmp_path, "frozen.safetensors", dtype=torch.float32)
    assert not ExitHead.load(model, tmp_path / "frozen.safetensors", 1, None, "deep").lm_rows_trained
    # untrimmed: the trained rows at their ids, the target's rows at every other id
    wide = head.with_vocabulary(model, torch.arange(264))
    assert wide.lm_rows_trained and wide.lm_rows.shape == (264, model.config.hidden_size)
    assert torch.equal(wide.lm_rows[vocab], head.lm_rows)
    rest = torch.ones(264, dtype=torch.bool)
    rest[vocab] = False
    assert torch.equal(wide.lm_rows[rest], model.lm_head.weight.detach()[rest].float())
    with pytest.raises(CompressError, match="head lm_rows must be one of frozen, trained, got 'free'"):
        ExitHead(model, 1, vocab, lm_rows="free")


def test_the_pair_drafts_with_trained_rows_and_stays_token_identical():
    """Drafts are the unrolled forward's argmax over the trained rows (not the target's), and the output is
    the target's own, with a trimmed vocabulary and with the stop."""
    model = _target("llama")
    checked = 0
    for prompt in _prompts():
        want = target_generate(model, prompt, NEW).tokens.tolist()
        vocab = trimmed_vocabulary([want], 40, vocab_size=264, always=[EOS])
        head = _trained_rows_head(model, vocab)
        pair = SelfSpecPair(BlockEngine(model, 128, fuse=False), head)
        drafter = _Recorder(pair.drafter)
        for threshold in (None, 0.5):
            drafter.rounds.clear()
            res = run_speculative(pair.target, drafter, prompt, max_new_tokens=NEW, gamma=3,
                                  confidence_threshold=threshold, pad_verify=True)
            assert res.tokens.tolist() == want, threshold
            seq = torch.cat([prompt, res.tokens])
            for start, drafts in drafter.rounds:
                if drafts:
                    inputs = torch.cat([seq[:start + 1], torch.tensor(drafts[:-1], dtype=seq.dtype)])
                    h, _, final, cos, sin = _states(model, inputs[None])
                    steps = head.forward_unrolled(h, cos, sin, final, len(drafts))
                    for s, tok in enumerate(drafts, 1):
                        assert tok == int(vocab[steps[s - 1][0, start + s - 1].argmax()]), (start, s)
                        checked += 1
    assert checked > 10
    # the rows matter: the same head on the target's rows drafts otherwise somewhere
    frozen = ExitHead(model, 1, vocab, context="deep")
    frozen.load_state_dict({k: v for k, v in head.state_dict().items() if k != "lm_rows"}, strict=False)
    h, _, final, cos, sin = _states(model, seq[None])
    assert not torch.equal(frozen.forward_sequence(h, cos, sin, final).argmax(-1),
                           head.forward_sequence(h, cos, sin, final).argmax(-1))


def test_recipe_trains_and_exports_the_rows(tmp_path, text_file):
    from compress.draft.selfspec.step import load_self_spec
    from compress.models import load_model
    from compress.pipeline import run_recipe
    from compress.recipe import validate_recipe

    mdir = tiny_model_dir(tmp_path / "tiny", "qwen2")
    result = run_recipe(validate_recipe(_recipe(mdir, text_file, lm_rows="trained")), out_dir=tmp_path / "drafter",
                        progress=False, log=lambda *_: None)
    step = result.report["stages"][0]["steps"][0]
    assert step["training"]["lm_rows_trained"] == ["k1"]
    manifest = json.loads((tmp_path / "drafter" / "self_spec.json").read_text())
    assert manifest["heads"]["k1"]["lm_rows"] == "trained"
    trained = result.state.self_spec.heads["k1"]
    target = load_model(mdir).model
    head, _, _ = load_self_spec(tmp_path / "drafter", target)
    assert head.lm_rows_trained
    assert torch.equal(head.lm_rows, trained.lm_rows.detach().to(torch.bfloat16).float())
    assert not torch.equal(head.lm_rows, target.lm_head.weight.detach()[head.vocab_map].float())
    with pytest.raises(RecipeError, match="lm_rows"):
        validate_recipe(_recipe(mdir, text_file, lm_rows="free"))
