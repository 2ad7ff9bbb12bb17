"""Perplexity in the GPTQ convention and token-level ECE, against direct computation."""
import math

import pytest
import torch
import torch.nn.functional as F

from calibration.metrics import expected_calibration_error
from compress.errors import CompressError
from compress.evaluate import evaluate_windows, window_token_ids
from tests.tiny import TEXT, byte_tokenizer, tiny_model


def test_windows_are_non_overlapping_and_drop_the_tail():
    tok = byte_tokenizer()
    w = window_token_ids(tok, "abcdefghij", seq_len=3)
    assert w.tolist() == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
    assert window_token_ids(tok, "abcdefghij", seq_len=3, max_windows=2).shape == (2, 3)
    with pytest.raises(CompressError, match="fewer than one window"):
        window_token_ids(tok, "ab", seq_len=3)


def test_perplexity_matches_direct_computation():
    model = tiny_model("llama")
    windows = window_token_ids(byte_tokenizer(), TEXT, seq_len=16, max_windows=5)
    got = evaluate_windows(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(windows).logits[:, :-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert got["tokens"] == 5 * 15
    assert math.isclose(got["perplexity"], math.exp(nll.item()), rel_tol=1e-5)
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    assert math.isclose(got["ece"], expected_calibration_error(conf, pred == windows[:, 1:]), rel_tol=1e-5)


def test_ece_on_known_values():
    # Two bins used: conf 0.25 (acc 0.5) and conf 0.95 (acc 1.0)
    conf = torch.tensor([0.25, 0.25, 0.95, 0.95])
    hit = torch.tensor([1, 0, 1, 1])
    assert math.isclose(expected_calibration_error(conf, hit), 0.5 * 0.25 + 0.5 * 0.05, rel_tol=1e-6)
    assert expected_calibration_error(torch.ones(10), torch.ones(10)) == 0.0
    with pytest.raises(ValueError, match="4 values but correct has 3"):
        expected_calibration_error(conf, hit[:3])
