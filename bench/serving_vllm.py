"""Our exports in vLLM on the GPU (issue 18 part 1): does each load (or the exact refusal), is its greedy
output the tokens our own loader gives, and is it faster than the bf16 model in the same vLLM?

    python bench/serving_vllm.py all --bf16 DIR --export NAME=DIR [--export ...] --out FILE [--resume] \\
        [--prompts bench/draft_bench_prompts/prose.txt] [--new-tokens 64] [--speed-tokens 256]
    python bench/serving_vllm.py one --model DIR --name NAME --out FILE.json [...]

``all`` runs ``one`` for the bf16 model and for each export, each in its own process (vLLM keeps its
GPU memory until the process ends), and writes one JSON: per model ``loads`` (or ``refusal``: the
exception's type and message and the kernel lines vLLM logged), ``greedy`` (per prompt: identical
to our loader's tokens, or the index of the first divergence) and ``speed`` (batch-1 and batch-32
decode tokens/s, and the ratio to bf16). ``one``:

1. ``vllm.LLM(model=DIR, dtype=bfloat16)`` in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so a
   refusal is the exception itself, not a dead engine process); the kernel vLLM chose per layer type
   is read from its log ("Using MacheteLinearKernel for ...").
2. Greedy: the first ``--greedy-prompts`` prompts as token ids, ``temperature=0``, ``--new-tokens``
   tokens (EOS stops), against ``compress.models.load_model(DIR)`` (our dequantizing loader) in bf16 on
   the same GPU with ``generate(do_sample=False)``. Kernels differ (packed int4 in vLLM, dequantized
   bf16 matmuls in ours), so a late divergence between near-tied logits is expected; the first index
   says how late.
3. Speed: ``ignore_eos`` and ``--speed-tokens`` new tokens per sequence; batch 1 (one prompt, median of
   3 after a warm-up) and batch 32 (32 prompts at once): generated tokens / wall seconds.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _KernelLog(logging.Handler):
    """Collects vLLM's "Using <Kernel> for <Method>" lines."""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Initializing"):  # the engine's config dump, which names every option (padding too)
            return
        if msg.startswith("Using ") and "Kernel" in msg or "not supported" in msg or "padding" in msg:
            self.lines.append(msg[:300])


def _prompts(path: str, n: int) -> list[str]:
    from compress.draft.agreement import read_prompts

    texts = read_prompts(path)
    return [texts[i % len(texts)] for i in range(n)]


def _one_line(refusal: dict) -> str:
    """The refusal's type and the line of its message that says why (pydantic puts it on the second line)."""
    lines = [ln.strip() for ln in str(refusal.get("message", "")).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "nsupported" in ln or "rror," in ln), lines[0] if lines else "")
    return f"{refusal.get('type', 'error')}: {why[:200]}"


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length); None when identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_one(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out: dict = {"name": args.name, "model": args.model}
    handler = _KernelLog()
    try:
        from vllm import LLM, SamplingParams

        # After the import: vLLM's logging.config.dictConfig (run when it is imported) replaces the handlers
        # of its "vllm" logger, which dropped one attached before (the first window's empty kernel logs).
        logging.getLogger("vllm").addHandler(handler)
        t0 = time.perf_counter()
        llm = LLM(model=args.model, dtype="bfloat16", seed=0, max_model_len=2048,
                  gpu_memory_utilization=args.gpu_memory, trust_remote_code=False)
        out.update(loads=True, load_seconds=round(time.perf_counter() - t0, 1))
    except Exception as exc:  # the refusal is the measurement
        out.update(loads=False, refusal={"type": type(exc).__name__, "message": str(exc)[:2000],
                                         "traceback_tail": traceback.format_exc().splitlines()[-6:]})
        out["kernel_log"] = handler.lines
        return out
    out["kernel_log"] = handler.lines
    tok = llm.get_tokenizer()
    prompts = _prompts(args.prompts, max(args.greedy_prompts, 32))
    ids = [tok(p)["input_ids"][-args.max_prompt_tokens:] for p in prompts]
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    as_prompts = [{"prompt_token_ids": i} for i in ids]
    vllm_out = [o.outputs[0].token_ids for o in llm.generate(as_prompts[:args.greedy_prompts], greedy)]
    out["greedy"] = {"vllm_tokens": [list(t) for t in vllm_out]}
    if not args.no_reference:
        out["greedy"].update(reference(args.model, ids[:args.greedy_prompts], args.new_tokens, vllm_out))
    fixed = SamplingParams(temperature=0.0, max_tokens=args.speed_tokens, ignore_eos=True)
    llm.generate(as_prompts[:1], fixed)  # warm-up (graphs, caches)
    b1 = []
    for _ in range(3):
        t = time.perf_counter()
        n = sum(len(o.outputs[0].token_ids) for o in llm.generate(as_prompts[:1], fixed))
        b1.append(n / (time.perf_counter() - t))
    t = time.perf_counter()
    n32 = sum(len(o.outputs[0].token_ids) for o in llm.generate(as_prompts[:32], fixed))
    out["speed"] = {"batch1_tok_s": round(statistics.median(b1), 1),
                    "batch32_tok_s": round(n32 / (time.perf_counter() - t), 1),
                    "new_tokens": args.speed_tokens}
    return out


def reference(model_dir: str, ids: list[list[int]], new_tokens: int, vllm_out) -> dict:
    """Greedy tokens from our own loader (bf16, same GPU) and where they part from vLLM's."""
    import torch

    from compress.models import load_model

    loaded = load_model(model_dir, dtype="bfloat16", device="cuda")
    ours = []
    with torch.inference_mode():
        for prompt in ids:
            x = torch.tensor([prompt], device="cuda")
            y = loaded.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                      do_sample=False)
            ours.append(y[0, len(prompt):].tolist())
    eos = loaded.tokenizer.eos_token_id
    ours = [t[:t.index(eos) + 1] if eos in t else t for t in ours]  # generate pads after EOS in a batch
    div = [first_divergence(list(v), o) for v, o in zip(vllm_out, ours)]
    del loaded
    torch.cuda.empty_cache()
    return {"ours_tokens": ours, "first_divergence": div, "identical": sum(d is None for d in div),
            "prompts": len(div)}


