"""The block engine and the shared-prefix self-drafter on tiny models: exactness, reuse, bad input."""
import copy
import functools
import json

import pytest
import torch
from scipy.stats import chisquare

from compress.cli import main
from compress.draft import run_speculative, run_target, target_generate
from compress.draft.engine import BlockEngine, EngineDecoder
from compress.draft.selfspec.head import ExitHead, HeadAsModel, check_vocabulary, trimmed_vocabulary
from compress.draft.selfspec.pair import SelfSpecPair
from compress.draft.speculative import process_logits
from compress.errors import CompressError
from compress.prune.shrink import Keep, remove_units
from tests.tiny import TEXT, TINY_ARCHS, byte_tokenizer, tiny_model, tiny_model_dir

NEW = 24
EOS = 256
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@functools.lru_cache(maxsize=None)
def _target(arch: str):
    model = tiny_model(arch)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # confident: the argmax is stable against float noise
    model.config.eos_token_id = model.generation_config.eos_token_id = EOS
    return model


def _prompts():
    tok = byte_tokenizer()
    return [torch.tensor(tok(TEXT[:40])["input_ids"]), torch.tensor(tok(TEXT[150:163])["input_ids"])]


def _export(mdir, target, head, out, name: str, gamma: int):
    """A self-spec export folder holding one head (``name``) for the tiny target at ``mdir``."""
    from compress.draft.selfspec.head import FORMAT, target_fingerprint, write_manifest
    out.mkdir()
    head.save_as(out, f"head-{name}.safetensors")
    write_manifest(out, {"format": FORMAT, "target": {"source": str(mdir), **target_fingerprint(target)},
                         "heads": {name: {"exit_layer": head.exit_layer, "vocab_size": head.vocab_size,
                                          "context": head.context, "file": f"head-{name}.safetensors"}},
                         "default": name, "gamma": gamma, "confidence_threshold": None})
    return out


def _head(model, k, vocab=None, context="shallow", scale=1e-3, seed=0):
    """An exit head; a deep one with a non-zero random map: h_k is small in the tiny models (std
    ~0.03-0.06) and the final states are ~1, so 1e-3 makes the map's term ~0.013 per channel — it moves
    the drafts (k = 2's acceptance drops from ~1 to ~0.4) without making every draft wrong."""
    torch.manual_seed(seed)
    vmap = torch.arange(model.lm_head.weight.shape[0]) if vocab is None else vocab
    head = ExitHead(model, k, vmap, context=context)
    if context == "deep":
        with torch.no_grad():
            head.wf.normal_(0, scale)
    return head


def _pair(model, k, vocab=None, context="shallow", **kw):
    head = _head(model, k, vocab, context)
    return SelfSpecPair(BlockEngine(model, 128, fuse=False, **kw), head), head


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_engine_logits_equal_the_models_own_forward(arch):
    model = _target(arch)
    ids = _prompts()[0]
    want = model(input_ids=ids[None]).logits[0]
    got = EngineDecoder(BlockEngine(copy.deepcopy(model), 64))(ids, ids.numel())
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_engine_runs_a_pruned_model_with_per_layer_kv_heads():
    model = copy.deepcopy(_target("llama"))
    full = Keep(groups=torch.arange(2), channels=torch.arange(320))
    remove_units(model, [full, Keep(groups=torch.tensor([1]), channels=torch.arange(0, 320, 2)), full])
    ids = _prompts()[0]
    want = model(input_ids=ids[None]).logits[0]
    engine = BlockEngine(model, 64)
    assert [k.shape[0] for k in engine.k] == [2, 1, 2]
    assert engine.kv is None  # per-layer caches; an unpruned model's are views of one tensor:
    whole = BlockEngine(_target("llama"), 64)
    assert all(k.data_ptr() == whole.kv[0, i].data_ptr() and v.data_ptr() == whole.kv[1, i].data_ptr()
               for i, (k, v) in enumerate(zip(whole.k, whole.v)))
    got = EngineDecoder(engine)(ids, ids.numel())
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_self_drafter_greedy_is_token_identical_for_every_depth_vocab_and_stop(arch):
    model = _target(arch)
    for prompt in _prompts():
        want = target_generate(model, prompt, NEW).tokens.tolist()
        for k in (1, 2):
            for vocab in (None, trimmed_vocabulary([want], 40, vocab_size=264, always=[EOS])):
                pair, _ = _pair(model, k, vocab)
                ref = run_target(pair.target, prompt, NEW, pad_to=4).tokens.tolist()
                assert ref == want
                for threshold in (None, 0.5):
                    got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=3,
                                          confidence_threshold=threshold, pad_verify=True)
                    assert got.tokens.tolist() == want, (k, vocab is None, threshold)
                    assert sum(got.accepted) + got.target_calls == NEW


