"""Shapes, not quality: the block engine, the self-drafter's graphs and the head training step on a
random-weight model of a real shape (no weights to stage), so a GPU window checks its mechanics and
costs before the real run.

    python bench/self_spec_smoke.py --shape qwen2.5-coder-1.5b --device cuda --compile --out smoke.json
    python bench/self_spec_smoke.py --shape tiny --device cpu     # the same code paths on a CPU

Reports the target-alone step on our engine (and, with --hf, on transformers' forward with our
graphs: compress/draft/fast.py), a random head's drafting step, verify cost and bookkeeping share,
greedy identity against the matched reference, and the seconds per distillation step of four heads.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.draft.bench import spec_row, time_speculative, time_target, warm_up  # noqa: E402
from compress.draft.decoders import self_spec_pair, target_engine  # noqa: E402
from compress.draft.engine import EngineDecoder  # noqa: E402
from compress.draft.selfspec.head import ExitHead  # noqa: E402
from compress.draft.selfspec.train import distill_heads  # noqa: E402

SHAPES = {
    "qwen2.5-coder-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                               max_position_embeddings=32768, rope_theta=1e6),
    "tiny": dict(hidden_size=160, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False, max_position_embeddings=512),
}


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A random-weight Qwen2 model of one of SHAPES, seeded, with a confident LM head."""
    from transformers import AutoModelForCausalLM, Qwen2Config
    cfg = Qwen2Config(**SHAPES[shape], eos_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a confident head: stable argmax, varied tokens
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--hf", action="store_true", help="also time transformers' forward (FastDecoder, compiled)")
    ap.add_argument("--exit-layer", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile = (True if device.type == "cuda" else "eager") if args.compile else False
    t0 = time.perf_counter()
    model = random_model(args.shape, device, dtype)
    cfg = model.config
    out = {"shape": args.shape, "device": str(device), "dtype": str(dtype), "init_s": time.perf_counter() - t0}
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=gen).to(device) for n in (40, 90, 60)]
    gamma, n_new = args.gamma, args.new
    max_len = 256
    t0 = time.perf_counter()
    engine = target_engine(model, max_len, compile=compile)
    target = EngineDecoder(engine, graphs=bool(compile) and device.type == "cuda", name="target")
    time_target(target, prompts[:1], 4)
    out["engine_warm_s"] = time.perf_counter() - t0
    alone = time_target(target, prompts, n_new)
    out["engine_step_ms"], out["engine_tokens_per_s"] = alone["step_ms"], alone["tokens_per_s"]
    print(f"engine: step {alone['step_ms']:.3f} ms, {alone['tokens_per_s']:.1f} tok/s "
          f"(warm-up {out['engine_warm_s']:.1f} s)", flush=True)
    vocab = torch.arange(min(args.vocab, cfg.vocab_size))
    head = ExitHead(model, min(args.exit_layer, cfg.num_hidden_layers - 1), vocab).to(device)
    tdec, ddec = self_spec_pair(engine, head, compile=compile)
    t0 = time.perf_counter()
    warm_up(tdec, ddec, prompts[0], gamma, pad_verify=True)
    time_target(tdec, prompts[:1], 4, pad_to=gamma + 1)
    out["pair_warm_s"] = time.perf_counter() - t0
    matched = time_target(tdec, prompts, n_new, pad_to=gamma + 1)
    spec = time_speculative(tdec, ddec, prompts, n_new, gamma, pad_verify=True)
    row = spec_row(spec, alone, matched, gamma)
    row.pop("per_prompt")
    out["self_spec_random_head"] = row
    out["matched_step_ms"] = matched["step_ms"]
    print(f"self-spec (random head, k={head.exit_layer}, vocab {head.vocab_size}): c {row['c']:.3f} "
          f"v {row['verify_cost_ratio']:.3f} split {row['time_split']} identical {row['identical_prompts']}/3 "
          f"matched step {matched['step_ms']:.3f} ms (warm-up {out['pair_warm_s']:.1f} s)", flush=True)
    stop = time_speculative(tdec, ddec, prompts, n_new, gamma, pad_verify=True, confidence_threshold=0.3)
    srow = spec_row(stop, alone, matched, gamma)
    out["self_spec_stop"] = {k: srow[k] for k in ("c", "verify_cost_ratio", "time_split", "identical_prompts")}
    print(f"  with confidence stop: c {srow['c']:.3f} split {srow['time_split']} identical "
          f"{srow['identical_prompts']}/3", flush=True)
    if args.hf:
        from compress.draft.fast import FastDecoder
        t0 = time.perf_counter()
        fd = FastDecoder(model, max_len, compile=bool(compile), timed=False, name="hf",
                         compile_backend=compile if isinstance(compile, str) else "inductor")
        time_target(fd, prompts[:1], 4)
        hf = time_target(fd, prompts, n_new)
        out["hf_forward_step_ms"], out["hf_warm_s"] = hf["step_ms"], time.perf_counter() - t0
        print(f"transformers forward + our graphs: step {hf['step_ms']:.3f} ms", flush=True)
    seq = 512 if device.type == "cuda" else 32
    train = torch.randint(1, cfg.vocab_size, (64, seq), generator=gen)
    depths = [k for k in (2, 3, 5, 8) if k < cfg.num_hidden_layers]
    specs = {f"k{k}": (k, vocab) for k in depths}
    heads, hist = distill_heads(model, train, specs, steps=args.train_steps, batch_size=8, progress=False)
    out["train_step_s"] = hist["seconds"] / args.train_steps
    out["train_heads"] = list(specs)
    out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None
    print(f"training: {out['train_step_s']:.3f} s/step for {len(specs)} heads, 8 x {seq} tokens; "
          f"peak GPU {out['peak_gpu_gb']}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
