"""Does structured pruning make the model faster? Dense vs NIRVANA-pruned, side by side.

For each sparsity the model is pruned (NIRVANA, the given allocation), then dense and
pruned are timed in alternation (``--repeats`` rounds, median reported) on the same inputs:
a forward pass over a batch of windows (prefill), and batch-1 greedy decoding of
``--new-tokens`` tokens with the KV cache (eager ``generate``, no compile).

    python bench/prune_speed.py --model smollm2-135m --sparsities 0.2,0.5 \
        --out bench/results/prune/speed-smollm2-135m-cpu.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(model, ids, device) -> float:
    import torch
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        _sync(device)
    return time.perf_counter() - t0


def time_decode(model, prompt, new_tokens, device) -> float:
    """Seconds per generated token, batch 1, greedy, KV cache (prefill excluded by subtraction)."""
    import torch
    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        _sync(device)
        t1 = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        _sync(device)
        t2 = time.perf_counter()
    return ((t2 - t1) - (t1 - t0)) / (new_tokens - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--sparsities", default="0.2,0.5")
    ap.add_argument("--allocation", default="adaptive", choices=["adaptive", "uniform"])
    ap.add_argument("--calib-corpus", default="bbc")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from compress.algorithms import ALGORITHMS, StepContext
    from compress.data import build_calibration_set, corpus_text
    from compress.evaluate import window_token_ids
    from compress.models import load_model
    from compress.pipeline import resolve_device, versions
    from compress.prune.units import block_parts, block_params

    device = resolve_device(args.device)
    loaded = load_model(args.model, dtype=args.dtype, device=device, progress=False)
    dense, tok = loaded.model, loaded.tokenizer
    dense.generation_config.pad_token_id = tok.eos_token_id
    calib = build_calibration_set(tok, args.calib_corpus, split="train", num_samples=32, seq_len=128, seed=0)
    windows = window_token_ids(tok, corpus_text("bbc", "test"), args.seq_len, args.batch).to(device)
    prompt = windows[:1, :32]
    rows = []
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        pruned = copy.deepcopy(dense)
        cfg = ALGORITHMS["nirvana"].config(algorithm="nirvana", sparsity=sparsity, allocation=args.allocation)
        ALGORITHMS["nirvana"].apply(pruned, cfg, StepContext(tokenizer=tok, device=device, calibration=calib,
                                                             progress=False))
        pruned.to(device).eval()
        times = {"dense": {"forward": [], "decode": []}, "pruned": {"forward": [], "decode": []}}
        for name, m in (("dense", dense), ("pruned", pruned)):  # warm-up
            time_forward(m, windows, device)
            time_decode(m, prompt, 4, device)
        for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
            for name, m in (("dense", dense), ("pruned", pruned)):
                times[name]["forward"].append(time_forward(m, windows, device))
                times[name]["decode"].append(time_decode(m, prompt, args.new_tokens, device))
        med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
        params = {n: sum(block_params(p) for p in block_parts(m)) for n, m in (("dense", dense), ("pruned", pruned))}
        rows.append({
            "sparsity": sparsity, "allocation": args.allocation,
            "block_params": params,
            "forward_s": {n: round(med[n]["forward"], 4) for n in med},
            "forward_speedup": round(med["dense"]["forward"] / med["pruned"]["forward"], 3),
            "decode_tok_s": {n: round(1 / med[n]["decode"], 1) for n in med},
            "decode_speedup": round(med["dense"]["decode"] / med["pruned"]["decode"], 3),
            "all_seconds": times})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "all_seconds"}), flush=True)
        del pruned
    result = {"command": "python bench/prune_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "machine": {"cpu_count": __import__("os").cpu_count(), "torch_threads": torch.get_num_threads(),
                          **versions()},
              "forward_input": list(windows.shape), "decode": {"prompt_tokens": 32, "new_tokens": args.new_tokens},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
