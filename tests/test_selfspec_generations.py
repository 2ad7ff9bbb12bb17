"""Self-distillation data for the exit heads (train_source: generations) on tiny models."""
import copy
import functools

import pytest
import torch
import yaml

from compress.draft import target_generate
from compress.draft.selfspec import step as selfspec_step
from compress.draft.selfspec.config import SelfSpecConfig
from compress.draft.selfspec.generations import continuation_mask, greedy_continuations
from compress.draft.selfspec.train import distill_heads, first_events, head_events
from compress.errors import CompressError, RecipeError
from tests.tiny import TEXT, byte_tokenizer, tiny_model, tiny_model_dir

EOS = 256


@functools.lru_cache(maxsize=None)
def _target():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # confident: batched and one-row argmaxes cannot tie differently
    return model


def _prompts(n=5, length=12):
    ids = byte_tokenizer()(TEXT)["input_ids"]
    return torch.tensor([ids[i * 37:i * 37 + length] for i in range(n)])


def test_greedy_continuations_are_the_targets_own_greedy_generate():
    model = copy.deepcopy(_target())
    model.generation_config.eos_token_id = None  # compare fixed-length runs: generate() must not stop either
    model.generation_config.pad_token_id = 0
    prompts = _prompts()
    got = greedy_continuations(model, prompts, 20, batch_size=2, progress=False)  # batches of 2, 2 and 1
    assert got.shape == (5, 32) and torch.equal(got[:, :12], prompts)
    for row, prompt in zip(got, prompts):
        want = model.generate(prompt[None], max_new_tokens=20, do_sample=False)[0]
        assert row.tolist() == want.tolist()
        assert row[12:].tolist() == target_generate(model, prompt, 20).tokens.tolist()
    assert torch.equal(got, greedy_continuations(model, prompts, 20, batch_size=5, progress=False))
    assert len(set(map(tuple, got[:, 12:].tolist()))) > 1  # the prompts lead to different text


