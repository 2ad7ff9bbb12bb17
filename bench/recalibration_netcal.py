"""Recalibration: this toolkit's calibrators vs netcal 1.4.0 on the same logits.

    python bench/recalibration_netcal.py --out bench/results/recalibration/netcal-2core.json \
        --diagrams bench/results/recalibration

Needs netcal (the ``recalibration-bench`` extra; see bench/results/recalibration/README.md).

Cases (each fitted on one half, scored on the other):
  smollm2-tokens   SmolLM2-135M next-token confidence on BBC-test text, top-label binary form:
                   events (c = top-1 probability, correct). netcal gets c; ours gets the
                   score logit(c) (a 1-D binary score), so both fit the same numbers.
                   Split by 512-token window (seeded), so neighbouring tokens stay together.
  synthetic-10     10-class synthetic classifier: labels ~ softmax(t), reported logits
                   3·t + a per-class bias (over-confident and biased). netcal gets softmax(z);
                   ours gets log_softmax(z) (what netcal's inverse-softmax sees).
Method pairs: temperature ↔ TemperatureScaling, platt (binary) / vector (10-class) ↔
LogisticCalibration (netcal's multi-class logistic is vector scaling), histogram
(15 equal-width bins, one-vs-rest) ↔ HistogramBinning(bins=15), isotonic ↔ IsotonicRegression;
netcal's BBQ and our h-calibration, matrix scaling and equal-mass histogram have no pair.
ECE: top-label, 15 equal-width bins (with a 200-resample bootstrap 95% interval); NLL in
nats, probabilities clamped at 1e-12; both computed by calibration.metrics on every method's
output. "ours <= netcal" allows 1e-4 absolute ECE: the same estimator fitted by two
optimisers differs at the 1e-7 level.
Timing: fit seconds on 1M synthetic top-label events (a Beta(5, 1.5) confidence, correct with
probability c^1.6: over-confident); netcal BBQ at 1M only with --bbq-1m (minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # netcal's BBQ prints a progress bar per fit

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration import (bootstrap_ci, confidence_score, expected_calibration_error,  # noqa: E402
                         make_calibrator, negative_log_likelihood, reliability_diagram)

# Two implementations of the same estimator land within float noise of each other; a pair
# counts as "ours <= netcal" when ours is at most this much (absolute ECE) above.
SAME_METHOD_TOL = 1e-4
BOOTSTRAP = 200  # resamples for the held-out ECE interval



# -- data -------------------------------------------------------------------------------------------
def smollm2_tokens(n_tokens: int, seq_len: int, seed: int, cache: Path | None):
    """(confidence [N], correct [N], window id [N]) for next-token predictions on BBC-test."""
    from safetensors.torch import load_file, save_file

    if cache and cache.is_file():  # safetensors, not torch.load: a cache file must not run code
        d = load_file(str(cache))
        return d["conf"], d["correct"], d["window"]
    from compress.data import corpus_text
    from compress.evaluate import window_token_ids
    from compress.models import load_model

    lm = load_model("smollm2-135m", progress=False)
    windows = window_token_ids(lm.tokenizer, corpus_text("bbc", "test"), seq_len=seq_len,
                               max_windows=-(-n_tokens // (seq_len - 1)))
    confs, hits, wid = [], [], []
    with torch.inference_mode():
        for i in range(0, len(windows), 4):
            w = windows[i:i + 4]
            conf, pred = lm.model(w).logits[:, :-1].float().softmax(-1).max(-1)
            confs.append(conf.flatten())
            hits.append((pred == w[:, 1:]).flatten())
            wid.append(torch.arange(i, i + len(w)).repeat_interleave(seq_len - 1))
    conf, correct, window = torch.cat(confs).double(), torch.cat(hits), torch.cat(wid)
    if cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"conf": conf, "correct": correct, "window": window}, str(cache))
    return conf, correct, window


def synthetic_multiclass(n: int, n_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, n_classes, generator=g) * 2.0
    labels = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    bias = torch.randn(n_classes, generator=g)
    return (3.0 * true + bias).double(), labels


def synthetic_top_label(n: int, seed: int):
    rng = np.random.default_rng(seed)
    conf = rng.beta(5.0, 1.5, size=n)
    correct = rng.random(n) < conf ** 1.6
    return torch.from_numpy(conf), torch.from_numpy(correct)


def logit(c: torch.Tensor) -> torch.Tensor:
    return confidence_score(c)


# -- methods ----------------------------------------------------------------------------------------
def ours(binary: bool) -> dict:
    m = {"temperature": ("temperature", {}),
         "logistic": ("platt", {}) if binary else ("vector", {}),
         "histogram": ("histogram", {"n_bins": 15}),
         "isotonic": ("isotonic", {}),
         "hcal": ("hcal", {}),
         "histogram-equal-mass": ("histogram", {"n_bins": 15, "strategy": "equal_mass"})}
    if not binary:
        m["matrix"] = ("matrix", {})
    return m


def netcal_methods() -> dict:
    from netcal.binning import BBQ, HistogramBinning, IsotonicRegression
    from netcal.scaling import LogisticCalibration, TemperatureScaling
    return {"temperature": TemperatureScaling, "logistic": LogisticCalibration,
            "histogram": lambda: HistogramBinning(bins=15), "isotonic": IsotonicRegression, "bbq": BBQ}


def _scores(probs: torch.Tensor, labels: torch.Tensor, binary: bool) -> dict:
    """ECE (with a bootstrap 95% interval) and NLL of calibrated output: binary → probs is P(correct) [N];
    else [N, C] with top-label ECE."""
    if binary:
        conf, hit = probs.double().clamp(0, 1), labels
        nll = negative_log_likelihood(torch.stack([1 - conf, conf], 1), labels.long())
    else:
        conf, pred = probs.double().max(1)
        hit = pred == labels
        nll = negative_log_likelihood(probs.double(), labels)
    ci = bootstrap_ci(expected_calibration_error, conf, hit, n=BOOTSTRAP, seed=0)
    return {"ece": ci.estimate, "ece_ci95": [ci.low, ci.high], "nll": nll}


def run_case(name: str, fit: tuple, test: tuple, binary: bool, diagrams: Path | None) -> dict:
    """fit/test = (ours' input, netcal's input, labels)."""
    rows = {"uncalibrated": {**_scores(test[1], test[2], binary), "fit_s": 0.0}}
    fitted = {}
    for key, (cal_name, cfg) in ours(binary).items():
        t0 = time.perf_counter()
        cal = make_calibrator(cal_name, **cfg).fit(fit[0], fit[2])
        dt = time.perf_counter() - t0
        out = cal.transform(test[0])
        rows[f"ours/{key}"] = {**_scores(out[:, 1] if binary else out, test[2], binary), "fit_s": dt,
                               "calibrator": cal_name, "config": cfg}
        if cal_name == "hcal":
            rows[f"ours/{key}"]["fit_info"] = cal.fit_info
        fitted[key] = out
    for key, make in netcal_methods().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = make()
            t0 = time.perf_counter()
            m.fit(fit[1].numpy(), fit[2].numpy())
            dt = time.perf_counter() - t0
            out = torch.from_numpy(np.asarray(m.transform(test[1].numpy()), dtype=np.float64))
        rows[f"netcal/{key}"] = {**_scores(out, test[2], binary), "fit_s": dt}
    if diagrams:
        for key, probs in (("uncalibrated", test[1]), ("temperature", fitted["temperature"]),
                           ("hcal", fitted["hcal"]), ("isotonic", fitted["isotonic"])):
            if key != "uncalibrated":
                probs = probs[:, 1] if binary else probs
            if binary:
                conf, hit = probs, test[2]
            else:
                conf, pred = probs.max(1)
                hit = pred == test[2]
            reliability_diagram(conf, hit, diagrams / f"{name}-{key}.png",
                                title=f"{name}: {key} (held-out half)")
    return rows


def targets(rows: dict, binary: bool) -> dict:
    out = {}
    for key in ("temperature", "logistic", "histogram", "isotonic"):
        a, b = rows[f"ours/{key}"]["ece"], rows[f"netcal/{key}"]["ece"]
        out[f"{key}: ours <= netcal (ECE)"] = {"ours": a, "netcal": b, "diff": a - b,
                                               "met": a <= b + SAME_METHOD_TOL}
    a, b = rows["ours/hcal"]["ece"], rows["ours/temperature"]["ece"]
    out["hcal <= temperature (ECE)"] = {"hcal": a, "temperature": b, "met": a <= b}
    return out


def hcal_vs_temperature(splits) -> dict:
    """Held-out ECE of temperature scaling and h-calibration over several splits (one case's noise)."""
    ts, hc = [], []
    for fit_x, fit_y, test_x, test_y, binary in splits:
        for name, out in (("temperature", ts), ("hcal", hc)):
            probs = make_calibrator(name).fit(fit_x, fit_y).transform(test_x)
            out.append(_scores(probs[:, 1] if binary else probs, test_y, binary)["ece"])
    return {"temperature": ts, "hcal": hc, "hcal_wins": sum(h <= t for h, t in zip(hc, ts)),
            "mean_temperature": sum(ts) / len(ts), "mean_hcal": sum(hc) / len(hc)}


def timing(n: int, seed: int, bbq: bool) -> dict:
    conf, correct = synthetic_top_label(n, seed)
    score, y = logit(conf), correct.long()
    res = {}
    for key, (cal_name, cfg) in ours(binary=True).items():
        t0 = time.perf_counter()
        make_calibrator(cal_name, **cfg).fit(score, y)
        res[f"ours/{key}"] = time.perf_counter() - t0
    for key, make in netcal_methods().items():
        if key == "bbq" and not bbq:
            res["netcal/bbq"] = None
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            make().fit(conf.numpy(), correct.numpy().astype(np.int64))
            res[f"netcal/{key}"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--diagrams", type=Path, default=None, help="folder for reliability-diagram PNGs")
    ap.add_argument("--tokens", type=int, default=20000, help="SmolLM2 next-token predictions to score")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--synthetic-n", type=int, default=20000)
    ap.add_argument("--timing-n", type=int, default=1_000_000)
    ap.add_argument("--bbq-1m", action="store_true", help="also time netcal's BBQ on --timing-n events (minutes)")
    ap.add_argument("--cache", type=Path, default=Path("out/recalibration/smollm2-tokens.safetensors"),
                    help="where the SmolLM2 (confidence, correct) pairs are cached between runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the calibration part (both libraries run under it); the small "
                         "tensor ops here run faster on one thread of a shared 2-core box")
    args = ap.parse_args(argv)

    import netcal
    t_start = time.perf_counter()
    result = {"command": " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "same_method_tolerance": SAME_METHOD_TOL, "bootstrap_resamples": BOOTSTRAP,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                          "torch": torch.__version__, "netcal": netcal.__version__},
              "cases": {}}

    # Warm-up: the first L-BFGS call pays one-off imports; keep them out of the fit times.
    make_calibrator("temperature").fit(torch.randn(64, 3), torch.arange(64) % 3)
    t0 = time.perf_counter()
    conf, correct, window = smollm2_tokens(args.tokens, args.seq_len, args.seed, args.cache)
    logits_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    result["machine"]["torch_threads"] = torch.get_num_threads()
    g = torch.Generator().manual_seed(args.seed)
    n_win = int(window.max()) + 1
    fit_windows = torch.randperm(n_win, generator=g)[: n_win // 2]
    in_fit = torch.isin(window, fit_windows)
    score, y = logit(conf), correct.long()
    case = "smollm2-tokens"
    rows = run_case(case, (score[in_fit], conf[in_fit], y[in_fit]), (score[~in_fit], conf[~in_fit], y[~in_fit]),
                    binary=True, diagrams=args.diagrams)
    result["cases"][case] = {"n_fit": int(in_fit.sum()), "n_test": int((~in_fit).sum()),
                             "accuracy": float(correct.double().mean()), "logits_s": logits_s,
                             "rows": rows, "targets": targets(rows, True)}
    print(case, json.dumps(result["cases"][case]["targets"], indent=1), flush=True)

    z, labels = synthetic_multiclass(args.synthetic_n, 10, args.seed + 1)
    half = args.synthetic_n // 2
    logp, probs = torch.log_softmax(z, 1), torch.softmax(z, 1)
    case = "synthetic-10"
    rows = run_case(case, (logp[:half], probs[:half], labels[:half]), (logp[half:], probs[half:], labels[half:]),
                    binary=False, diagrams=args.diagrams)
    result["cases"][case] = {"n_fit": half, "n_test": args.synthetic_n - half, "rows": rows,
                             "targets": targets(rows, False)}
    print(case, json.dumps(result["cases"][case]["targets"], indent=1), flush=True)

    # h-calibration vs temperature over 5 more splits of each case: is one split's verdict noise?
    def token_split(k):
        fw = torch.randperm(n_win, generator=torch.Generator().manual_seed(100 + k))[: n_win // 2]
        m = torch.isin(window, fw)
        return score[m], y[m], score[~m], y[~m], True

    def synthetic_split(k):
        zk, lk = synthetic_multiclass(args.synthetic_n, 10, 100 + k)
        lp = torch.log_softmax(zk, 1)
        return lp[:half], lk[:half], lp[half:], lk[half:], False

    result["hcal_vs_temperature_5_splits"] = {
        "smollm2-tokens (window re-splits)": hcal_vs_temperature(token_split(k) for k in range(5)),
        "synthetic-10 (fresh data seeds)": hcal_vs_temperature(synthetic_split(k) for k in range(5))}
    print(json.dumps(result["hcal_vs_temperature_5_splits"], indent=1), flush=True)

    result["timing_fit_s"] = {"events": args.timing_n, "data": "synthetic top-label (binary) events",
                              "seconds": timing(args.timing_n, args.seed + 2, args.bbq_1m)}
    print(json.dumps(result["timing_fit_s"], indent=1), flush=True)
    result["total_s"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
