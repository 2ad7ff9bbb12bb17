"""S2FT training: data and label masking, the loop, checkpoint/resume, the s2ft recipe step and its
order with pruning and quantization, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from compress.errors import CompressError, RecipeError
from compress.finetune import (IGNORE, ADAPTER_CONFIG, ADAPTER_WEIGHTS, TrainConfig, apply_s2ft, check_dataset,
                               instruction_dataset, latest_checkpoint, lm_dataset, load_adapter, topic_dataset,
                               train)
from compress.models import load_model
from compress.pipeline import run_recipe
from compress.tasks import BBC_TOPICS, topic_prompt
from tests.tiny import byte_tokenizer, tiny_model, tiny_model_dir


QUIET = dict(progress=False, log=lambda *_: None)
S2FT = dict(attention_ratio=0.5, mlp_ratio=0.1, attention_modules=["o_proj"], mlp_modules=["down_proj"])


@pytest.fixture
def topics_file(tmp_path):
    """A labelled .jsonl corpus: the label word is in the text, so it is learnable."""
    path = tmp_path / "topics.jsonl"
    rows = [{"text": f"{BBC_TOPICS[i % 5]} story {i}: the {BBC_TOPICS[i % 5]} desk reports.",
             "label": BBC_TOPICS[i % 5]} for i in range(80)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pairs(n=12):
    return [(f"Q{i}: say {BBC_TOPICS[i % 5]}\nTopic:", " " + BBC_TOPICS[i % 5]) for i in range(n)]


def _deltas(handle):
    return {n: p.detach().clone() for n, p in handle.named_parameters()}


# ------------------------------------------------------------------ data


def test_labels_mask_everything_but_the_answer_tokens():
    tok = byte_tokenizer()
    ds = instruction_dataset(tok, _pairs(3), max_len=64)
    for (prompt, answer), row in zip(_pairs(3), ds):
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert row["input_ids"][n_prompt:] == answer_ids
        assert row["labels"] == [IGNORE] * n_prompt + answer_ids


def test_topic_data_comes_from_the_train_split_and_keeps_the_prompt_ending(topics_file):
    from compress.data.corpora import split_documents
    tok = byte_tokenizer()
    ds = topic_dataset(tok, topics_file, "train", max_len=120, max_chars=600)
    train_docs = split_documents(topics_file, "train")
    assert len(ds) == len(train_docs) and 0 < len(ds) < 80  # test/validation documents are not used
    for row, doc in zip(ds, train_docs):
        assert len(row["input_ids"]) <= 120
        labelled = [t for t in row["labels"] if t != IGNORE]
        assert tok.decode(labelled[:-1]) == " " + doc.label and labelled[-1] == tok.eos_token_id
        prompt = tok.decode(row["input_ids"][:len(row["input_ids"]) - len(labelled)])
        assert prompt.endswith("\nTopic:") and prompt.startswith(topic_prompt("x").split("Article")[0])
    with pytest.raises(CompressError, match="not 'test'"):
        topic_dataset(tok, topics_file, "test")


def test_lm_windows_label_every_token(text_file):
    ds = lm_dataset(byte_tokenizer(), text_file, "train", max_len=32, max_examples=5)
    assert len(ds) == 5 and all(r["labels"] == r["input_ids"] and len(r["input_ids"]) == 32 for r in ds)
    # our own content fingerprint (no dill pickling of the table): stable, and it follows the data
    assert lm_dataset(byte_tokenizer(), text_file, "train", max_len=32, max_examples=5)._fingerprint == ds._fingerprint
    assert lm_dataset(byte_tokenizer(), text_file, "train", max_len=32, max_examples=4)._fingerprint != ds._fingerprint


def test_bad_data_is_refused(tmp_path, topics_file):
    tok = byte_tokenizer()
    unlabelled = tmp_path / "plain.jsonl"
    unlabelled.write_text("".join(json.dumps({"text": f"article {i}"}) + "\n" for i in range(30)))
    with pytest.raises(CompressError, match="have no label"):
        topic_dataset(tok, str(unlabelled))
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(json.dumps({"text": f"a {i}", "label": "weather"}) + "\n" for i in range(30)))
    with pytest.raises(CompressError, match="unknown topic labels"):
        topic_dataset(tok, str(odd))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CompressError, match="empty"):
        topic_dataset(tok, str(empty))
    with pytest.raises(CompressError, match="empty"):
        instruction_dataset(tok, [])
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(CompressError, match="fewer than one window"):
        lm_dataset(tok, str(short), max_len=64)
    import datasets
    with pytest.raises(CompressError, match="empty"):
        check_dataset(datasets.Dataset.from_dict({"input_ids": [], "labels": []}))
    with pytest.raises(CompressError, match=r"no \['labels'\] column"):
        check_dataset(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]]}))
    with pytest.raises(CompressError, match="missing labels"):
        check_dataset(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "labels": [[1, IGNORE, IGNORE]]}))
    model = tiny_model()
    with pytest.raises(CompressError, match="no trainable parameters"):
        train(model, [], instruction_dataset(tok, _pairs(2)), progress=False)


# ------------------------------------------------------------------ the loop


def test_loss_decreases_and_only_the_deltas_move():
    tok = byte_tokenizer()
    model = tiny_model()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = apply_s2ft(model, {"mlp_ratio": 0.5})
    ds = instruction_dataset(tok, _pairs(12))
    res = train(model, handle.named_parameters(), ds, TrainConfig(steps=20, batch_size=4, lr=3e-2, warmup=2),
                pad_id=tok.pad_token_id, progress=False)
    assert len(res.losses) == 20
    assert sum(res.losses[-3:]) / 3 < 0.75 * sum(res.losses[:3]) / 3  # 5.3 -> 3.3 on this random model
    assert any(float(p.detach().abs().max()) > 0 for p in handle.parameters())
    assert all(p.grad is None for p in model.parameters())  # frozen weights never got a .grad
    handle.remove(merge=False)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, frozen[n], rtol=0, atol=1e-6)


def test_the_same_loop_trains_full_model_parameters():
    tok = byte_tokenizer()
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(True)
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    res = train(model, model.named_parameters(), instruction_dataset(tok, _pairs(8)),
                TrainConfig(steps=6, batch_size=4, lr=1e-3), pad_id=tok.pad_token_id, progress=False)
    assert res.losses[-1] < res.losses[0]
    assert not torch.equal(before, model.model.layers[0].self_attn.q_proj.weight)


class Crash(Exception):
    pass


def test_crash_and_resume_give_the_uninterrupted_result(tmp_path):
    tok = byte_tokenizer()
    ds = instruction_dataset(tok, _pairs(10))
    cfg = dict(steps=7, batch_size=3, grad_accum=2, lr=5e-3, warmup=2, seed=3)

    model = tiny_model()
    handle = apply_s2ft(model, S2FT)
    whole = train(model, handle.named_parameters(), ds, TrainConfig(**cfg), pad_id=tok.pad_token_id,
                  progress=False)
    expected = _deltas(handle)

    ckpt = tmp_path / "ckpt"
    cfg_ckpt = TrainConfig(**cfg, checkpoint_dir=str(ckpt), checkpoint_every=2)

    def crash_at_5(step, loss):
        if step == 5:
            raise Crash

    model = tiny_model()
    handle = apply_s2ft(model, S2FT)
    with pytest.raises(Crash):
        train(model, handle.named_parameters(), ds, cfg_ckpt, pad_id=tok.pad_token_id, progress=False,
              on_step=crash_at_5)
    last = latest_checkpoint(ckpt)
    assert last.name == "checkpoint-0000004"  # step 5 was lost, 4 was saved; older ones are pruned
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-0000004"]
    assert sorted(p.name for p in last.iterdir()) == ["checkpoint.safetensors", "trainer_state.json"]

    model = tiny_model()  # a fresh process: new model, zero deltas
    handle = apply_s2ft(model, S2FT)
    resumed = train(model, handle.named_parameters(), ds, cfg_ckpt, pad_id=tok.pad_token_id, progress=False)
    assert resumed.start_step == 4 and len(resumed.step_seconds) == 3
    assert resumed.losses == whole.losses
    for name, value in _deltas(handle).items():
        assert torch.equal(value, expected[name]), name
    assert latest_checkpoint(ckpt).name == "checkpoint-0000007"

    other = TrainConfig(**{**cfg, "lr": 1e-3}, checkpoint_dir=str(ckpt))
    model = tiny_model()
    handle = apply_s2ft(model, S2FT)
    with pytest.raises(CompressError, match=r"another run.*lr: 0.005 -> 0.001"):
        train(model, handle.named_parameters(), ds, other, pad_id=tok.pad_token_id, progress=False)


# ------------------------------------------------------------------ recipes


def _s2ft_step(corpus, **kw):
    return {"algorithm": "s2ft", **S2FT, "corpus": corpus, "steps": 4, "batch_size": 4, "lr": 5e-3,
            "max_len": 128, "max_chars": 40, **kw}


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(24).view(2, 12), use_cache=False).logits


def test_recipe_trains_merges_and_exports_the_adapter(tmp_path, topics_file, text_file):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = {"model": {"id": model_dir, "device": "cpu"},
              "stages": [{"name": "finetune", "steps": [_s2ft_step(topics_file)]}],
              "verify": {"corpus": text_file, "split": "test", "seq_len": 32, "max_windows": 2}}
    out = tmp_path / "out"
    res = run_recipe(recipe, out_dir=out, **QUIET)
    step = res.report["stages"][0]["steps"][0]
    assert step["steps"] == 4 and step["trainable_params"] > 0 and step["adapter"] == "s2ft_adapter"
    assert not any(type(m).__name__ == "S2FTLinear" for m in res.model.modules())  # merged: a plain model
    assert {p.name for p in (out / "s2ft_adapter").iterdir()} == {ADAPTER_WEIGHTS, ADAPTER_CONFIG}
    assert not (out / ADAPTER_CONFIG).exists()  # the export itself is no PEFT adapter folder
    exported = load_model(str(out)).model
    torch.testing.assert_close(_logits(exported), _logits(res.model))
    # The adapter round-trips: fused onto the original base it gives the exported model.
    base = load_model(model_dir).model
    load_adapter(base, out / "s2ft_adapter", fuse=True)
    torch.testing.assert_close(_logits(base), _logits(exported), rtol=1e-5, atol=1e-5)


def test_finetune_then_gptq_runs_and_quantize_then_finetune_is_refused(tmp_path, text_file):
    model_dir = tiny_model_dir(tmp_path / "m")
    calibration = {"corpus": text_file, "num_samples": 4, "seq_len": 32, "seed": 0, "batch_size": 2}
    finetune = {"name": "finetune", "steps": [_s2ft_step(text_file, task="lm", max_len=32, steps=3)]}
    quantize = {"name": "quantize", "steps": [{"algorithm": "gptq", "bits": 4, "group_size": 32}]}
    res = run_recipe({"model": {"id": model_dir, "device": "cpu"}, "calibration": calibration,
                      "stages": [finetune, quantize], "export": {"format": "gptq"}},
                     out_dir=tmp_path / "out", **QUIET)
    assert res.state.quant and "s2ft_adapter" in res.state.adapters
    assert (tmp_path / "out" / "s2ft_adapter" / ADAPTER_WEIGHTS).is_file()
    assert res.report["stages"][0]["steps"][0]["loss_last"] is not None
    with pytest.raises(CompressError, match="before the quantization stage"):
        run_recipe({"model": {"id": model_dir, "device": "cpu"}, "calibration": calibration,
                    "stages": [quantize, finetune]}, **QUIET)


def test_nirvana_then_s2ft_recovers_a_model_with_per_layer_sizes(tmp_path, text_file, topics_file):
    model_dir = tiny_model_dir(tmp_path / "m")
    prune = {"name": "prune", "steps": [{"algorithm": "nirvana", "sparsity": 0.3, "gamma": 2.0,
                                         "ignore": ["lm_head", "model.layers.2.*"]}]}
    recover = {"name": "recover", "steps": [_s2ft_step(topics_file)]}
    res = run_recipe({"model": {"id": model_dir, "device": "cpu"},
                      "calibration": {"corpus": text_file, "num_samples": 4, "seq_len": 32, "batch_size": 2},
                      "stages": [prune, recover]}, out_dir=tmp_path / "out", **QUIET)
    dims = res.model.config.pruned_layers
    assert len({json.dumps(d) for d in dims}) > 1  # the blocks really have different sizes
    step = res.report["stages"][1]["steps"][0]
    assert step["trainable_params"] > 0 and step["loss_last"] < step["loss_first"] * 2
    again = load_model(str(tmp_path / "out")).model
    torch.testing.assert_close(_logits(again), _logits(res.model))


@pytest.mark.parametrize("bad, match", [({"mlp_ratio": 1.5}, "mlp_ratio"), ({"attention_ratio": -0.1}, "attention_ratio"),
                                        ({"mlp_ratio": 0, "attention_ratio": 0}, "nothing to train"),
                                        ({"steps": 0}, "steps"), ({"task": "qa"}, "task"),
                                        ({"corpus": "nope"}, "unknown corpus"),
                                        ({"targets": ["re:.*q_proj"]}, "targets/ignore")])
def test_recipe_refuses_bad_values(tmp_path, topics_file, bad, match):
    model_dir = tiny_model_dir(tmp_path / "m")
    recipe = {"model": {"id": model_dir, "device": "cpu"},
              "stages": [{"name": "f", "steps": [{**_s2ft_step(topics_file), **bad}]}]}
    with pytest.raises((RecipeError, CompressError), match=match):
        run_recipe(recipe, **QUIET)