def test_continuation_mask_starts_at_the_last_prompt_token_and_stops_at_eos():
    seqs = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, EOS, 5, 6], [1, 2, 3, 4, 5, EOS], [1, EOS, 3, 4, 5, 6]])
    mask = continuation_mask(seqs, 3, {EOS})
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1],  # position 2 predicts the first generated token
                             [0, 0, 1, 0, 0, 0],  # ... and predicts an immediate EOS: nothing after
                             [0, 0, 1, 1, 1, 0],  # the position predicting EOS is kept, EOS's own is not
                             [0, 0, 1, 1, 1, 1]]  # an EOS inside the prompt is the prompt's business
    assert continuation_mask(seqs, 3).sum() == 16
    with pytest.raises(CompressError, match="prompt_tokens must be in 1..5"):
        continuation_mask(seqs, 6)
    # the first 2 generated tokens only: positions 2 and 3, less where an EOS came first
    assert continuation_mask(seqs, 3, {EOS}, first=2).tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0],
                                                                    [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
    # all 3 generated tokens: the whole mask but its last position, which predicts no token of the row
    assert torch.equal(continuation_mask(seqs, 3, first=3)[:, :-1], continuation_mask(seqs, 3)[:, :-1])
    assert continuation_mask(seqs, torch.tensor([2, 3, 1, 4]), first=1).sum(1).tolist() == [1, 1, 1, 1]
    with pytest.raises(CompressError, match="first must be >= 1"):
        continuation_mask(seqs, 3, first=0)


def test_cutting_the_events_to_the_first_tokens_is_a_pass_with_the_cut_mask():
    """The report's first-N curve reuses the held-out pass: its events cut to each row's first N kept positions
    equal a second pass over the mask cut at N, for rows of different prompt lengths, an EOS inside the cut and
    later drafts of a deep head."""
    from compress.draft.selfspec.head import ExitHead
    model = _target()
    seqs = greedy_continuations(model, _prompts(3, 8), 10, progress=False)
    seqs[1, 9] = EOS  # row 1 (prompt 6): its 4th generated token, inside the first 5
    lens = torch.tensor([8, 6, 4])
    torch.manual_seed(0)
    deep = ExitHead(model, 1, torch.arange(264), context="deep")
    with torch.no_grad():
        deep.wf.normal_(0, 1e-3)
    heads = {"k1": ExitHead(model, 2, torch.arange(264)), "k1d": deep}
    full = head_events(model, heads, seqs, keep=continuation_mask(seqs, lens, {EOS}), steps=3)
    want = head_events(model, heads, seqs, keep=continuation_mask(seqs, lens, {EOS}, first=5), steps=3)
    got = first_events(full, 5)
    for name in heads:
        assert set(got[name]) == set(want[name])
        assert got[name]["agree"] == want[name]["agree"] and got[name]["confidence"] == want[name]["confidence"]
        assert all(torch.equal(a, b) for a, b in zip(got[name]["overlap"], want[name]["overlap"]))
    assert got["k1d"]["agree_steps"] == want["k1d"]["agree_steps"]
    assert [len(a) for a in got["k1"]["agree"]] == [5, 4, 5]  # row 1: up to the position predicting its EOS
    with pytest.raises(CompressError, match="first must be >= 1"):
        first_events(full, 0)


def test_the_loss_mask_restricts_the_loss_and_an_all_ones_mask_is_the_plain_mean():
    model = _target()
    seqs = greedy_continuations(model, _prompts(4, 8), 8, progress=False)
    specs = {"k1": (1, torch.arange(264))}
    kw = dict(steps=3, batch_size=2, lr=1e-3, seed=3, progress=False)
    plain, _ = distill_heads(model, seqs, specs, **kw)
    ones, _ = distill_heads(model, seqs, specs, loss_mask=torch.ones_like(seqs, dtype=torch.bool), **kw)
    masked, hist = distill_heads(model, seqs, specs, loss_mask=continuation_mask(seqs, 8), **kw)
    assert torch.allclose(plain["k1"].wqkv, ones["k1"].wqkv, atol=1e-6)
    assert not torch.allclose(plain["k1"].wqkv, masked["k1"].wqkv, atol=1e-4)
    assert hist["loss_positions"] == pytest.approx(9 / 16)
    with pytest.raises(CompressError, match="loss mask"):
        distill_heads(model, seqs, specs, loss_mask=torch.zeros_like(seqs, dtype=torch.bool), **kw)
    ev = head_events(model, plain, seqs, keep=continuation_mask(seqs, 8))
    assert [len(a) for a in ev["k1"]["agree"]] == [8] * 4  # positions 7..14 of 16 (the last has no next token)


def test_config_errors_name_the_field():
    assert SelfSpecConfig().train_source == "corpus"
    assert SelfSpecConfig(seq_len=128).generation_shape == (32, 96)
    assert SelfSpecConfig(seq_len=128, prompt_tokens=16, generate_tokens=300).generation_shape == (16, 300)
    with pytest.raises(RecipeError, match="train_source: Input should be 'corpus', 'generations' or 'mixed'"):
        SelfSpecConfig(train_source="generated")
    with pytest.raises(RecipeError, match=r"prompt_tokens \(128\) must be below seq_len \(128\)"):
        SelfSpecConfig(seq_len=128, prompt_tokens=128)
    with pytest.raises(RecipeError, match="generate_tokens: Input should be greater than or equal to 1"):
        SelfSpecConfig(generate_tokens=0)
    with pytest.raises(RecipeError, match="prompt_tokens: Input should be greater than or equal to 1"):
        SelfSpecConfig(prompt_tokens=0)
    with pytest.raises(RecipeError, match="generate_tokens: prompt_tokens \\+ generate_tokens = 128 \\+ 8192"):
        SelfSpecConfig(generate_tokens=8192)


def _recipe(mdir, text_file, **step):
    return {"version": 1, "model": {"id": mdir, "device": "cpu"}, "stages": [{"name": "draft", "steps": [
        {"algorithm": "self_spec", "exit_layers": [1, 2], "vocab_size": 64, "train_corpora": [text_file],
         "train_windows": 6, "eval_windows": 4, "seq_len": 32, "steps": 4, "batch_size": 2, "lr": 1e-3,
         "calibrator": None, **step}]}]}


def _run(recipe):
    from compress.pipeline import run_recipe
    from compress.recipe import validate_recipe
    return run_recipe(validate_recipe(recipe), progress=False, log=lambda *_: None)


def _weights(result):
    return {f"{n}.{k}": v.detach().clone() for n, h in result.state.self_spec.heads.items() for k, v in h.state().items()}


def _spy_training(monkeypatch) -> dict:
    """The windows and loss mask the step hands to distill_heads, recorded as it trains."""
    seen = {}
    real = selfspec_step.distill_heads

    def spy(model, train, specs, **kw):
        seen.update(train=train, mask=kw["loss_mask"])
        return real(model, train, specs, **kw)

    monkeypatch.setattr(selfspec_step, "distill_heads", spy)
    return seen


def test_recipe_set_override_trains_on_the_targets_own_continuations(tmp_path, text_file, monkeypatch):
    from compress.models import load_model
    from compress.recipe import load_recipe
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(mdir, text_file, prompt_tokens=10, generate_tokens=14)))
    recipe = load_recipe(path, ["stages[0].steps[0].train_source=generations"])
    assert recipe.stages[0].steps[0].train_source == "generations"
    seen = _spy_training(monkeypatch)
    result = _run(recipe)
    step = result.report["stages"][0]["steps"][0]
    assert step["training"]["source"] == "generations" and step["training"]["seq_len"] == 24
    assert set(step["depth_curve"]) == set(step["depth_curve_generations"]) == {"k1", "k2"}
    assert step["training"]["held_out_generations"]["sequences"] == 4
    assert list(step["training"]["phase_seconds"]) == [  # where the step's time went, in its order
        "text", "generations", "held_out_generations", "training", "held_out_windows",
        "held_out_generation_curves", "calibrator_and_stop"]
    assert step["training"]["teacher_cache"]["device"] == "cpu"  # the recipe's default: auto
    # the curve on each continuation's first 128 tokens: here all 14 of them, so the whole curve again
    assert step["training"]["held_out_generations"]["first_tokens"] == 128
    assert step["depth_curve_generations_first"] == step["depth_curve_generations"]
    assert list(step["depth_curve_generations_first_by_corpus"]) == [text_file]
    # the training text: each corpus window's first 10 tokens, continued greedily by the target
    target = load_model(mdir).model
    windows, _ = selfspec_step._windows(byte_tokenizer(), [text_file], "train", 32, 6)
    assert torch.equal(seen["train"][:, :10], windows[:, :10])
    assert torch.equal(seen["train"], greedy_continuations(target, windows[:, :10], 14, progress=False))
    assert torch.equal(seen["mask"], continuation_mask(seen["train"], 10, {EOS}))
    assert not torch.equal(seen["train"], windows[:, :24])  # not the corpus text: the target's own
    assert step["training"]["generation_cache"] == {"train": "miss", "held_out": "miss"}
    calls = []
    monkeypatch.setattr(selfspec_step, "greedy_fill", lambda *a, **kw: calls.append(1))
    again = _run(recipe)  # the same generations, read back from the cache, so the same heads
    assert calls == [] and torch.equal(seen["train"], greedy_continuations(target, windows[:, :10], 14, progress=False))
    assert again.report["stages"][0]["steps"][0]["training"]["generation_cache"] == {"train": "hit", "held_out": "hit"}
    assert all(torch.equal(v, _weights(again)[k]) for k, v in _weights(result).items())


