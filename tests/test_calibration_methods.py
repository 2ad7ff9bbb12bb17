"""Calibrators: each one fixes overconfident synthetic logits on held-out data, survives save → load
bit-for-bit, keeps outputs on the simplex, and rejects bad input with a message naming the value."""
import json

import numpy as np
import pytest
import torch

from calibration import (CALIBRATORS, CalibrationError, confidence_score, expected_calibration_error,
                         load_calibrator, make_calibrator, top_label)

TRUE_SCALE = 3.0  # the model's logits are the true ones times 3: overconfident


def _synthetic(n: int, n_classes: int, seed: int):
    """Labels drawn from softmax(true logits); the 'model' reports true logits × TRUE_SCALE."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, n_classes, generator=g) * (2.0 if n_classes > 2 else 1.5)
    labels = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    return true * TRUE_SCALE, labels


DATA = {kind: {"fit": _synthetic(3000, c, 1), "test": _synthetic(3000, c, 2)}
        for kind, c in (("multi", 10), ("binary", 2))}

# (id, registry name, options, data kind): every calibrator, plus the non-default modes worth covering.
CASES = [
    ("temperature", "temperature", {}, "multi"),
    ("vector", "vector", {}, "multi"),
    ("matrix", "matrix", {}, "multi"),
    ("platt", "platt", {}, "binary"),
    ("platt-targets", "platt", {"platt_targets": True}, "binary"),
    ("histogram", "histogram", {}, "multi"),
    ("histogram-mass-top", "histogram", {"strategy": "equal_mass", "mode": "top_label"}, "multi"),
    ("histogram-binary", "histogram", {"n_bins": 10}, "binary"),
    ("isotonic", "isotonic", {}, "multi"),
    ("isotonic-top", "isotonic", {"mode": "top_label"}, "multi"),
    ("hcal", "hcal", {"max_steps": 40, "patience": 2}, "multi"),
    ("hcal-top-identity", "hcal", {"events": "top_label", "init": "identity", "lr": 0.03, "max_steps": 100},
     "binary"),
]
IDS = [c[0] for c in CASES]
_FITTED: dict[str, object] = {}


def _fitted(case_id):
    if case_id not in _FITTED:
        _, name, cfg, kind = next(c for c in CASES if c[0] == case_id)
        _FITTED[case_id] = make_calibrator(name, **cfg).fit(*DATA[kind]["fit"])
    return _FITTED[case_id]


def _kind(case_id):
    return next(c[3] for c in CASES if c[0] == case_id)


def _ece(probs, labels):
    conf, pred = top_label(probs)
    return expected_calibration_error(conf, pred == labels)


def test_every_registered_calibrator_is_covered():
    assert {c[1] for c in CASES} == set(CALIBRATORS)


@pytest.mark.parametrize("case_id", IDS)
def test_reduces_held_out_ece(case_id):
    z, y = DATA[_kind(case_id)]["test"]
    before = _ece(z.softmax(1), y)
    after = _ece(_fitted(case_id).transform(z), y)
    assert before > 0.1  # the synthetic model really is overconfident
    assert after < 0.4 * before, f"{case_id}: ECE {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("case_id", IDS)
def test_outputs_are_probability_rows(case_id):
    z, _ = DATA[_kind(case_id)]["test"]
    p = _fitted(case_id).transform(z)
    assert p.shape == z.shape and p.device == z.device
    assert bool((p >= 0).all()) and torch.allclose(p.sum(1), torch.ones(len(p)), atol=1e-5)


@pytest.mark.parametrize("case_id", IDS)
@pytest.mark.parametrize("target", ["folder", "calibrator.safetensors"])
def test_save_load_round_trip_is_exact(case_id, target, tmp_path):
    cal = _fitted(case_id)
    z, _ = DATA[_kind(case_id)]["test"]
    written = cal.save(tmp_path / target)
    loaded = load_calibrator(written)
    assert type(loaded) is type(cal) and loaded.config == cal.config and loaded.n_classes == cal.n_classes
    assert torch.equal(loaded.transform(z), cal.transform(z))
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("name", ["temperature", "hcal"])
def test_order_preserving_methods_keep_the_argmax(name):
    z, _ = DATA["multi"]["test"]
    cal = _fitted(name)
    assert torch.equal(cal.transform(z).argmax(1), z.argmax(1))


def test_temperature_recovers_the_true_scale(tmp_path):
    cal = make_calibrator("temperature").fit(*_synthetic(20000, 10, 3))
    assert isinstance(cal.temperature, float)
    assert abs(1 / cal.temperature - 1 / TRUE_SCALE) < 0.03, cal.temperature
    header = json.loads((cal.save(tmp_path / "cal") / "calibrator.json").read_text())
    assert header["type"] == "temperature" and header["temperature"] == pytest.approx(cal.temperature)


def test_numpy_inputs_and_one_dimensional_binary_scores():
    z, y = DATA["binary"]["fit"]
    score = (z[:, 1] - z[:, 0]).numpy()
    from_scores = make_calibrator("platt").fit(score, y.numpy())
    from_logits = make_calibrator("platt").fit(z, y)
    assert torch.allclose(from_scores.transform(score), from_logits.transform(z), atol=1e-5)
    # Top-label binary form: a confidence c becomes the score logit(c); c = 1 stays finite.
    s = z[:, 1] - z[:, 0]
    moderate = s.abs() < 8  # beyond that float32 softmax and the 1e-7 clamp saturate
    assert torch.allclose(confidence_score(z.softmax(1)[:, 1])[moderate], s[moderate], atol=1e-3)
    assert torch.isfinite(confidence_score(torch.tensor([0.0, 1.0]))).all()
    t = make_calibrator("temperature").fit(z.numpy().astype(np.float64), y.numpy())
    assert t.transform(z.numpy().astype(np.float64)).dtype == torch.float64


# -- bad input ------------------------------------------------------------------------------------
Z, Y = DATA["multi"]["fit"]


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_fit_rejects_bad_input_by_name(name):
    cal = make_calibrator(name)
    with pytest.raises(CalibrationError, match="3000 rows but labels has 2999"):
        cal.fit(Z, Y[:-1])
    bad = Y.clone()
    bad[5] = 10
    with pytest.raises(CalibrationError, match=r"labels\[5\] = 10 is out of range.*\[0, 10\)"):
        cal.fit(Z, bad)
    nan = Z.clone()
    nan[7, 3] = float("nan")
    with pytest.raises(CalibrationError, match=r"non-finite.*\(7, 3\)"):
        cal.fit(nan, Y)
    with pytest.raises(CalibrationError, match="single class.*every label is 4"):
        cal.fit(Z, torch.full_like(Y, 4))
    with pytest.raises(CalibrationError, match="not fitted"):
        cal.transform(Z)
    with pytest.raises(ValueError):  # CalibrationError is also a ValueError
        cal.fit(Z, Y.float() + 0.5)


def test_transform_checks_the_class_count_and_values():
    cal = _fitted("temperature")
    with pytest.raises(CalibrationError, match="fitted on 10 classes but the logits have 5"):
        cal.transform(Z[:, :5])
    inf = Z.clone()
    inf[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match="non-finite"):
        cal.transform(inf)


def test_registry_errors_name_the_allowed_values(tmp_path):
    with pytest.raises(CalibrationError, match=r"unknown calibrator 'temprature'.*'temperature'"):
        make_calibrator("temprature")
    with pytest.raises(CalibrationError, match="n_bin"):
        make_calibrator("histogram", n_bin=10)
    with pytest.raises(CalibrationError, match="platt scaling is binary: got 10 classes"):
        make_calibrator("platt").fit(Z, Y)
    # A header naming a type outside the allow-list is refused, whatever the type string says.
    from safetensors.torch import save_file
    header = {"format": "compress-calibrator", "version": 1, "type": "os.system", "config": {}, "n_classes": 2}
    save_file({"x": torch.zeros(1)}, str(tmp_path / "evil.safetensors"), metadata={"calibrator": json.dumps(header)})
    with pytest.raises(CalibrationError, match=r"unknown calibrator type 'os.system'; allowed: \["):
        load_calibrator(tmp_path / "evil.safetensors")
    with pytest.raises(CalibrationError, match="no calibrator at"):
        load_calibrator(tmp_path / "missing")
    with pytest.raises(CalibrationError, match="not fitted: there is nothing to save"):
        make_calibrator("vector").save(tmp_path / "x")
