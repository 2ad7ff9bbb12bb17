"""compress.data.selection: probe KL, diversity (k-means) and KL calibration-set selection."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from compress.data.calibration_set import build_calibration_set, calibration_set_from_offsets
from compress.data.selection import (STRATEGIES, diversity_select, kl_on_probe,
                                     mean_pooled_hidden, probe_set, select_calibration_set)
from compress.errors import CompressError
from tests.tiny import TEXT, byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("selection") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def probe(tok, corpus):
    return probe_set(tok, corpus, num_samples=5, seq_len=24)


def _noisy_copy(model, scale: float, seed: int = 0):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


# ------------------------------------------------------------------ probe & KL

def test_probe_set_fingerprint_and_no_test_split(tok, corpus, probe):
    assert probe.input_ids.shape == (5, 24)
    assert probe.fingerprint["strategy"] == "probe" and probe.fingerprint["split"] == "validation"
    assert probe.fingerprint["seed"] == 1234
    assert probe_set(tok, corpus, num_samples=5, seq_len=24).digest == probe.digest
    with pytest.raises(CompressError, match="test"):
        probe_set(tok, corpus, split="test")


def test_kl_zero_for_identical_models(model, probe):
    assert kl_on_probe(model, model, probe, device="cpu") == pytest.approx(0.0, abs=1e-7)
    twin = copy.deepcopy(model)
    assert kl_on_probe(model, twin, probe, device="cpu") == pytest.approx(0.0, abs=1e-7)


def test_kl_positive_after_perturbation_and_grows_with_noise(model, probe):
    small = kl_on_probe(model, _noisy_copy(model, 0.01), probe, device="cpu")
    large = kl_on_probe(model, _noisy_copy(model, 0.05), probe, device="cpu")
    assert 0 < small < large


def test_kl_matches_full_tensor_computation(model, probe):
    cand = _noisy_copy(model, 0.03)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=probe.input_ids).logits.float(), -1)
        logq = F.log_softmax(cand(input_ids=probe.input_ids).logits.float(), -1)
    direct = float((logp.exp() * (logp - logq)).sum(-1).mean())
    # batch 2 over 5 windows: a partial last batch
    kl = kl_on_probe(model, cand, probe, device="cpu", batch_size=2)
    assert kl == pytest.approx(direct, rel=1e-4)


def test_kl_restores_mode(model, probe):
    cand = _noisy_copy(model, 0.01).train()
    kl_on_probe(model, cand, probe, device="cpu")
    assert cand.training and not model.training
    assert next(cand.parameters()).device.type == "cpu"


def test_mean_pooled_hidden_matches_direct(model):
    ids = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(0))
    feats = mean_pooled_hidden(model, ids, device="cpu", batch_size=2)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert feats.shape == (5, 160) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    torch.testing.assert_close(feats, hs[-1].mean(1))
    torch.testing.assert_close(mean_pooled_hidden(model, ids, device="cpu", layer=1), hs[1].mean(1))


# ------------------------------------------------------------------ diversity_select

def _three_clusters():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    sizes = (10, 7, 5)
    feats = torch.cat([c + torch.randn(k, 2, generator=gen) for c, k in zip(centers, sizes)])
    labels = [0] * 10 + [1] * 7 + [2] * 5
    return feats, labels


def test_diversity_select_one_per_cluster():
    feats, labels = _three_clusters()
    picks = diversity_select(feats, 3, seed=0)
    assert sorted(labels[i] for i in picks) == [0, 1, 2]


def test_diversity_select_unique_and_deterministic():
    feats = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    picks = diversity_select(feats, 12, seed=3)
    assert len(picks) == len(set(picks)) == 12 and all(0 <= i < 40 for i in picks)
    assert diversity_select(feats, 12, seed=3) == picks
    # n == N takes every item; duplicate points still give unique indices
    assert sorted(diversity_select(feats[:6], 6)) == list(range(6))
    dup = torch.zeros(5, 3)
    assert sorted(diversity_select(dup, 4)) == [0, 1, 2, 3]


def test_diversity_select_errors():
    with pytest.raises(CompressError, match="pool of 3"):
        diversity_select(torch.randn(3, 2), 4)
    with pytest.raises(CompressError, match="n must be"):
        diversity_select(torch.randn(3, 2), 0)
    with pytest.raises(CompressError, match=r"\[N, d\]"):
        diversity_select(torch.randn(3), 1)


# ------------------------------------------------------------------ strategies

def test_random_and_domain(tok, corpus):
    kw = dict(source=corpus, num_samples=4, seq_len=32, seed=5, progress=False)
    rnd = select_calibration_set(tok, strategy="random", **kw)
    ref = build_calibration_set(tok, corpus, num_samples=4, seq_len=32, seed=5)
    assert rnd.calibration.digest == ref.digest == rnd.report["digest"]  # unchanged behaviour
    dom = select_calibration_set(tok, strategy="domain", **kw)
    assert torch.equal(dom.calibration.input_ids, ref.input_ids)
    assert dom.calibration.fingerprint == {**ref.fingerprint, "strategy": "domain"}
    assert dom.report == {"strategy": "domain", "digest": dom.calibration.digest}


_NOISE = {10: 0.04, 11: 0.01, 12: 0.08, 13: 0.02}  # seed -> noise scale; seed 11 is best


def test_kl_strategy_picks_lowest_and_reports_all(tok, corpus, model):
    before = [p.clone() for p in model.parameters()]
    calls = []

    def compress_fn(calib):
        s = calib.fingerprint["seed"]
        calls.append(s)
        return _noisy_copy(model, _NOISE[s], seed=0)

    sel = select_calibration_set(tok, strategy="kl", source=corpus, num_samples=3, seq_len=32,
                                 seed=10, model=model, candidates=4, compress_fn=compress_fn,
                                 probe_samples=4, probe_seq_len=24, progress=False)
    rep = sel.report
    assert calls == [10, 11, 12, 13]
    assert [c["seed"] for c in rep["candidates"]] == [10, 11, 12, 13]
    kls = {c["seed"]: c["kl"] for c in rep["candidates"]}
    assert sorted(kls, key=kls.get) == [11, 13, 10, 12]  # ranked like the noise scales
    assert rep["chosen_seed"] == 11 and rep["chosen_kl"] == kls[11]
    chosen = build_calibration_set(tok, corpus, num_samples=3, seq_len=32, seed=11)
    assert torch.equal(sel.calibration.input_ids, chosen.input_ids)
    assert rep["candidates"][1]["digest"] == chosen.digest
    fp = sel.calibration.fingerprint
    assert fp["strategy"] == "kl" and fp["seed"] == 11 and fp["candidate_seeds"] == [10, 11, 12, 13]
    assert fp["probe"] == rep["probe"]["digest"] and rep["digest"] == sel.calibration.digest
    assert rep["probe"]["split"] == "validation" and rep["probe"]["num_samples"] == 4
    json.dumps(rep, allow_nan=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_kl_strategy_rejects_returning_the_model(tok, corpus, model):
    with pytest.raises(CompressError, match="copy"):
        select_calibration_set(tok, strategy="kl", source=corpus, num_samples=2, seq_len=16,
                               model=model, candidates=1, compress_fn=lambda c: model,
                               probe_samples=2, probe_seq_len=16, progress=False)


def test_diversity_strategy_end_to_end(tok, corpus, model):
    kw = dict(strategy="diversity", source=corpus, num_samples=4, seq_len=32, seed=2,
              model=model, pool_factor=3, batch_size=5, progress=False)
    sel = select_calibration_set(tok, **kw)
    calib, rep = sel.calibration, sel.report
    fp = calib.fingerprint
    assert calib.input_ids.shape == (4, 32)
    assert fp["strategy"] == "diversity" and fp["pool_size"] == 12 and fp["seed"] == 2
    pool = build_calibration_set(tok, corpus, num_samples=12, seq_len=32, seed=2)
    assert set(fp["indices"]) <= set(pool.fingerprint["indices"])
    again = calibration_set_from_offsets(tok, corpus, split="train", offsets=fp["indices"],
                                         seq_len=32, strategy="diversity",
                                         extra_fingerprint={"seed": 2, "pool_size": 12,
                                                            "feature_layer": -1})
    assert torch.equal(again.input_ids, calib.input_ids) and again.digest == calib.digest
    assert rep["strategy"] == "diversity" and rep["digest"] == calib.digest
    assert rep["pool_size"] == 12 and sum(rep["cluster_sizes"]) == 12
    assert len(rep["cluster_sizes"]) == 4 and min(rep["cluster_sizes"]) >= 1
    json.dumps(rep, allow_nan=False)
    assert select_calibration_set(tok, **kw).calibration.digest == calib.digest  # deterministic


def test_calibration_set_from_offsets_windows_and_errors(tok, corpus):
    ref = build_calibration_set(tok, corpus, num_samples=3, seq_len=16, seed=7)
    cs = calibration_set_from_offsets(tok, corpus, split="train",
                                      offsets=ref.fingerprint["indices"], seq_len=16,
                                      strategy="x", extra_fingerprint={"seed": 7})
    assert torch.equal(cs.input_ids, ref.input_ids)
    assert cs.fingerprint == {**ref.fingerprint, "strategy": "x"}
    with pytest.raises(CompressError, match="offsets must lie"):
        calibration_set_from_offsets(tok, corpus, split="train", offsets=[10**9], seq_len=16,
                                     strategy="x")
    with pytest.raises(CompressError, match="indices"):
        calibration_set_from_offsets(tok, corpus, split="train", offsets=[0], seq_len=16,
                                     strategy="x", extra_fingerprint={"indices": [1]})


@pytest.mark.parametrize("kwargs, match", [
    (dict(strategy="best"), "allowed: " + ", ".join(STRATEGIES)),
    (dict(strategy="random", num_samples=0), "num_samples"),
    (dict(strategy="diversity", pool_factor=0, with_model=True), "pool_factor"),
    (dict(strategy="kl", candidates=0, with_model=True), "candidates"),
    (dict(strategy="diversity"), "needs the model"),
    (dict(strategy="kl"), "needs the model"),
    (dict(strategy="kl", with_model=True), "compress_fn"),
])
def test_bad_inputs(tok, corpus, model, kwargs, match):
    kwargs = dict(kwargs)
    if kwargs.pop("with_model", False):
        kwargs["model"] = model
    kwargs = dict(source=corpus, num_samples=2, seq_len=16, progress=False) | kwargs
    with pytest.raises(CompressError, match=match):
        select_calibration_set(tok, **kwargs)