def test_corpus_source_is_the_unchanged_default(tmp_path, text_file, monkeypatch):
    """train_source: corpus (and the default) trains exactly what the step trained before the option:
    distill_heads on the corpus windows with no mask; the held-out generations only add a report."""
    mdir = tiny_model_dir(tmp_path / "tiny", "qwen2")
    default = _run(_recipe(mdir, text_file))
    explicit = _run(_recipe(mdir, text_file, train_source="corpus", prompt_tokens=4, eval_generations=False))
    a, b = _weights(default), _weights(explicit)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    from compress.models import load_model
    target = load_model(mdir).model
    windows, _ = selfspec_step._windows(byte_tokenizer(), [text_file], "train", 32, 6)
    vmap = default.state.self_spec.heads["k1"].vocab_map
    direct, _ = distill_heads(target, windows, {"k1": (1, vmap), "k2": (2, vmap)}, steps=4, batch_size=2,
                              lr=1e-3, seed=0, progress=False)
    assert all(torch.equal(v, a[f"{n}.{k}"]) for n, h in direct.items() for k, v in h.state().items())
    rep = default.report["stages"][0]["steps"][0]
    assert rep["training"]["source"] == "corpus" and "depth_curve_generations" in rep
    assert "depth_curve_generations" not in explicit.report["stages"][0]["steps"][0]
    assert "depth_curve_generations_first" not in explicit.report["stages"][0]["steps"][0]