def test_the_last_block_as_exit_head_drafts_the_target_exactly():
    """k = L−1 with a copy of the last block as the head is the target itself: every draft accepted."""
    model = _target("llama")
    pair, _ = _pair(model, 2)
    res = run_speculative(pair.target, pair.drafter, _prompts()[0], max_new_tokens=NEW, gamma=3, pad_verify=True)
    assert res.acceptance_rate == 1.0 and res.target_calls == NEW // 4


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("k", [1, 2])
def test_a_head_started_as_block_k_is_the_targets_early_exit_after_block_k_plus_one(arch, k):
    """init "next": the untrained head is block k itself, so its logits are the target's final norm and LM
    head on the state after block k + 1 (the logit lens there); the default starts as the last block."""
    model = _target(arch)
    seq = _prompts()[0][None]
    with torch.no_grad():
        out = model(input_ids=seq, output_hidden_states=True)
        states = out.hidden_states
        cos, sin = model.model.rotary_emb(states[k], torch.arange(seq.shape[1])[None])
        head = ExitHead(model, k, torch.arange(264), init="next")
        got = head.forward_sequence(states[k], cos[0], sin[0])
        lens = model.lm_head(model.model.norm(states[k + 1])).float() if k + 1 < 3 else out.logits.float()
    assert torch.allclose(got, lens, atol=1e-4)
    assert torch.equal(head.wo, model.model.layers[k].self_attn.o_proj.weight.float())
    assert torch.equal(ExitHead(model, k, torch.arange(264)).wo, model.model.layers[-1].self_attn.o_proj.weight.float())
    # auto (the default): block 0 at depth 0, where the last block would read an embedding it never sees
    assert torch.equal(ExitHead(model, 0, torch.arange(264), "deep").wo, model.model.layers[0].self_attn.o_proj.weight.float())
    assert torch.equal(ExitHead(model, 0, torch.arange(264), "deep", init="last").wo,
                       model.model.layers[-1].self_attn.o_proj.weight.float())
    with pytest.raises(CompressError, match="head init must be one of auto, last, next, got 'first'"):
        ExitHead(model, k, torch.arange(264), init="first")


@pytest.mark.parametrize("arch, k, context", [("qwen2", 1, "shallow"), ("llama", 2, "deep")])
def test_verification_reuses_the_shallow_blocks_of_every_drafted_token(arch, k, context):
    model = _target(arch)
    pair, _ = _pair(model, k, context=context)
    prompt = _prompts()[0]
    for threshold in (None, 0.5):
        res = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=3,
                              confidence_threshold=threshold, pad_verify=True)
        if context == "deep":  # some rounds re-feed accepted drafts to the head: its catch-up reruns no shallow block
            assert sum(res.accepted) > 0
        rows = pair.shallow_rows
        # the verifier runs the first k blocks once a round: on the one token no drafting step has
        # seen (the last draft, or the pending token when nothing was drafted) — never on the others
        assert rows["verifier"] == res.target_calls
        # the drafter runs them on the prompt once and on each token it drafts from
        assert rows["drafter"] == prompt.numel() - 1 + res.drafter_calls
        alone = run_target(pair.target, prompt, NEW)
        assert pair.shallow_rows["verifier"] == prompt.numel() - 1 + alone.target_calls


