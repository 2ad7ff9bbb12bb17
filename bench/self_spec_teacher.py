"""Exit-head training with the target run every step against its outputs computed once (teacher cache).

    python bench/self_spec_teacher.py --model smollm2-135m --out bench/results/draft/teacher-cache-smollm2-cpu.json
    python bench/self_spec_teacher.py --model qwen2.5-coder-1.5b --device cuda --dtype bfloat16 --seq-len 512 \
        --train-windows 2048 --batch-size 16 --steps 300 --exit-layer 1 --mid-depth 14 --out $OUT/teacher-cache.json

The same heads (a deep head after ``--exit-layer``, and with ``--mid-depth`` one that also reads that
block) are trained twice in one process on the same windows, seed and batches: ``teacher_cache: off``
(the target's forward and full-vocabulary normaliser every step) and ``auto`` (once per window, then
read; compress/draft/selfspec/teacher.py); on CUDA first as training ran before both changes too
(``off-fp32``: the target every step, the heads' products in full float32, not TF32). Reported: each run's seconds, the cache's build seconds and
size, the steps-only rate, the ratio, and how far the two runs' heads lie apart (the same numbers go
in, so on the CPU they are bit-identical; on a GPU batch composition may round differently). The
ratio grows with the steps: the cache is built once, so ``--steps`` should be a recipe's share of
its windows (the Qwen recipe: 3,000 steps of 16 over 7,566 sequences, each drawn ~6.3 times).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from compress.draft.selfspec.head import eos_ids, trimmed_vocabulary  # noqa: E402
from compress.draft.selfspec.step import _windows  # noqa: E402
from compress.draft.selfspec.train import distill_heads  # noqa: E402
from compress.models import load_model  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--exit-layer", type=int, default=1)
    ap.add_argument("--mid-depth", type=int, default=None)
    ap.add_argument("--corpora", default="stdlib,bbc")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train-windows", type=int, default=64, help="per corpus")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--unroll", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    loaded = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    model, tok = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    train, _ = _windows(tok, args.corpora.split(","), "train", args.seq_len, args.train_windows)
    vocab = trimmed_vocabulary(train.tolist(), args.vocab_size, vocab_size=model.lm_head.weight.shape[0],
                               always=eos_ids(model))
    k = args.exit_layer
    specs = {f"k{k}": (k, vocab, "deep")}
    if args.mid_depth is not None:
        specs[f"k{k}-mid"] = (k, vocab, "deep", args.mid_depth)
    runs, heads = {}, {}
    # on CUDA also the training as it was before both changes: the target every step, the heads in float32
    modes = ([("off-fp32", "off", False)] if args.device == "cuda" else []) + [("off", "off", True), ("auto", "auto", True)]
    for mode, cache, tf32 in modes:
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        heads[mode], hist = distill_heads(model, train, specs, steps=args.steps, batch_size=args.batch_size,
                                          lr=3e-4, unroll=args.unroll, teacher_cache=cache, tf32=tf32, progress=False)
        if args.device == "cuda":
            torch.cuda.synchronize()
        build = (hist["teacher_cache"] or {}).get("seconds", 0.0)
        runs[mode] = {"seconds": round(time.perf_counter() - t0, 2), "training_seconds": hist["seconds"],
                      "teacher_cache": hist["teacher_cache"], "tf32": hist["tf32"],
                      "steps_per_s": round(args.steps / (hist["seconds"] - build), 3),
                      "final_loss": hist["final_loss"]}
        print(mode, runs[mode], flush=True)
    apart = {n: max(float((a.float() - b.float()).abs().max())
                    for a, b in zip(heads["off"][n].state_dict().values(), heads["auto"][n].state_dict().values())
                    if a.dtype.is_floating_point) for n in specs}
    out = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "args": vars(args),
           "train_windows": int(train.shape[0]), "draws_per_window": round(args.steps * args.batch_size / train.shape[0], 2),
           "runs": runs,
           "training_speedup": round(runs["off"]["training_seconds"] / runs["auto"]["training_seconds"], 3),
           "step_speedup": round(runs["auto"]["steps_per_s"] / runs["off"]["steps_per_s"], 3),
           **({"tf32_step_speedup": round(runs["off"]["steps_per_s"] / runs["off-fp32"]["steps_per_s"], 3),
               "both_step_speedup": round(runs["auto"]["steps_per_s"] / runs["off-fp32"]["steps_per_s"], 3)}
              if "off-fp32" in runs else {}),
           "heads_max_abs_difference": apart,
           "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("training", out["training_speedup"], "x, steps", out["step_speedup"], "x; heads apart", apart, flush=True)
    return out


if __name__ == "__main__":
    main()
