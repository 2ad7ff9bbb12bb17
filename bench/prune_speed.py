"""Does structured pruning make the model faster? Dense vs NIRVANA-pruned, side by side.

For each sparsity the model is pruned (NIRVANA, the given allocation; a recipe run by
``compress.pipeline.run_recipe``, as ``compress run`` runs it), then dense and
pruned are timed in alternation (``--repeats`` rounds, median reported) on the same inputs:
a forward pass over a batch of windows (prefill), and batch-1 greedy decoding of
``--new-tokens`` tokens with the KV cache (eager ``generate``, no compile).

    python bench/prune_speed.py --model smollm2-135m --sparsities 0.2,0.5 \
        --out bench/results/prune/speed-smollm2-135m-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
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


def recipe(args, sparsity: float | None = None):
    """The dense model alone, or NIRVANA at ``sparsity`` on 32 x 128 calibration tokens (seed 0)."""
    from compress.recipe import CalibrationSpec, ModelSpec, Recipe, Stage
    model = ModelSpec(id=args.model, dtype=args.dtype, device=args.device)
    if sparsity is None:
        return Recipe(model=model)
    return Recipe(model=model,
                  calibration=CalibrationSpec(corpus=args.calib_corpus, split="train", num_samples=32, seq_len=128,
                                              seed=0, batch_size=8),
                  stages=[Stage(name="prune", steps=[{"algorithm": "nirvana", "sparsity": sparsity,
                                                      "allocation": args.allocation}])])


def quiet(*_) -> None:
    """run_recipe's log: the rows printed here are the progress."""


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

    from compress.data import corpus_text
    from compress.evaluate import window_token_ids
    from compress.pipeline import run_recipe

    # Dense and pruned models both come from recipes run as `compress run` runs them.
    dense_run = run_recipe(recipe(args), progress=False, log=quiet)
    dense, tok = dense_run.model, dense_run.tokenizer
    device, machine = torch.device(dense_run.report["model"]["device"]), dense_run.report["versions"]
    dense.generation_config.pad_token_id = tok.eos_token_id
    windows = window_token_ids(tok, corpus_text("bbc", "test"), args.seq_len, args.batch).to(device)
    prompt = windows[:1, :32]
    rows = []
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        run = run_recipe(recipe(args, sparsity), progress=False, log=quiet)
        pruned, step = run.model.eval(), run.report["stages"][0]["steps"][0]
        pruned.generation_config.pad_token_id = tok.eos_token_id
        times = {"dense": {"forward": [], "decode": []}, "pruned": {"forward": [], "decode": []}}
        for name, m in (("dense", dense), ("pruned", pruned)):  # warm-up
            time_forward(m, windows, device)
            time_decode(m, prompt, 4, device)
        for _ in range(args.repeats):  # alternate so drift in machine load hits both alike
            for name, m in (("dense", dense), ("pruned", pruned)):
                times[name]["forward"].append(time_forward(m, windows, device))
                times[name]["decode"].append(time_decode(m, prompt, args.new_tokens, device))
        med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
        params = {"dense": step["block_params_before"], "pruned": step["block_params_after"]}
        rows.append({
            "sparsity": sparsity, "allocation": args.allocation,
            "block_params": params,
            "forward_s": {n: round(med[n]["forward"], 4) for n in med},
            "forward_speedup": round(med["dense"]["forward"] / med["pruned"]["forward"], 3),
            "decode_tok_s": {n: round(1 / med[n]["decode"], 1) for n in med},
            "decode_speedup": round(med["dense"]["decode"] / med["pruned"]["decode"], 3),
            "all_seconds": times})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "all_seconds"}), flush=True)
        del pruned, run
    result = {"command": "python bench/prune_speed.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), **machine},
              "forward_input": list(windows.shape), "decode": {"prompt_tokens": 32, "new_tokens": args.new_tokens},
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
