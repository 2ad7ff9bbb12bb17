"""Does compression hurt calibration, and does recalibration restore it? (SmolLM2-135M, CPU)

For each configuration (float; RTN and GPTQ W4/W3 g128; NIRVANA 20% and 50%, no recovery), a
recipe run by ``compress.pipeline.run_recipe`` as ``compress run`` runs it, the compressed model is
scored twice on BBC, with calibrators fitted on the *validation* split and
scored on the *test* split:

- tokens: next-token predictions over non-overlapping windows. Temperature scaling is fitted on
  the full-vocabulary logits of a seeded sample of validation positions (the recalibrate step's
  default cap, 256 MB of logits = 1,365 positions); h-calibration on the top-label binary events
  (logit of the top-1 probability, the argmax was right) of every validation position. Test: ECE
  (15 equal-width bins, top-label) raw / temperature / hcal, NLL raw / temperature (hcal maps the
  top-1 confidence only: its NLL is the raw one).
- topics: zero-shot BBC topic classification by label-word scores ([N, 5] logits); temperature and
  hcal fitted on validation articles, scored on test articles.

    python bench/recalibration_study.py --out bench/results/recalibration/study-smollm2-2core.json \
        --plot bench/results/recalibration/study-smollm2-reliability.png

Each configuration is written to the JSON as soon as it is done; ``--resume`` skips those already there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "float": [],
    "rtn-w4": [("rtn", {"bits": 4, "group_size": 128})],
    "rtn-w3": [("rtn", {"bits": 3, "group_size": 128})],
    "gptq-w4": [("gptq", {"bits": 4, "group_size": 128})],
    "gptq-w3": [("gptq", {"bits": 3, "group_size": 128})],
    "nirvana-20": [("nirvana", {"sparsity": 0.2})],
    "nirvana-50": [("nirvana", {"sparsity": 0.5})],
}


def recipe(args, steps):
    """One configuration as a recipe (``compress.recipe`` objects): the model, and its steps as one
    stage on BBC-train calibration windows when a step needs data."""
    from compress.recipe import CalibrationSpec, ModelSpec, Recipe, Stage
    r = Recipe(model=ModelSpec(id=args.model, device=args.device),
               stages=[Stage(name="compress", steps=[{"algorithm": a, **opts} for a, opts in steps])] if steps else [])
    if r.needs_calibration():
        r = r.model_copy(update={"calibration": CalibrationSpec(
            corpus="bbc", split="train", num_samples=args.calib_samples, seq_len=args.calib_seq_len,
            seed=args.seed, batch_size=8)})
    return r


def bench_device(name: str) -> torch.device:
    """The device ``model.device: NAME`` resolves to in a recipe (auto: cuda when there is one)."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


@torch.no_grad()
def score_test_tokens(model, windows, temperature: float, device, batch_size: int) -> dict:
    """One pass over the test windows: per-token raw confidence, correctness, and the NLL and
    confidence at temperature T."""
    conf, conf_t, hit = [], [], []
    nll, nll_t, n = 0.0, 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(device)
        z = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        y = ids[:, 1:].unsqueeze(-1)
        for logits, confs, is_t in ((z, conf, False), (z / temperature, conf_t, True)):
            logp = logits.log_softmax(-1)
            s = float(-logp.gather(-1, y).double().sum())
            nll, nll_t = (nll, nll_t + s) if is_t else (nll + s, nll_t)
            c, pred = logp.max(-1)
            confs.append(c.exp().flatten().cpu())
            if not is_t:
                hit.append((pred == y.squeeze(-1)).flatten().cpu())
        n += y.numel()
    return {"conf": torch.cat(conf), "conf_t": torch.cat(conf_t), "correct": torch.cat(hit),
            "nll": nll / n, "nll_t": nll_t / n}


def intervals(curves: dict, blocks: int, n: int) -> dict:
    """95% bootstrap intervals resampling ``blocks`` (test windows: neighbouring tokens are not
    independent; or articles) jointly for every variant: each variant's ECE, and the paired drop
    ECE(raw) − ECE(variant)."""
    from calibration import bootstrap_ci
    from calibration import expected_calibration_error as ece
    view = {k: (c.reshape(blocks, -1), h.reshape(blocks, -1)) for k, (c, h) in curves.items()}

    def e(k, w):
        c, h = view[k]
        return ece(c[w].flatten(), h[w].flatten())

    idx, out = torch.arange(blocks), {}
    for k in curves:
        key = "" if k == "raw" else f"_{k}"
        out[f"ece{key}_ci95"] = [round(x, 4) for x in bootstrap_ci(lambda w: e(k, w), idx, n=n)[1:]]
        if k != "raw":
            out[f"ece_drop{key}_ci95"] = [round(x, 4) for x in
                                          bootstrap_ci(lambda w: e("raw", w) - e(k, w), idx, n=n)[1:]]
    return out