def test_generations_longer_than_the_targets_positions_are_refused(tmp_path, text_file):
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")  # 512 positions
    with pytest.raises(CompressError, match=r"prompt_tokens \+ generate_tokens = 8 \+ 600 exceeds the target's 512"):
        _run(_recipe(mdir, text_file, train_source="generations", generate_tokens=600))


def test_mixed_source_pools_the_corpus_windows_and_their_continuations(tmp_path, text_file, monkeypatch):
    """train_source: mixed trains on every corpus window (all positions) and its continuation (the
    continuation positions), in one pool; a mixed pool needs prompt + generated = seq_len."""
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    seen = _spy_training(monkeypatch)
    result = _run(_recipe(mdir, text_file, train_source="mixed", prompt_tokens=10, eval_generations=False))
    assert result.report["stages"][0]["steps"][0]["training"]["source"] == "mixed"
    windows, _ = selfspec_step._windows(byte_tokenizer(), [text_file], "train", 32, 6)
    n = windows.shape[0]
    assert torch.equal(seen["train"][:n], windows) and seen["mask"][:n].all()
    from compress.models import load_model
    generated = greedy_continuations(load_model(mdir).model, windows[:, :10], 22, progress=False)
    assert torch.equal(seen["train"][n:], generated)
    assert torch.equal(seen["mask"][n:], continuation_mask(generated, 10, {EOS}))
    with pytest.raises(RecipeError, match="train_source: mixed pools .* 10 \\+ 14 must equal seq_len \\(32\\)"):
        SelfSpecConfig(train_source="mixed", seq_len=32, prompt_tokens=10, generate_tokens=14)


PY_SOURCE = '''"""A module docstring is no unit's end."""


def area(w, h):
    """Width times height (ünïcode before the end moves byte offsets)."""
    return w * h


\f
class Box:
    """A box."""

    def volume(self, d):
        """Its volume.

        Over two lines.
        """
        return d


def bare(x):
    return x
'''


def test_unit_ends_are_after_docstrings_in_python_and_after_paragraphs_in_prose():
    from compress.draft.selfspec.generations import unit_ends
    ends = unit_ends(PY_SOURCE)
    assert [PY_SOURCE[:e].rsplit('"""', 2)[-2].strip() for e in ends] == [
        "Width times height (ünïcode before the end moves byte offsets).", "A box.", "Its volume.\n\n        Over two lines."]
    assert all(PY_SOURCE[e - 3:e] == '"""' and PY_SOURCE[e] == "\n" for e in ends)
    prose = "A title\n\nFirst paragraph ends here. Still.\n\nA second one?\n\nno sentence end\n\nThe last one."
    assert [prose[:e].rsplit("\n\n", 1)[-1] for e in unit_ends(prose)] == ["First paragraph ends here. Still.",
                                                                           "A second one?"]
    assert unit_ends("def broken(:\n    pass\n") == []  # not Python, and no paragraph ends a sentence


def test_unit_end_prompts_end_where_the_unit_ends_and_have_one_length():
    from compress.draft.selfspec.generations import unit_end_prompts, unit_ends
    tok = byte_tokenizer()
    texts = [PY_SOURCE, TEXT]
    prompts = unit_end_prompts(tok, texts, 40, 6, seed=1)
    assert prompts.shape == (6, 40)
    decoded = [bytes(p.tolist()).decode(errors="ignore") for p in prompts]
    assert all(d.endswith(".") for d in decoded)  # most ends are TEXT's paragraphs'
    every = [bytes(p.tolist()).decode(errors="ignore") for p in unit_end_prompts(tok, texts, 40, 1000)]
    assert len(every) == len(unit_ends(TEXT)) + 3
    assert sum(d.endswith('"""') for d in every) == 3 and all(d.endswith(('"""', ".")) for d in every)
    assert torch.equal(prompts, unit_end_prompts(tok, texts, 40, 6, seed=1))  # seeded
    assert not torch.equal(prompts, unit_end_prompts(tok, texts, 40, 6, seed=2))
    assert unit_end_prompts(tok, [PY_SOURCE], 40, 100).shape[0] == 3  # as many as there are
    assert unit_end_prompts(tok, [PY_SOURCE], 150, 100).shape[0] == 2  # ... with more tokens than asked before them
    with pytest.raises(CompressError, match="no unit end .* has 20000 tokens before it in these 2 documents"):
        unit_end_prompts(tok, texts, 20000, 3)


