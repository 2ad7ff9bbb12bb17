"""Quantization quality, speed and memory: this toolkit vs GPTQModel vs RTN, same weights, same data.

Every (setting, method) runs in its own subprocess so wall time and peak RSS
belong to that method alone; every method gets the same source weights (the
zoo's converted safetensors), the same calibration windows (ids, not text) and
the same evaluation windows.

    python bench/quant_quality.py all --model smollm2-135m --settings w4g128,w3g128,w2g64 \
        --methods float,rtn,gptq,gptqmodel,gptqmodel-matched --out bench/results/quant/smollm2-135m.json

Methods:
  float              the unquantized model (reference)
  rtn                round-to-nearest, asymmetric (this toolkit)
  gptq               GPTQ, asymmetric, damp 0.01, true-sequential (this toolkit's defaults)
  gptqmodel          GPTQModel 7.6 with its defaults (symmetric, damp 0.05, act_group_aware)
  gptqmodel-matched  GPTQModel 7.6 with our settings (asymmetric, damp 0.01, no act-group-aware)
  gptq-kl-adaquant   KL-guided calibration set (3 candidates), GPTQ, then AdaQuant refinement
  gptq-domain        GPTQ calibrated on code (stdlib/train windows) instead of prose
  gptq+mse, gptq+gptaq, rotate+gptq, rotate+gptq+mse+gptaq, ...
                     GPTQ with options joined by '+': mse (grid: mse), gptaq (asymmetric: true), act (act_order),
                     rotate (a rotate step before GPTQ: randomised Hadamard residual + per-head v/o)
                     (issue 16; the option rows of bench/results/quant/README.md)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"w4g128": (4, 128), "w3g128": (3, 128), "w2g64": (2, 64), "w4g32": (4, 32), "w3g64": (3, 64),
            "w8g128": (8, 128)}
EVALS = {"prose": ("bbc", "test"), "code": ("stdlib", "test")}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _peak_gpu_mb() -> float | None:
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _calibration(tokenizer, args):
    from compress.data import build_calibration_set
    return build_calibration_set(tokenizer, args.calib_corpus, split="train", num_samples=args.calib_samples,
                                 seq_len=args.calib_seq_len, seed=args.seed)


def _evaluate(model, tokenizer, args) -> dict:
    import torch

    from compress.data import corpus_text
    from compress.evaluate import evaluate_text
    out = {}
    for name, (corpus, split) in EVALS.items():
        with torch.inference_mode():
            r = evaluate_text(model, tokenizer, corpus_text(corpus, split), seq_len=args.eval_seq_len,
                              max_windows=args.eval_windows, progress=False, device=args.device)
        out[name] = {k: r[k] for k in ("perplexity", "nll", "tokens", "ece", "top1_accuracy")}
    return out


def worker(args) -> dict:
    import torch
    torch.manual_seed(0)
    from compress.models import fetch_model, load_model
    bits, group = SETTINGS[args.setting]
    model_dir = str(fetch_model(args.model, progress=False))
    result = {"model": args.model, "setting": args.setting, "method": args.method, "bits": bits, "group_size": group}
    if args.method.startswith("gptqmodel"):
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 2))
        from gptqmodel import GPTQModel, QuantizeConfig
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        calib = _calibration(tokenizer, args)
        extra = {} if args.method == "gptqmodel" else {"sym": False, "damp_percent": 0.01, "act_group_aware": False,
                                                         "desc_act": False}
        qcfg = QuantizeConfig(bits=bits, group_size=group, **extra)
        result["gptqmodel_config"] = {"sym": qcfg.sym, "damp_percent": qcfg.damp_percent,
                                      "desc_act": qcfg.desc_act, "act_group_aware": qcfg.act_group_aware}
        t0 = time.perf_counter()
        gm = GPTQModel.load(model_dir, qcfg, dtype=torch.float32, device=args.device)
        gm.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib.input_ids],
                    batch_size=1)
        result["quantize_seconds"] = time.perf_counter() - t0
        result["peak_rss_mb"] = _peak_rss_mb()
        result["peak_gpu_mb"] = _peak_gpu_mb()
        # The in-memory model is offloaded after quantization; evaluate the saved checkpoint,
        # loaded with GPTQModel's pure-torch kernel (its other CPU kernels refuse partial groups).
        import tempfile

        from gptqmodel import BACKEND
        saved = tempfile.mkdtemp(prefix="gptqmodel-")
        gm.save(saved)
        del gm
        model = GPTQModel.load(saved, device=args.device, backend=BACKEND.TORCH, dtype=torch.bfloat16).model.float()
        import gptqmodel
        result["peer_version"] = gptqmodel.__version__
    else:
        from compress.pipeline import run_recipe
        if args.method == "float":
            loaded = load_model(model_dir, progress=False)
            model, tokenizer = loaded.model.to(args.device), loaded.tokenizer
        else:  # run_recipe loads the model itself: a second copy here would inflate peak memory
            calib_spec = {"corpus": args.calib_corpus, "num_samples": args.calib_samples,
                          "seq_len": args.calib_seq_len, "seed": args.seed, "batch_size": 8}
            if args.method == "gptq-kl-adaquant":
                # the selection + refinement path: KL-guided calibration set, GPTQ, then AdaQuant
                steps = [{"algorithm": "gptq", "bits": bits, "group_size": group}, {"algorithm": "adaquant"}]
                # candidates are scored after GPTQ alone (kl_steps): AdaQuant runs once, on the winner
                calib_spec.update(strategy="kl", candidates=args.kl_candidates, probe_samples=32, probe_seq_len=64,
                                  kl_steps=["gptq"])
            elif args.method == "gptq-domain":
                # calibrate on the code corpus: the domain of the "code" evaluation
                steps = [{"algorithm": "gptq", "bits": bits, "group_size": group}]
                calib_spec.update(corpus="stdlib", strategy="domain")
            elif "+" in args.method:
                steps = _option_steps(args.method, bits, group)
            else:
                steps = [{"algorithm": args.method, "bits": bits, "group_size": group}]
            recipe = {"model": {"id": model_dir, "device": args.device}, "stages": [{"name": "q", "steps": steps}]}
            if "rtn" not in args.method.split("+"):
                recipe["calibration"] = calib_spec
            t0 = time.perf_counter()
            res = run_recipe(recipe, progress=False, log=lambda *_: None)
            result["quantize_seconds"] = res.report["timings"]["stage:q"] + res.report["timings"].get("calibration_set", 0)
            result["pipeline_seconds"] = time.perf_counter() - t0
            result["peak_rss_mb"] = _peak_rss_mb()
            # the calibration set and the quantize stage only: run_recipe moves the whole model to the
            # device after its stages, which the peer's number (taken before any reload) leaves out
            peaks = res.report.get("peak_device_mb", {})
            result["peak_gpu_mb"] = max((peaks.get(k, 0.0) for k in ("calibration_set", "stage:q")), default=None) \
                if peaks else _peak_gpu_mb()
            model, tokenizer = res.model, res.tokenizer
            if "summary" in res.report["stages"][0]["steps"][0]:
                result["layer_error"] = res.report["stages"][0]["steps"][0]["summary"]
    result["eval"] = _evaluate(model, tokenizer, args)
    return result


def _option_steps(method: str, bits: int, group: int) -> list[dict]:
    """'rotate+gptq+mse+gptaq' -> [rotate, gptq with grid mse and asymmetric]; '+act': GPTQ's act-order."""
    parts = method.split("+")
    unknown = set(parts) - {"rotate", "gptq", "rtn", "mse", "gptaq", "act"}
    if unknown or ("gptq" in parts) == ("rtn" in parts) or ("act" in parts and "gptq" not in parts):
        raise SystemExit(f"unknown option method {method!r}: join rotate, gptq|rtn, mse, gptaq, act (gptq only) "
                         f"with '+'")
    quant = {"algorithm": "gptq" if "gptq" in parts else "rtn", "bits": bits, "group_size": group}
    if "mse" in parts:
        quant["grid"] = "mse"
    if "gptaq" in parts:
        quant["asymmetric"] = True
    if "act" in parts:
        quant["act_order"] = True
    return ([{"algorithm": "rotate"}] if "rotate" in parts else []) + [quant]


