"""Standalone verification extras for ``compress eval``: weight bytes, peak memory, batch-1 decode
speed on the fast path, the memory-bandwidth roofline, and BBC-topic zero-shot accuracy.

- ``weight_bytes``: every parameter once (tied embeddings once) plus the packed buffers of int4
  linears (0.5 B per weight + their bf16/float scales and zeros). ``weight_bytes_per_token``: what
  one decode step must read — all of it except an untied input embedding, of which one row is read.
- roofline tokens/s = bandwidth ÷ ``weight_bytes_per_token`` (batch 1 reads every weight once per
  token; KV cache and activations ignored). Bandwidth: ``--bandwidth-gbs``, else the NOMINAL
  datasheet figure for a known GPU name (an upper bound; measured copy bandwidth is ~10–20% less).
- decode speed: ``fast_target_generate`` (static KV cache; compiled step with ``compile``),
  greedy, from a fixed prompt; ``decode_tokens_per_s`` = 1 / mean decode-step time (prefill
  excluded), also ``tokens_per_s_with_prefill``.
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` since the caller's last reset (the CLI
  resets before perplexity, so it covers the whole eval) and for the decode alone; on the CPU the
  process's peak RSS since start (loading included).
"""
from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from compress.draft.fast import FastDecoder, cache_len_for, fast_target_generate

# Nominal datasheet HBM/GDDR bandwidth in GB/s, first substring match of the CUDA device name wins.
NOMINAL_BANDWIDTH_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),  # H100 = SXM5
    ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
    ("L40S", 864.0), ("L4", 300.0), ("A10G", 600.0), ("RTX 4090", 1008.0),
)


def nominal_bandwidth_gbs(device_name: str) -> float | None:
    for key, gbs in NOMINAL_BANDWIDTH_GBS:
        if key in device_name:
            return gbs
    return None


def _int4_modules(model: nn.Module):
    from compress.quantize.int4 import Int4Linear  # the int4 runtime only when measuring bytes
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of the weights as stored in memory (see the module docstring)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields a tied weight once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    int4 = _int4_modules(model)
    packed = sum(m.packed.numel() * m.packed.element_size() + m.scales_and_zeros.numel()
                 * m.scales_and_zeros.element_size() for m in int4)
    total += packed
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = emb is not None and out is not None and getattr(out, "weight", None) is emb.weight
    emb_bytes = 0 if emb is None or tied else emb.weight.numel() * emb.weight.element_size()
    return {"weight_bytes": total, "weight_bytes_per_token": total - emb_bytes, "int4_linears": len(int4),
            "int4_packed_bytes": packed, "tied_embeddings": tied}


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device),
                "peak_memory_kind": "cuda max_memory_allocated since the last reset"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024,
            "peak_memory_kind": "process peak RSS since start (CPU)"}


def decode_speed(model: nn.Module, prompt_ids, *, new_tokens: int = 128, compile: bool = False,
                 repeats: int = 3) -> dict:
    """Batch-1 greedy decoding on the fast path; ``repeats`` timed runs after a warm-up."""
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids).reshape(-1)
    dec = FastDecoder(model, cache_len_for([prompt.numel()], new_tokens), compile=compile)
    if compile:
        dec.warmup()
    fast_target_generate(dec, prompt, min(8, new_tokens))  # untimed: first-call costs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dec.clear_stats()
    runs = [fast_target_generate(dec, prompt, new_tokens) for _ in range(repeats)]
    step = dec.step_seconds([1])
    out = {"decode_tokens_per_s": 1 / step if step else None,
           "decode_step_ms": 1e3 * step if step else None,
           "tokens_per_s_with_prefill": sum(r.new_tokens for r in runs) / sum(r.wall_time_s for r in runs),
           "prompt_tokens": prompt.numel(), "new_tokens": new_tokens, "repeats": repeats,
           "compile": compile, "static_cache": dec.static}
    if device.type == "cuda":
        out["decode_peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def standalone_metrics(model: nn.Module, tokenizer, *, device, speed: bool = True, new_tokens: int = 128,
                       compile: bool = False, topics: int = 0, bandwidth_gbs: float | None = None,
                       prompt_text: str | None = None) -> dict:
    """Weight bytes, roofline, decode speed (``speed``), BBC-topic accuracy (``topics`` articles)
    and peak memory, as one JSON-ready dict."""
    device = torch.device(device)
    out: dict = {**weight_bytes(model)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    bw, source = bandwidth_gbs, "--bandwidth-gbs"
    if bw is None:
        bw, source = nominal_bandwidth_gbs(name), f"nominal datasheet figure for {name}"
    roof = bw * 1e9 / out["weight_bytes_per_token"] if bw else None
    out["roofline"] = {"device_name": name, "bandwidth_gbs": bw, "bandwidth_source": source if bw else None,
                       "tokens_per_s": roof}
    if speed:
        text = prompt_text or "def fibonacci(n):\n    "
        ids = tokenizer(text[:4000], add_special_tokens=False)["input_ids"][:32]
        out["decode"] = decode_speed(model, ids, new_tokens=new_tokens, compile=compile)
        tps = out["decode"]["decode_tokens_per_s"]
        out["roofline"]["fraction_of_roofline"] = tps / roof if roof and tps else None
    if topics:
        from compress.tasks import bbc_topic_examples, topic_accuracy  # loads the corpora: only with --topics
        out["bbc_topics"] = topic_accuracy(model, tokenizer, bbc_topic_examples("test", max_examples=topics),
                                           device=device)
    out.update(peak_memory(device))
    return out