def test_unit_end_prompts_feed_the_generations_of_a_recipe(tmp_path, text_file, monkeypatch):
    """generation_prompts: unit_ends continues prompts that end after a paragraph (the corpus file is prose),
    train_windows of them, and the held-out generations use the validation split's; the report says so."""
    from compress.draft.selfspec.generations import unit_end_prompts
    from compress.models import load_model
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    seen = _spy_training(monkeypatch)
    result = _run(_recipe(mdir, text_file, train_source="generations", generation_prompts="unit_ends",
                          prompt_tokens=10, generate_tokens=14))
    training = result.report["stages"][0]["steps"][0]["training"]
    assert training["prompts"] == "unit_ends" and training["held_out_generations"]["prompts"] == "unit_ends"
    texts, _ = selfspec_step._documents(text_file, "train")
    prompts = unit_end_prompts(byte_tokenizer(), texts, 10, 6)
    assert prompts.shape[0] == 6 and torch.equal(seen["train"][:, :10], prompts)
    assert torch.equal(seen["train"], greedy_continuations(load_model(mdir).model, prompts, 14, progress=False))
    assert all(bytes(p.tolist()).decode().endswith(".") for p in prompts)
    with pytest.raises(RecipeError, match="generation_prompts: Input should be 'window_starts', 'unit_ends' or 'units'"):
        SelfSpecConfig(generation_prompts="docstrings")


def test_the_depth_curves_are_also_reported_per_corpus(tmp_path, text_file):
    """Beside the pooled curves, each corpus's own held-out curve (the bench scores a code and a prose set apart):
    its windows' agreement pooled by their counts gives the pooled agreement."""
    other = tmp_path / "other.txt"
    other.write_text(("def area(w, h):\n    return w * h\n\n" * 20 + "Another kind of text. " * 30 + "\n\n") * 6)
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    result = _run(_recipe(mdir, text_file, train_corpora=[text_file, str(other)], eval_windows=3))
    step = result.report["stages"][0]["steps"][0]
    by = step["depth_curve_by_corpus"]
    assert list(by) == [text_file, str(other)] and list(step["depth_curve_generations_by_corpus"]) == list(by)
    from compress.draft.selfspec.step import _corpus_windows
    parts, _ = _corpus_windows(byte_tokenizer(), [text_file, str(other)], "validation", 32, 3)
    counts = [p.shape[0] for p in parts]
    assert sum(counts) == step["training"]["held_out_windows"] and all(counts)
    for k in ("k1", "k2"):
        pooled = sum(n * by[c][k]["greedy_agreement"] for n, c in zip(counts, by)) / sum(counts)
        assert pooled == pytest.approx(step["depth_curve"][k]["greedy_agreement"], abs=1e-12)
    assert by[text_file]["k1"]["greedy_agreement"] != by[str(other)]["k1"]["greedy_agreement"]


def test_units_are_a_functions_header_and_docstring_alone_or_an_articles_title_and_first_paragraph():
    from compress.draft.selfspec.generations import units
    assert units(PY_SOURCE) == [
        'def area(w, h):\n    """Width times height (ünïcode before the end moves byte offsets)."""',
        'def volume(self, d):\n    """Its volume.\n\n    Over two lines.\n    """']  # dedented; no class, no bare def
    article = "A title\n\nFirst paragraph ends here. Still.\n\nA second one?\n\nThe last one."
    assert units(article) == ["A title\nFirst paragraph ends here. Still."]  # as the bench's prose prompts are
    assert units("Two lines\nare no title\n\nA paragraph.\n\nMore.") == []
    assert units("A title\n\nOnly one paragraph.") == []  # nothing follows it to draft


