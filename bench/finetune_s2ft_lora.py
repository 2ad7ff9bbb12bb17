"""S2FT vs LoRA vs full fine-tuning on BBC topics: same data, same steps, same loop.

    .venv/bin/python bench/finetune_s2ft_lora.py --model smollm2-135m --device cpu --steps 60 \
        --out bench/results/finetune/smollm2-135m-cpu.json
    .venv/bin/python bench/finetune_s2ft_lora.py --model qwen2.5-coder-0.5b --device cuda --steps 200 \
        --batch-size 16 --out bench/results/finetune/qwen2.5-coder-0.5b-cuda.json

Every method trains with ``compress.finetune.train`` on the same instruction data (BBC train
split, ``topic_prompt`` -> " <topic>" + eos, loss on the answer tokens), the same seed, batch
order, step count and schedule; only the trainable parameters and the learning rate differ:

* s2ft: ``apply_s2ft`` (random selection of FFN channels / KV groups; down_proj / o_proj slices).
* lora: peft LoRA on every q/k/v/o/gate/up/down_proj, rank chosen so that its trainable
  parameter count is the closest to S2FT's (both counts are printed and stored).
* full: every parameter.

Each method runs in its own subprocess, so its peak memory is its own. Measured per method:
BBC test accuracy (``compress.tasks.topic_accuracy``, the same scoring as verify.topics),
median step time (steps 3..N), peak memory during training (CUDA: max_memory_allocated;
CPU: peak RSS after resetting the high-water mark once the model is loaded, i.e. VmHWM via
/proc/self/clear_refs), the analytic parameter + gradient + AdamW bytes, and the bytes the
autograd graph saves for backward on one micro-batch (excluding parameters; deterministic).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- memory probes

def _vm_kb(key: str) -> int | None:
    try:
        m = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    import resource
    kb = _vm_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def saved_activation_bytes(model, batch) -> int:
    """Bytes of distinct storages autograd keeps for backward on one forward (parameters excluded)."""
    from compress.finetune import labelled_loss_sum

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = labelled_loss_sum(model, batch)
    del loss
    return sum(seen.values())


# --------------------------------------------------------------------------- one method

def trainable_params(method: str, model, args, lora_rank: int | None):
    """(named trainable parameters, handle or None, extra report) for ``method``; freezes the rest."""
    from compress.finetune import apply_s2ft

    if method == "s2ft":
        handle = apply_s2ft(model, {"mlp_ratio": args.s2ft_mlp_ratio, "attention_ratio": args.s2ft_attention_ratio,
                                    "attention_modules": ["o_proj"], "mlp_modules": ["down_proj"],
                                    "seed": args.seed, "delta_dtype": "float32"})
        per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                       if n.rsplit(".", 1)[-1] in LORA_MODULES and isinstance(m, torch.nn.Linear))
        per_rank += sum(m.in_features + m.out_features for m in handle.modules.values())  # wrapped ones
        return handle.named_parameters(), handle, {"lora_params_per_rank": per_rank}
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        peft_model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                                      target_modules=LORA_MODULES, bias="none",
                                                      task_type="CAUSAL_LM"))
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        return named, peft_model, {"lora_rank": lora_rank, "lora_alpha": 2 * lora_rank}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return list(model.named_parameters()), None, {}
    raise SystemExit(f"unknown method {method!r}")


def worker(args) -> dict:
    from compress.finetune import TrainConfig, micro_batches, topic_dataset, train
    from compress.models import load_model
    from compress.tasks import bbc_topic_examples, topic_accuracy

    if args.threads:
        torch.set_num_threads(args.threads)
    try:  # every worker loads the same libraries (get_peft_model pulls in more), so RSS baselines compare
        from peft import LoraConfig, get_peft_model
        get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=1, target_modules=["0"]))
    except ImportError:
        pass
    device = torch.device(args.device)
    loaded = load_model(args.model, dtype=args.dtype, device=str(device), progress=False)
    model, tok = loaded.model, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    data = topic_dataset(tok, "bbc", "train", max_len=args.max_len, max_chars=args.max_chars,
                         max_examples=args.train_examples, seed=args.seed)
    test = bbc_topic_examples("test", max_examples=args.test_examples or None, max_chars=args.max_chars, seed=0)
    out: dict = {"method": args.worker, "train_examples": len(data), "test_examples": len(test)}
    if args.eval_before:
        out["accuracy_before"] = topic_accuracy(model, tok, test, device=device, batch_size=8)["accuracy"]
    for p in model.parameters():
        p.requires_grad_(False)
    named, handle, extra = trainable_params(args.worker, model, args, args.lora_rank)
    out.update(extra)
    n_train = sum(p.numel() for _, p in named)
    n_total = sum(p.numel() for p in model.parameters())  # LoRA: base + adapters
    out.update(trainable_params=n_train, total_params=n_total)
    trainable_bytes = sum(p.numel() * p.element_size() for _, p in named)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # AdamW keeps exp_avg and exp_avg_sq per trainable element (in the parameter's dtype).
    out["bytes"] = {"params": param_bytes, "grads": trainable_bytes, "adamw_state": 2 * trainable_bytes,
                    "params_grads_adamw": param_bytes + 3 * trainable_bytes}
    lr = {"s2ft": args.lr_s2ft, "lora": args.lr_lora, "full": args.lr_full}[args.worker]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=lr,
                      warmup=args.warmup, schedule="cosine", seed=args.seed)
    out["train_config"] = cfg.model_dump()
    # One micro-batch's saved-for-backward bytes, measured before training (same batch for all methods).
    probe = {k: v.to(device) for k, v in next(micro_batches(data, args.batch_size, args.seed, pad_id=pad)).items()}
    model.train()
    out["bytes"]["saved_activations_one_micro_batch"] = saved_activation_bytes(model, probe)
    del probe
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    reset_ok = reset_peak_rss()
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    res = train(model, named, data, cfg, pad_id=pad, device=device, progress=args.progress, desc=args.worker)
    out["train_seconds"] = round(time.perf_counter() - t0, 2)
    if device.type == "cuda":
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["memory_before_train_mb"] = round(base_alloc / 2**20, 1)
        out["memory_kind"] = "torch.cuda.max_memory_allocated"
    else:
        out["peak_memory_mb"] = round(peak_rss_mb(), 1)
        out["memory_before_train_mb"] = round(rss_before, 1)  # libraries + weights (+ LoRA matrices)
        out["memory_kind"] = "peak RSS (VmHWM reset after load)" if reset_ok else "peak RSS (ru_maxrss, includes load)"
    out["peak_increment_mb"] = round(out["peak_memory_mb"] - out["memory_before_train_mb"], 1)
    times = res.step_seconds[2:] or res.step_seconds
    out["step_seconds_median"] = round(sorted(times)[len(times) // 2], 4)
    out["step_seconds_mean"] = round(sum(times) / len(times), 4)
    out["losses"] = [round(x, 4) for x in res.losses]
    if handle is not None and args.worker == "s2ft":
        handle.remove(merge=True)
    model.eval()
    acc = topic_accuracy(model, tok, test, device=device, batch_size=8)
    out.update(accuracy=acc["accuracy"], ece=acc["ece"])
    return out


# --------------------------------------------------------------------------- the parent

def run_worker(method: str, args, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--result", str(result),
               *sys.argv[1:], *extra]
        print(f"[{method}] {' '.join(cmd[2:])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        return json.loads(result.read_text())


def machine() -> dict:
    import transformers
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "cpu_count": os.cpu_count()}
    try:
        import peft
        info["peft"] = peft.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def table(results: dict) -> str:
    full_peak = results.get("full", {}).get("peak_memory_mb")
    full_inc = results.get("full", {}).get("peak_increment_mb")
    rows = ["| method | trainable params | BBC test acc | peak memory MB (vs full) | training increment MB (vs full) "
            "| params+grads+AdamW MB | saved activations / micro-batch MB | step s (median) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, r in results.items():
        b = r["bytes"]
        vs_full = f" ({r['peak_memory_mb'] / full_peak:.2f}x)" if full_peak and method != "full" else ""
        inc_full = f" ({r['peak_increment_mb'] / full_inc:.2f}x)" if full_inc and method != "full" else ""
        rows.append(f"| {method} | {r['trainable_params']:,} | {r['accuracy']:.3f} | "
                    f"{r['peak_memory_mb']:.0f}{vs_full} | {r['peak_increment_mb']:.0f}{inc_full} | "
                    f"{b['params_grads_adamw'] / 2**20:.0f} | "
                    f"{b['saved_activations_one_micro_batch'] / 2**20:.1f} | {r['step_seconds_median']:.3f} |")
    return "\n".join(rows)


def parent(args) -> dict:
    methods = args.methods.split(",")
    started, host = time.time(), machine()
    results: dict = {}
    if args.lora_rank and "s2ft" not in methods:  # a LoRA/full-only rerun with a known rank
        s2ft, rank = {}, args.lora_rank
    else:
        s2ft = run_worker("s2ft", args, ["--eval-before"])
        per_rank = s2ft["lora_params_per_rank"]
        rank = max(1, round(s2ft["trainable_params"] / per_rank))
        print(f"S2FT trains {s2ft['trainable_params']:,} parameters; LoRA on {', '.join(LORA_MODULES)} trains "
              f"{per_rank:,} per rank -> rank {rank} ({rank * per_rank:,} parameters)", flush=True)
    if "s2ft" in methods:
        results["s2ft"] = s2ft
    for method in methods:
        if method != "s2ft":
            results[method] = run_worker(method, args, ["--lora-rank", str(rank)] if method == "lora" else [])
    summary = {"command": "python bench/finetune_s2ft_lora.py " + " ".join(sys.argv[1:]),
               "machine": host, "accuracy_before": s2ft.get("accuracy_before"),
               "wall_seconds": round(time.time() - started, 1), "results": results}
    try:
        summary["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    targets = {}
    if "lora" in results and "s2ft" in results:
        s, lo = results["s2ft"], results["lora"]
        targets.update(accuracy_ge_lora=s["accuracy"] >= lo["accuracy"],
                       peak_memory_le_lora=s["peak_memory_mb"] <= lo["peak_memory_mb"],
                       training_increment_le_lora=s["peak_increment_mb"] <= lo["peak_increment_mb"],
                       step_time_le_lora=s["step_seconds_median"] <= lo["step_seconds_median"])
    if "full" in results and "s2ft" in results:
        s, f = results["s2ft"], results["full"]
        targets["peak_memory_le_third_of_full"] = s["peak_memory_mb"] <= f["peak_memory_mb"] / 3
        targets["training_increment_le_third_of_full"] = s["peak_increment_mb"] <= f["peak_increment_mb"] / 3
    summary["targets_met"] = targets
    print(table(results))
    print(f"zero-shot accuracy before fine-tuning: {summary['accuracy_before']}")
    print("targets:", json.dumps(targets))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {args.out}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--methods", default="s2ft,lora,full")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-chars", type=int, default=300, help="article characters in the prompt (train and test)")
    ap.add_argument("--train-examples", type=int, default=None)
    ap.add_argument("--test-examples", type=int, default=0, help="BBC test articles scored (0: the whole split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--s2ft-mlp-ratio", type=float, default=0.05)
    ap.add_argument("--s2ft-attention-ratio", type=float, default=0.0)
    ap.add_argument("--lr-s2ft", type=float, default=1e-3)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lr-full", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default=None)
    # internal: one method in this process
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lora-rank", type=int, default=None,
                    help="with --methods lacking s2ft: use this LoRA rank instead of matching S2FT's count")
    ap.add_argument("--eval-before", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
    else:
        parent(args)


if __name__ == "__main__":
    main()