def classifier_rows(args, data, device) -> dict:
    """(c): LogisticRegression on minilm-l6 mean-pooled embeddings of BBC train articles; calibrators
    fitted on the validation articles' logits, scored on the test articles'."""
    from calibration import expected_calibration_error as ece
    from calibration import make_calibrator
    from compress.models import load_model
    from compress.recalibrate import embedding_topic_logits
    from compress.tasks import bbc_topic_examples
    t0 = time.perf_counter()
    enc = load_model("minilm-l6", device=device, progress=False)
    train = bbc_topic_examples("train", max_examples=args.minilm_train, max_chars=args.topic_chars, seed=args.seed)
    out = embedding_topic_logits(enc.model, enc.tokenizer, train,
                                 {"fit": data["topics_fit"], "test": data["topics_test"]}, device=device)
    (zf, yf), (zt, yt) = out["fit"], out["test"]
    row = {"train_examples": len(train), "fit_examples": len(yf), "test_examples": len(yt)}
    curves = {}
    for key, probs in (("raw", zt.softmax(-1)),
                       ("temperature", make_calibrator("temperature").fit(zf, yf).transform(zt)),
                       ("hcal", make_calibrator("hcal").fit(zf, yf).transform(zt))):
        c, pred = probs.max(-1)
        suffix = "" if key == "raw" else f"_{key}"
        row[f"accuracy{suffix}"], row[f"ece{suffix}"] = float((pred == yt).float().mean()), ece(c, pred == yt)
        curves[key] = (c, pred == yt)
    row.update(intervals(curves, len(yt), args.bootstrap))
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_config(name, model, tok, data, args, device) -> tuple[dict, dict]:
    from calibration import expected_calibration_error as ece
    from calibration import make_calibrator
    from compress.recalibrate import fit_token_calibrator, logit_rows_within, token_events
    from compress.tasks import topic_label_logits

    t0 = time.perf_counter()
    vocab = model.get_output_embeddings().weight.shape[0]
    fit = token_events(model, data["fit_windows"], batch_size=args.batch_size, device=device,
                       keep_logits=logit_rows_within(vocab, args.max_logit_mb), seed=args.seed)
    ts = fit_token_calibrator("temperature", fit)
    hc = fit_token_calibrator("hcal", fit)
    test = score_test_tokens(model, data["test_windows"], ts.temperature, device, args.batch_size)
    conf_h = hc.confidence(test["conf"].double())
    tokens = {
        "temperature": ts.temperature, "fit_tokens": int(fit.confidence.numel()),
        "fit_logit_rows": int(fit.labels.numel()),
        "test_tokens": int(test["correct"].numel()), "top1_accuracy": float(test["correct"].float().mean()),
        "mean_confidence": float(test["conf"].mean()),
        "perplexity": math.exp(test["nll"]), "perplexity_temperature": math.exp(test["nll_t"]),
        "nll": test["nll"], "nll_temperature": test["nll_t"],
        "ece": ece(test["conf"], test["correct"]), "ece_temperature": ece(test["conf_t"], test["correct"]),
        "ece_hcal": ece(conf_h, test["correct"]),
    }
    curves = {"raw": (test["conf"], test["correct"]), "temperature": (test["conf_t"], test["correct"]),
              "hcal": (conf_h, test["correct"])}
    tokens.update(intervals(curves, len(data["test_windows"]), args.bootstrap))
    row = {"config": name, "tokens": tokens}
    if args.topics_test:
        zf, yf = topic_label_logits(model, tok, data["topics_fit"], device=device, batch_size=8)
        zt, yt = topic_label_logits(model, tok, data["topics_test"], device=device, batch_size=8)
        topics, topic_curves = {"fit_examples": len(yf), "test_examples": len(yt)}, {}
        for key, probs in (("raw", zt.softmax(-1)),
                           ("temperature", make_calibrator("temperature").fit(zf, yf).transform(zt)),
                           ("hcal", make_calibrator("hcal").fit(zf, yf).transform(zt))):
            c, pred = probs.max(-1)
            suffix = "" if key == "raw" else f"_{key}"
            topics[f"accuracy{suffix}"] = float((pred == yt).float().mean())
            topics[f"ece{suffix}"] = ece(c, pred == yt)
            topic_curves[key] = (c, pred == yt)
        topics.update(intervals(topic_curves, len(yt), args.bootstrap))
        row["topics"] = topics
    row["seconds_eval"] = round(time.perf_counter() - t0, 1)
    return row, curves