def test_unit_prompts_differ_in_length_within_the_bounds_and_are_seeded():
    from compress.draft.selfspec.generations import unit_prompts, units
    tok = byte_tokenizer()
    texts = [PY_SOURCE, "A title\n\nFirst paragraph ends here. Still.\n\nMore text."]
    every = unit_prompts(tok, texts, 200, 100)
    assert sorted(bytes(p.tolist()).decode() for p in every) == sorted(units(texts[0]) + units(texts[1]))
    assert len({p.numel() for p in every}) == 3
    short = unit_prompts(tok, texts, 60, 100)
    assert [p.numel() for p in short] == [41] and bytes(short[0].tolist()).decode().startswith("A title")
    assert [p.tolist() for p in unit_prompts(tok, texts, 200, 2, seed=1)] == \
        [p.tolist() for p in unit_prompts(tok, texts, 200, 2, seed=1)]
    with pytest.raises(CompressError, match="none of the 3 units .* has 8 to 20 tokens"):
        unit_prompts(tok, texts, 20, 5)


def test_greedy_fill_continues_prompts_of_different_lengths_as_each_alone():
    from compress.draft.selfspec.generations import greedy_fill
    model = _target()
    ids = byte_tokenizer()(TEXT)["input_ids"]
    prompts = [torch.tensor(ids[i * 41:i * 41 + n]) for i, n in enumerate([5, 12, 9, 12, 3])]
    got, lens = greedy_fill(model, prompts, 24, batch_size=2, progress=False)  # padded batches: (3, 5), (9, 12), (12)
    assert got.shape == (5, 24) and lens.tolist() == [5, 12, 9, 12, 3]
    for row, prompt in zip(got, prompts):
        alone = greedy_continuations(model, prompt[None], 24 - prompt.numel(), progress=False)[0]
        assert row.tolist() == alone.tolist()
    with pytest.raises(CompressError, match="prompts of 1..23 tokens"):
        greedy_fill(model, [torch.tensor(ids[:24])], 24, progress=False)


def test_continuation_mask_takes_each_rows_prompt_length():
    seqs = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 2, 3, EOS, 5, 6], [1, EOS, 3, 4, 5, 6]])
    mask = continuation_mask(seqs, torch.tensor([2, 3, 1]), {EOS})
    assert mask.tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert torch.equal(continuation_mask(seqs, torch.tensor([3, 3, 3])), continuation_mask(seqs, 3))
    with pytest.raises(CompressError, match="one per row \\(3\\), got \\[2, 3\\]"):
        continuation_mask(seqs, torch.tensor([2, 3]))


def test_unit_prompts_feed_the_generations_of_a_recipe(tmp_path, text_file, monkeypatch):
    """generation_prompts: units continues each unit alone to seq_len tokens; the loss starts at each row's own
    prompt end; the report gives the prompts' lengths."""
    from compress.draft.selfspec.generations import greedy_fill, unit_prompts
    from compress.models import load_model
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    sources = [PY_SOURCE.replace("area", f"area{i}").replace("volume", "v" * (i + 1)) for i in range(4)]
    monkeypatch.setattr(selfspec_step, "_documents", lambda corpus, split, exclude=(): (sources, 0))
    monkeypatch.setattr(selfspec_step, "_corpus_windows", lambda tok, corpora, split, seq_len, n, exclude=(): (
        [torch.tensor(tok(TEXT)["input_ids"][:n * seq_len]).view(n, seq_len)], 0))
    seen = _spy_training(monkeypatch)
    result = _run(_recipe(mdir, text_file, train_source="generations", generation_prompts="units", seq_len=128,
                          prompt_tokens=100))
    training = result.report["stages"][0]["steps"][0]["training"]
    prompts = unit_prompts(byte_tokenizer(), sources, 100, 6)
    assert len(prompts) == 6 and len({p.numel() for p in prompts}) > 1
    want, lens = greedy_fill(load_model(mdir).model, prompts, 128, progress=False)
    assert torch.equal(seen["train"], want)
    assert torch.equal(seen["mask"], continuation_mask(want, lens, {EOS}))
    assert training["prompts"] == "units" and training["prompt_tokens_max"] == 100 and training["sequence_tokens"] == 128
    assert training["prompt_lengths"] == {"min": int(lens.min()), "median": float(lens.float().median()),
                                          "max": int(lens.max())}
    assert training["held_out_generations"]["prompts"] == "units"
    with pytest.raises(RecipeError, match="generate_tokens \\(300\\): with generation_prompts: units"):
        SelfSpecConfig(generation_prompts="units", generate_tokens=300)