@pytest.mark.parametrize("k, context", [(1, "shallow"), (2, "deep")])
def test_fused_greedy_rounds_and_stepwise_rounds_agree(k, context):
    model = _target("llama")
    pair, _ = _pair(model, k, context=context)
    prompt = _prompts()[1]
    fused = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=3, pad_verify=True)
    assert pair.drafter.rounds_fused > 0
    stepwise = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=3, pad_verify=True,
                               confidence_threshold=0.0)  # a threshold of 0 never stops: same drafts, step by step
    assert fused.tokens.tolist() == stepwise.tokens.tolist() and fused.accepted == stepwise.accepted


@pytest.mark.parametrize("k, context", [(1, "shallow"), (2, "deep"), (0, "deep")])
def test_a_fused_head_step_drafts_what_the_unfused_one_does(k, context):
    """fuse_head compiles a round's head step whole (aot_eager here: the mutations of the head's keys and
    final states go through functionalisation as under inductor); the drafts, the accepted counts and the
    output are the unfused pair's, and the output is the target alone's."""
    from compress.draft.decoders import self_spec_pair
    model = _target("llama")
    head = _head(model, k, None, context)
    prompt = _prompts()[1]
    runs = []
    for fuse in (False, True):
        target, drafter = self_spec_pair(BlockEngine(model, 128, fuse=False, compile="aot_eager"), head,
                                         compile="aot_eager", fuse_head=fuse)
        assert drafter.pair.fuse_head is fuse
        runs.append(run_speculative(target, drafter, prompt, max_new_tokens=NEW, gamma=3, pad_verify=True))
        assert drafter.rounds_fused > 0
    assert runs[0].tokens.tolist() == runs[1].tokens.tolist() and runs[0].accepted == runs[1].accepted
    assert runs[1].tokens.tolist() == run_target(target, prompt, NEW).tokens.tolist()


def test_a_fused_head_step_needs_compile_and_is_the_default_only_for_graphed_rounds():
    from compress.draft.decoders import self_spec_pair
    model = _target("llama")
    head = _head(model, 1, None, "shallow")
    with pytest.raises(CompressError, match="fuse_head.*needs compile"):
        self_spec_pair(BlockEngine(model, 64, fuse=False), head, fuse_head=True)
    # unset: on only where the round is a CUDA graph (compile on a GPU); a CPU pair keeps the eager step
    for compile in (False, "aot_eager"):
        _, drafter = self_spec_pair(BlockEngine(model, 64, fuse=False), head, compile=compile)
        assert drafter.pair.fuse_head is False


def test_self_drafter_sampling_is_exact_on_the_first_token():
    """Drafting from a trimmed head (q zero off its 24 ids) and rejection sampling must still emit
    tokens distributed as the target's (processed) distribution."""
    model = copy.deepcopy(_target("llama"))
    with torch.no_grad():
        model.lm_head.weight.div_(3)  # a flatter target: ~30 tokens in the top-p nucleus
    prompt = _prompts()[1]
    with torch.no_grad():
        p = process_logits(model(input_ids=prompt[None]).logits[0, -1], 1.0, 0.9)
    vocab = torch.cat([p.topk(12).indices, torch.arange(200, 212)]).unique()
    vocab = torch.cat([vocab, torch.tensor([EOS])]).unique()
    pair, _ = _pair(model, 1, vocab)
    n = 600
    counts = torch.zeros_like(p)
    for seed in range(n):
        res = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=2, gamma=1, mode="sample",
                              top_p=0.9, seed=seed)
        counts[res.tokens[0]] += 1
    big = p * n >= 5
    obs = torch.cat([counts[big], counts[~big].sum(0, keepdim=True)])
    exp = torch.cat([p[big] * n, (p[~big] * n).sum(0, keepdim=True)])
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_a_head_over_another_vocabulary_scores_the_same_rows_alike():
    """with_vocabulary (the bench's untrimmed row): the trained weights carried over, every row the
    trimmed head scores scored the same, the others added."""
    model = tiny_model("qwen2")
    vocab = torch.tensor([0, 5, 7, 40, 99])
    trimmed = _head(model, 2, vocab, "deep")
    full = trimmed.with_vocabulary(model, torch.arange(model.lm_head.weight.shape[0]))
    assert full.vocab_size == model.lm_head.weight.shape[0] and full.context == "deep"
    assert torch.equal(full.wf, trimmed.wf) and torch.equal(full.wqkv, trimmed.wqkv)
    state = torch.randn(3, model.config.hidden_size)
    assert torch.allclose(full.logits(state)[:, vocab], trimmed.logits(state))