def plot(curves_by_config: dict, path: Path, n_bins: int = 15) -> None:
    """Reliability bars (test tokens) for the configurations given: raw, temperature, hcal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from calibration.metrics import _bin_stats, expected_calibration_error
    names = list(curves_by_config)
    fig = Figure(figsize=(4.2 * 3, 3.8 * len(names)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 3, squeeze=False)
    width = 1.0 / n_bins
    left = [i * width for i in range(n_bins)]
    for r, name in enumerate(names):
        for c, (kind, (conf, hit)) in enumerate(curves_by_config[name].items()):
            count, conf_sum, acc_sum = (t.cpu() for t in _bin_stats(conf, hit, n_bins))
            full = count > 0
            acc, mean_conf = acc_sum / count.clamp_min(1), conf_sum / count.clamp_min(1)
            ax = axes[r][c]
            xs = [x for x, f in zip(left, full.tolist()) if f]
            ax.bar(xs, acc[full], width=width, align="edge", color="#4C72B0", edgecolor="black", linewidth=0.4,
                   label="accuracy")
            ax.bar(xs, (mean_conf - acc)[full], bottom=acc[full], width=width, align="edge", color="#DD8452",
                   alpha=0.45, hatch="//", linewidth=0.4, label="gap to confidence")
            ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"{name}: {kind}  (ECE {100 * expected_calibration_error(conf, hit):.2f}%)", fontsize=10)
            ax.set_xlabel("next-token confidence (BBC test)")
            if c == 0:
                ax.set_ylabel("accuracy")
                if r == 0:
                    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def describe(args, data, versions: dict) -> dict:
    """The machine and data fields of the result JSON."""
    return {
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(), "torch_threads":
                    torch.get_num_threads(), **versions},
        "data": {"fit": f"bbc validation: {len(data['fit_windows'])} x {args.seq_len} tokens; "
                        f"{args.topics_fit} articles (topics)",
                 "test": f"bbc test: {len(data['test_windows'])} x {args.seq_len} tokens; "
                         f"{args.topics_test} articles (topics), first {args.topic_chars} characters",
                 "compression_calibration": f"bbc train: {args.calib_samples} x {args.calib_seq_len} tokens, "
                                            f"seed {args.seed}"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--fit-windows", type=int, default=8, help="validation windows for the token calibrators")
    ap.add_argument("--test-windows", type=int, default=8, help="test windows scored")
    ap.add_argument("--max-logit-mb", type=float, default=256, help="full logits kept for temperature scaling")
    ap.add_argument("--topics-fit", type=int, default=60, help="validation articles for the topic calibrators")
    ap.add_argument("--topics-test", type=int, default=100, help="test articles scored (0: skip topics)")
    ap.add_argument("--topic-chars", type=int, default=400, help="article characters in the topic prompt")
    ap.add_argument("--calib-samples", type=int, default=16, help="GPTQ/NIRVANA calibration windows (BBC train)")
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=500, help="resamples for the 95%% intervals")
    ap.add_argument("--minilm-train", type=int, default=400,
                    help="BBC train articles for the minilm-l6 + logistic-head classifier (0: skip it)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", help="reliability PNG of test tokens: float and the worst-calibrated compression")
    ap.add_argument("--resume", action="store_true", help="keep configurations already in --out")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from compress.data import corpus_text
    from compress.evaluate import window_token_ids
    from compress.pipeline import run_recipe
    from compress.tasks import bbc_topic_examples

    t_start = time.perf_counter()
    device = bench_device(args.device)
    data = {}  # the token windows need the tokenizer: built after the first recipe run
    if args.topics_test:
        data["topics_fit"] = bbc_topic_examples("validation", max_examples=args.topics_fit,
                                                max_chars=args.topic_chars, seed=args.seed)
        data["topics_test"] = bbc_topic_examples("test", max_examples=args.topics_test,
                                                 max_chars=args.topic_chars, seed=args.seed)
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.resume and out.is_file() else {"rows": []}
    done = {r["config"] for r in result["rows"]}
    result.update({"command": "python bench/recalibration_study.py " + " ".join(sys.argv[1:]), "model": args.model})
    curves = {}
    for name in args.configs.split(","):
        if name in done:
            print(f"{name}: already in {out}", flush=True)
            continue
        run = run_recipe(recipe(args, CONFIGS[name]), progress=False, log=lambda *_: None)
        model, tok = run.model.eval(), run.tokenizer
        if "test_windows" not in data:
            data["fit_windows"] = window_token_ids(tok, corpus_text("bbc", "validation"), args.seq_len,
                                                   args.fit_windows)
            data["test_windows"] = window_token_ids(tok, corpus_text("bbc", "test"), args.seq_len, args.test_windows)
            result.update(describe(args, data, run.report["versions"]))
        compress_s = sum(v for k, v in run.report["timings"].items() if k.startswith("stage:"))
        row, curves[name] = run_config(name, model, tok, data, args, device)
        row["seconds_compress"] = round(compress_s, 1)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        result["rows"] = [r for r in result["rows"] if r["config"] != name] + [row]
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(row), flush=True)
        del model, run
    if args.minilm_train and args.topics_test:
        result["classifier_minilm_logistic"] = classifier_rows(args, data, device)
        out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result["classifier_minilm_logistic"]), flush=True)
    if args.plot and curves:
        worst = max((n for n in curves if n != "float"), default=None,
                    key=lambda n: next(r for r in result["rows"] if r["config"] == n)["tokens"]["ece"])
        plot({n: curves[n] for n in ("float", worst) if n in curves}, Path(args.plot))


if __name__ == "__main__":
    main()