def run_all(args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = json.loads(out.read_text())["rows"] if out.exists() and args.resume else []
    done = {(r["setting"], r["method"]) for r in rows}
    for setting in args.settings.split(","):
        for method in args.methods.split(","):
            if method == "float" and any(r["method"] == "float" for r in rows):
                continue
            if (setting, method) in done:
                continue
            cmd = [sys.executable, __file__, "one", "--model", args.model, "--setting", setting, "--method", method,
                   *_shared_flags(args)]
            print(">>", " ".join(cmd[1:]), flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                rows.append({"setting": setting, "method": method, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["subprocess_seconds"] = time.perf_counter() - t0
                rows.append(row)
                print(json.dumps(row["eval"]), row.get("quantize_seconds"), flush=True)
            _write(out, args, rows)


def _shared_flags(args) -> list[str]:
    return ["--device", args.device, "--calib-corpus", args.calib_corpus, "--calib-samples", str(args.calib_samples),
            "--calib-seq-len", str(args.calib_seq_len), "--seed", str(args.seed),
            "--eval-seq-len", str(args.eval_seq_len), "--eval-windows", str(args.eval_windows)]


def _write(out: Path, args, rows) -> None:
    import torch
    import transformers
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    meta = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPU cores" + (f", {gpu}" if gpu else ""), "device": args.device, "torch": torch.__version__, "transformers": transformers.__version__,
            "calibration": f"{args.calib_samples} x {args.calib_seq_len} tokens of {args.calib_corpus}/train, seed {args.seed}",
            "eval": {k: f"{c}/{s}, {args.eval_windows} non-overlapping windows of {args.eval_seq_len}"
                     for k, (c, s) in EVALS.items()}}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    os.replace(tmp, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["all", "one"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--setting", default="w4g128")
    p.add_argument("--method", default="gptq")
    p.add_argument("--settings", default="w4g128,w3g128,w2g64")
    p.add_argument("--methods", default="float,rtn,gptq,gptqmodel,gptqmodel-matched")
    p.add_argument("--out", default="bench/results/quant/quality.json")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--calib-corpus", default="bbc")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kl-candidates", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu or cuda: where every method quantizes and evaluates")
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    args = p.parse_args()
    if args.mode == "one":
        print(json.dumps(worker(args)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