def test_bad_inputs_are_clear_errors():
    model = _target("llama")
    with pytest.raises(CompressError, match="exit_layer must be an integer in 0..2"):
        ExitHead(model, 3, torch.arange(264))
    with pytest.raises(CompressError, match="exit_layer 0 needs context 'deep'"):
        ExitHead(model, 0, torch.arange(264))
    with pytest.raises(CompressError, match="misses the target's EOS"):
        check_vocabulary(torch.arange(100), 264, {EOS})
    with pytest.raises(CompressError, match="EOS"):
        ExitHead(model, 1, torch.arange(100))
    with pytest.raises(CompressError, match="repeats"):
        check_vocabulary(torch.tensor([1, 1, EOS]), 264, {EOS})
    assert trimmed_vocabulary([[5, 5, 7]], 4, vocab_size=264, always=[EOS]).tolist() == [0, 5, 7, EOS]


def _self_spec_export(tmp_path, text_file, arch="qwen2"):
    from compress.pipeline import run_recipe
    from compress.recipe import validate_recipe
    mdir = tiny_model_dir(tmp_path / "tiny", arch)
    recipe = validate_recipe({"version": 1, "model": {"id": mdir, "device": "cpu"}, "stages": [{"name": "draft", "steps": [
        {"algorithm": "self_spec", "exit_layers": [1, 2], "vocab_size": 64, "full_vocab_layers": [1],
         "train_corpora": [text_file], "train_windows": 8, "eval_windows": 4, "seq_len": 32, "steps": 4,
         "batch_size": 2, "lr": 1e-3, "gamma": 3}]}], "export": {"format": "self-spec"}})
    result = run_recipe(recipe, out_dir=tmp_path / "drafter", progress=False, log=lambda *_: None)
    return mdir, tmp_path / "drafter", result


def test_recipe_trains_exports_and_reloads_heads(tmp_path, text_file):
    from compress.draft.selfspec.step import load_self_spec
    from compress.models import load_model
    mdir, out, result = _self_spec_export(tmp_path, text_file)
    step = result.report["stages"][0]["steps"][0]
    assert set(step["depth_curve"]) == {"k1", "k2", "k1-full"} and step["default"] in ("k1", "k2")
    assert {"before", "after"} <= set(step["stop"]["acceptance_calibration"])
    manifest = json.loads((out / "self_spec.json").read_text())
    assert manifest["gamma"] == 3 and step["stop"]["gamma_from"] == "recipe"  # pinned, not the curve's choice
    assert manifest["heads"]["k1"]["vocab_size"] == 64 and manifest["heads"]["k1-full"]["vocab_size"] == 264
    assert not (out / "model.safetensors").exists()  # the target is referenced, never copied
    target = load_model(mdir).model
    head, _, cal = load_self_spec(out, target, "k1")
    trained = result.state.self_spec.heads["k1"]
    assert torch.equal(head.wqkv, trained.wqkv.detach().to(torch.bfloat16).float())
    assert cal is not None and cal.target == "drafter"
    other = tiny_model(arch="qwen2", seed=5)
    with pytest.raises(CompressError, match="another target"):
        load_self_spec(out, other)
    logits = HeadAsModel(target, head)(_prompts()[0][None], logits_to_keep=3).logits
    assert logits.shape == (1, 3, 264) and torch.isinf(logits).any()  # −inf off the trimmed ids


