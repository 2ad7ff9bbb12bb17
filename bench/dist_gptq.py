"""GPTQ through `compress run` on 1 process and under `torchrun --nproc-per-node N`: wall time,
scaling efficiency, each rank's peak memory, and whether N ranks wrote the 1-rank export bit for bit.

    python bench/dist_gptq.py --model smollm2-135m --ranks 1,2 --device cpu --out FILE.json
    python bench/dist_gptq.py --shape 14b --layers 8 --ranks 1,2,4,8 --device cuda --out FILE.json

``--model`` is a zoo id or a Hugging Face folder; ``--shape`` builds a random-weight llama of that
shape instead (8b: hidden 4096, MLP 14336, 32/8 heads; 14b: 5120, 13824, 40/8; ``--layers`` blocks,
a 264-token byte vocabulary: the runner's cost is in the blocks), so no weights need fetching.
Calibration text: ``--corpus`` (a zoo corpus or a text file), by default this repository's own
Python and Markdown files (offline everywhere). Each N runs in its own processes; times are those
of the whole command (start-up, load and export included) and of the `stage:quantize` phase
(report.json `timings`, rank 0's; every rank's in `distributed.ranks`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # llama-shaped: hidden, intermediate, query heads, KV heads
    "8b": (4096, 14336, 32, 8), "14b": (5120, 13824, 40, 8), "small": (1024, 2816, 16, 4),
}


def build_shape(name: str, layers: int, folder: Path) -> str:
    """A random-weight llama of shape ``name`` (bfloat16 safetensors) with the byte tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT))
    from tests.tiny import byte_tokenizer

    hidden, inter, heads, kv = SHAPES[name]
    cfg = LlamaConfig(vocab_size=264, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tok = byte_tokenizer()
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def repo_corpus(path: Path) -> str:
    text = "\n\n".join(p.read_text(errors="replace") for p in sorted(ROOT.glob("compress/**/*.py"))
                       + sorted(ROOT.glob("**/README.md")) if ".venv" not in p.parts)
    path.write_text(text)
    return str(path)


def run_one(n: int, recipe: Path, out: Path, env: dict) -> dict:
    cmd = [sys.executable, "-m", "compress", "run", str(recipe), "--out", str(out), "--quiet", "--force"]
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *cmd[1:]]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"ranks": n, "error": done.stderr[-2000:]}
    report = json.loads((out / "report.json").read_text())
    ranks = (report.get("distributed") or {}).get("ranks") or [
        {k: report.get(k, {}) for k in ("timings", "peak_host_mb", "peak_device_mb")}]
    return {"ranks": n, "wall_s": round(wall, 2), "quantize_s": report["timings"].get("stage:quantize"),
            "timings": report["timings"],
            "peak_host_mb_quantize": [r["peak_host_mb"].get("stage:quantize") for r in ranks],
            "peak_device_mb_quantize": [r.get("peak_device_mb", {}).get("stage:quantize") for r in ranks],
            "gptq_error_sum": report["stages"][0]["steps"][0]["summary"]["gptq_error_sum"]}


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a zoo id or a Hugging Face folder")
    src.add_argument("--shape", choices=sorted(SHAPES), help="a random-weight llama of this shape")
    ap.add_argument("--layers", type=int, default=4, help="blocks of the --shape model")
    ap.add_argument("--ranks", default="1,2", help="process counts to time, comma-separated (1 first: the reference)")
    ap.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--corpus", help="calibration text: a zoo corpus or a text file (default: this repository's files)")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, help="CPU runs: OMP_NUM_THREADS of every process, whatever N")
    ap.add_argument("--cores", type=int, help="CPU runs: the cores all processes share (each of N gets cores // N "
                                              "threads: OMP_NUM_THREADS)")
    ap.add_argument("--out", required=True, help="results JSON")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dist-gptq-"))
    model = build_shape(args.shape, args.layers, work / "model") if args.shape else args.model
    corpus = args.corpus or repo_corpus(work / "corpus.txt")
    recipe = {"model": {"id": model, "dtype": args.dtype, "device": args.device},
              "calibration": {"corpus": corpus, "num_samples": args.num_samples, "seq_len": args.seq_len,
                              "seed": 0, "batch_size": args.batch_size},
              "stages": [{"name": "quantize", "steps": [{"algorithm": "gptq", "bits": args.bits,
                                                         "group_size": args.group_size}]}],
              "export": {"format": "gptq"}}
    path = work / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    rows, outs = [], {}
    for n in [int(x) for x in args.ranks.split(",")]:
        outs[n] = work / f"out-{n}"
        if args.cores or args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads or max(1, args.cores // n))
        row = run_one(n, path, outs[n], env)
        row["threads_per_process"] = env.get("OMP_NUM_THREADS")
        first = rows[0] if rows else None
        if "error" not in row and first is not None and "error" not in first:
            row["equal_to_first"] = same_weights(outs[first["ranks"]], outs[n])
            row["speedup_quantize"] = round(first["quantize_s"] / row["quantize_s"], 3)
            row["efficiency_quantize"] = round(row["speedup_quantize"] * first["ranks"] / n, 3)
            row["speedup_wall"] = round(first["wall_s"] / row["wall_s"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "recipe": recipe,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