def compare_with_bf16(models: dict) -> None:
    """Each model against the bf16 model in the same vLLM: speed ratios, and where its greedy tokens part
    from bf16's (the same engine and kernels family: what quantization changed, without the bf16-vs-bf16
    differences between vLLM and our loader)."""
    base = models.get("bf16", {})
    for name, entry in models.items():
        if base.get("speed") and entry.get("speed"):
            entry["speed"]["vs_bf16"] = {k: round(entry["speed"][k] / base["speed"][k], 3)
                                         for k in ("batch1_tok_s", "batch32_tok_s")}
        mine, ref = entry.get("greedy", {}).get("vllm_tokens"), base.get("greedy", {}).get("vllm_tokens")
        if name != "bf16" and mine and ref:
            div = [first_divergence(list(a), list(b)) for a, b in zip(mine, ref)]
            entry["greedy"]["vs_bf16_vllm"] = {"first_divergence": div, "identical": sum(d is None for d in div)}


def run_all(args) -> dict:
    models = [("bf16", args.bf16)] + [tuple(e.split("=", 1)) for e in args.export]
    result = {"command": " ".join(sys.argv), "models": {}}
    if args.resume and Path(args.out).is_file():  # a second call continues: measured models are kept
        result["models"] = json.loads(Path(args.out).read_text()).get("models", {})
    tmp = Path(args.out).with_suffix(".parts")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, path in models:
        if name in result["models"]:
            continue
        part = tmp / f"{name}.json"
        cmd = [sys.executable, __file__, "one", "--model", path, "--name", name, "--out", str(part),
               "--prompts", args.prompts, "--new-tokens", str(args.new_tokens), "--speed-tokens",
               str(args.speed_tokens), "--gpu-memory", str(args.gpu_memory)]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:  # recorded, and the next model still runs
            proc = subprocess.CompletedProcess(cmd, returncode=None, stderr=f"timed out after {args.timeout} s")
        entry = json.loads(part.read_text()) if part.is_file() else {
            "name": name, "loads": None, "crash": {"returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:]}}
        entry["wall_seconds"] = round(time.perf_counter() - t, 1)
        result["models"][name] = entry
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        refusal = entry.get("refusal") or {}
        state = "loads" if entry.get("loads") else f"REFUSED ({_one_line(refusal)})"
        print(name, state, entry.get("speed", ""), flush=True)
    compare_with_bf16(result["models"])
    import torch

    result["machine"] = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                         "torch": torch.__version__}
    try:
        import vllm

        result["machine"]["vllm"] = vllm.__version__
    except ImportError:
        pass
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("all", "one"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--prompts", default="bench/draft_bench_prompts/prose.txt")
        p.add_argument("--new-tokens", type=int, default=64)
        p.add_argument("--speed-tokens", type=int, default=256)
        p.add_argument("--gpu-memory", type=float, default=0.4)
    a, o = sub.choices["all"], sub.choices["one"]
    a.add_argument("--bf16", required=True, help="the float model folder (the reference for speed)")
    a.add_argument("--export", action="append", default=[], metavar="NAME=DIR")
    a.add_argument("--timeout", type=int, default=540)
    a.add_argument("--resume", action="store_true", help="keep the models --out already holds; run the rest")
    o.add_argument("--model", required=True)
    o.add_argument("--name", required=True)
    o.add_argument("--greedy-prompts", type=int, default=8)
    o.add_argument("--max-prompt-tokens", type=int, default=512)
    o.add_argument("--no-reference", action="store_true", help="skip our loader's greedy tokens")
    args = ap.parse_args()
    if args.cmd == "one":
        Path(args.out).write_text(json.dumps(run_one(args), indent=1) + "\n")
    else:
        run_all(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