def test_cli_draft_bench_with_a_self_spec_drafter(tmp_path, text_file, capsys):
    mdir, out, _ = _self_spec_export(tmp_path, text_file, "llama")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def add(a, b):\n    return\n\nThe quick brown fox\n")
    args = ["draft-bench", "--target", mdir, "--drafter", str(out), "--prompts", str(prompts),
            "--max-new-tokens", "12", "--device", "cpu", "--head", "k2", "--out", str(tmp_path / "b")]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["gamma"] == 3 and len(res["speculative"]["drafted"]) == 3  # the export's draft length
    assert res["self_spec"]["exit_layer"] == 2 and res["identical"] and res["identical_prompts"] == 2
    assert res["self_spec"]["fused_head"] is False  # on the CPU the head step stays eager
    assert res["decoders"] == {"target": "_Verifier", "drafter": "_Drafter"}
    assert set(res["time_split"]) == {"draft", "verify", "prefill", "bookkeeping"}
    assert 0 <= res["alpha"] <= 1 and res["c"] > 0
    assert main([*args[:-4], "--head", "k9"]) == 2
    assert "no head 'k9'" in capsys.readouterr().err
    # draft-eval scores the head teacher-forced, as a model over the full vocabulary
    assert main(["draft-eval", "--target", mdir, "--drafter", str(out), "--text", str(prompts), "--gammas", "1,3",
                 "--max-new-tokens", "8", "--device", "cpu", "--head", "k2"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert 0 <= ev["greedy_agreement"] <= 1 and set(ev["tau"]) == {"1", "3"}


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("context, k", [("shallow", 1), ("deep", 2), ("deep", 0)])
def test_gpu_compiled_graphs_self_drafter_is_identical_to_the_matched_reference(arch, context, k):
    model = copy.deepcopy(_target(arch)).to("cuda", torch.bfloat16)
    vocab = trimmed_vocabulary([list(range(40, 120))], 64, vocab_size=264, always=[EOS])
    head = _head(model, k, vocab, context).cuda()
    pair = SelfSpecPair(BlockEngine(model, 128, compile=True), head, graphs=True)
    for prompt in _prompts():
        prompt = prompt.cuda()
        ref = run_target(pair.target, prompt, NEW, pad_to=5).tokens.tolist()
        for threshold in (None, 0.5):
            got = run_speculative(pair.target, pair.drafter, prompt, max_new_tokens=NEW, gamma=4,
                                  confidence_threshold=threshold, pad_verify=True)
            assert got.tokens.tolist() == ref
    assert pair.drafter.rounds_fused > 0 and pair.graphs.enabled and pair.graphs.error is None
    # prefills ran padded to their buckets as recorded graphs of their own (engine.prefill_bucket)
    assert pair.prefill_buckets and pair.prefill_graphs.enabled and pair.prefill_graphs.error is None
    assert {key[0] for key in pair.prefill_graphs._graphs} >= ({"shallow", "deep"} if k else {"deep"})


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("context, k", [("deep", 1), ("shallow", 2)])
def test_gpu_fused_head_step_is_identical_to_the_matched_reference(context, k):
    """fuse_head under inductor and the round's CUDA graphs, bf16: the output stays the target alone's."""
    from compress.draft.decoders import self_spec_pair
    model = copy.deepcopy(_target("llama")).to("cuda", torch.bfloat16)
    vocab = trimmed_vocabulary([list(range(40, 120))], 64, vocab_size=264, always=[EOS])
    head = _head(model, k, vocab, context).cuda()
    target, drafter = self_spec_pair(BlockEngine(model, 128, compile=True), head, compile=True, fuse_head=True)
    for prompt in _prompts():
        prompt = prompt.cuda()
        ref = run_target(target, prompt, NEW, pad_to=5).tokens.tolist()
        got = run_speculative(target, drafter, prompt, max_new_tokens=NEW, gamma=4, pad_verify=True)
        assert got.tokens.tolist() == ref
    assert drafter.rounds_fused > 0 and drafter.pair.graphs.enabled and drafter.pair.graphs.error is None