def test_the_learning_curve_scores_the_heads_as_they_train_and_changes_none(tmp_path, text_file, caplog):
    """learning_curve_every: first-draft agreement and α on the held-out continuations and on as many
    training ones after every N steps; its last point is the finished heads' held-out score, and the heads
    are the ones trained without it."""
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    kw = dict(train_source="mixed", prompt_tokens=10, generate_tokens=22, steps=5)
    plain = _run(_recipe(mdir, text_file, **kw))
    with caplog.at_level("INFO", logger="compress.draft.selfspec.train"):
        curved = _run(_recipe(mdir, text_file, learning_curve_every=2, **kw))
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [m.split(":")[0] for m in logged] == ["step 2", "step 4", "step 5"]  # readable before the run ends
    assert "held_out k1 " in logged[0] and "train k2 " in logged[0]
    a, b = _weights(plain), _weights(curved)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    training = curved.report["stages"][0]["steps"][0]["training"]
    curve = training["learning_curve"]
    assert [p["step"] for p in curve] == [2, 4, 5] and training["probe_seconds"] >= 0
    for point in curve:
        for text in ("held_out", "train"):
            assert set(point[text]) == {"k1", "k2"}
            assert all(0 <= v["greedy_agreement"] <= 1 and 0 <= v["alpha"] <= 1 for v in point[text].values())
    step = curved.report["stages"][0]["steps"][0]
    for k in ("k1", "k2"):  # the last point is the finished heads on the same positions as the report's curve
        assert curve[-1]["held_out"][k]["greedy_agreement"] == pytest.approx(
            step["depth_curve_generations_first"][k]["greedy_agreement"], abs=1e-12)
        assert curve[-1]["held_out"][k]["alpha"] == pytest.approx(
            step["depth_curve_generations_first"][k]["alpha"], abs=1e-6)
    assert "learning_curve" not in plain.report["stages"][0]["steps"][0]["training"]
    with pytest.raises(RecipeError, match="learning_curve_every \\(100\\) scores the heads on the held-out"):
        SelfSpecConfig(learning_curve_every=100, eval_generations=False)


def test_the_learning_curves_training_sample_is_continuations_fixed_by_the_seed():
    train = torch.arange(8 * 6).reshape(8, 6)
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[4:, :2] = False  # rows 4..7: continuations (their prompts are not scored); rows 0..3 corpus windows
    rows, keep = selfspec_step._train_sample(train, mask, 3, seed=1)
    assert rows.shape == (3, 6) and bool((rows[:, 0] >= 24).all()) and torch.equal(keep, mask[rows[:, 0] // 6])
    again, _ = selfspec_step._train_sample(train, mask, 3, seed=1)
    assert torch.equal(rows, again)
    every, none = selfspec_step._train_sample(train, None, 20, seed=0)
    assert none is None and sorted(every[:, 0].tolist()) == list(range(0, 48, 6))


def test_depth_and_draft_length_are_chosen_on_the_continuations_first_tokens(tmp_path, text_file):
    """With held-out continuations the choice follows their first eval_first_tokens (the curve that predicted
    the GPU bench), not the corpus windows; without them, the windows."""
    mdir = tiny_model_dir(tmp_path / "tiny", "llama")
    result = _run(_recipe(mdir, text_file, train_source="mixed", prompt_tokens=10, generate_tokens=22,
                          eval_first_tokens=6, gammas=[1, 2, 3]))
    step = result.report["stages"][0]["steps"][0]
    first = step["depth_curve_generations_first"]
    assert step["chosen_on"] == step["stop"]["gamma_from"] == "depth_curve_generations_first"
    assert step["default"] == max(("k1", "k2"), key=lambda k: max(first[k]["predicted_speedup"].values()))
    assert step["gamma"] == first[step["default"]]["best_gamma"]
    assert first != step["depth_curve_generations"]  # cut to 6 tokens: another curve than the whole continuations
    windows = _run(_recipe(mdir, text_file, eval_generations=False)).report["stages"][0]["steps"][0]
    assert windows["chosen_on"] == "depth_curve"
    assert windows["gamma"] == windows["depth_curve"][windows["default"]]["best_gamma"]
