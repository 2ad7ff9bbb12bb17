"""Streaming GPTQ W4 g128 at real model shapes (issue 17 part 5): wall time per block and in all, peak
host RSS, peak GPU memory; optionally GPTQModel on the same checkpoint, in its own process.

The weights are random (seeded normal, std 0.02; norms 1, biases 0): no 8B-70B checkpoint is on these
machines. Time and memory depend on the shapes, not the values, so the figures stand for the real
models' — the quantization error does not, and none is reported. Calibration is random token ids
(seeded, uniform over the vocabulary; no tokenizer in the folder), N sequences of L tokens.

    # a checkpoint folder: config.json + one safetensors shard per block, written block by block
    python bench/scale_gptq.py write --shape llama-3.1-8b --dir /tmp/scale/llama-3.1-8b
    # streaming GPTQ (ours), one JSON of results; --gpu-fraction caps the GPU (set_per_process_memory_fraction)
    python bench/scale_gptq.py run --shape llama-3.1-8b --dir /tmp/scale/llama-3.1-8b --device cuda \\
        --samples 128 --seq-len 2048 --out results.json [--gpu-fraction 0.15] [--resume]
    # the 70B shape is never written (140 GB in bf16 is more than the GPU machine's 64 GB disk): its
    # tensors are generated from the seed when a block is read (--generate; only config.json on disk)
    python bench/scale_gptq.py run --shape llama-3.1-70b --generate --dir /tmp/scale/70b --device cuda ...
    # GPTQModel 7.6 on the same folder (needs the files: not with --generate)
    python bench/scale_gptq.py run --shape llama-3.1-8b --dir ... --peer gptqmodel --out peer.json
    # CPU smoke at a tiny shape (what the tests run)
    python bench/scale_gptq.py smoke --dir /tmp/scale-tiny --out /tmp/scale-tiny.json

Results go to ``--out`` after every block (a run cut off by a time limit keeps what it measured;
``--resume`` keeps the finished blocks on disk so that the next call continues at the first block
not written, and merges its per-block times into the same JSON).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Public configs of the real models (their config.json), the fields that fix the shapes.
SHAPES = {
    "tiny": dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, rope_theta=10000.0),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-14b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152064, rope_theta=1000000.0),
    "llama-3.1-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
STD = 0.02
GENERATED = "generated.json"  # marks a folder whose tensors come from the seed, not from files


def config_for(shape: str, layers: int | None = None):
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    kind = fields.pop("model_type")
    if layers:
        fields["num_hidden_layers"] = layers
    return AutoConfig.for_model(kind, **fields, max_position_embeddings=8192, rms_norm_eps=1e-5,
                                tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def placeholder_tokenizer(vocab: int):
    """A word-level tokenizer whose token i is "tI": GPTQModel's loader insists on a tokenizer, and
    nothing tokenizes text here (calibration is token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1", pad_token="t1",
                                   unk_token="t0")


class SeededCheckpoint:
    """The tensors of a random model, each generated from (seed, name) when read: the same bytes every
    time, in any order, one tensor in memory at a time (``compress.checkpoint.Checkpoint``'s reading side)."""

    def __init__(self, folder: Path, seed: int, dtype, device: str = "cpu"):
        import torch

        from compress.checkpoint import skeleton

        # ``device``: where the numbers are drawn. The CPU's generator gives the bytes a written folder holds
        # (``write``); a CUDA generator gives other (equally random) numbers, ~100x faster than the CPU's
        # single-threaded draw, which took ~1.5 s of each 8B block and more of each 70B one.
        self.folder, self.seed, self.dtype, self.device = Path(folder), seed, dtype, torch.device(device)
        model = skeleton(folder, dtype)
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.torch = torch
        self.seconds = 0.0  # spent generating (with --generate, inside the per-block times)

    def keys(self):
        return self.shapes.keys()

    def __contains__(self, name):
        return name in self.shapes

    def get(self, name):
        torch = self.torch
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=self.dtype)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=self.dtype)
        t0 = time.perf_counter()
        g = torch.Generator(self.device).manual_seed(
            int(hashlib.sha256(f"{self.seed}:{name}".encode()).hexdigest()[:15], 16))
        out = (torch.randn(shape, generator=g, device=self.device) * STD).to(self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the draw's time, not its launch's
        self.seconds += time.perf_counter() - t0
        return out


def write_config(shape: str, folder: Path, seed: int, layers: int | None, generated: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = config_for(shape, layers)
    config.save_pretrained(folder)
    placeholder_tokenizer(config.vocab_size).save_pretrained(folder)
    if generated:
        (folder / GENERATED).write_text(json.dumps({"seed": seed, "shape": shape}))


def cmd_write(args) -> dict:
    """config.json and one shard per block (plus one for the rest), generated and written block by block."""
    import torch
    from safetensors.torch import save_file

    folder = Path(args.dir)
    write_config(args.shape, folder, args.seed, args.layers, generated=False)
    ckpt = SeededCheckpoint(folder, args.seed, torch.bfloat16)
    groups: dict[str, list[str]] = {}
    for name in ckpt.keys():
        parts = name.split(".")
        key = parts[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(name)
    order = ["rest"] + sorted((k for k in groups if k != "rest"), key=int)
    n = len(order)
    weight_map, total, t0 = {}, 0, time.perf_counter()
    for k, key in enumerate(order, 1):
        file = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {name: ckpt.get(name) for name in groups[key]}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return {"shape": args.shape, "dir": str(folder), "bytes": total, "shards": n,
            "seconds": round(time.perf_counter() - t0, 1)}


def calibration(vocab: int, samples: int, seq_len: int, seed: int):
    import torch

    from compress.data.calibration_set import CalibrationSet

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (samples, seq_len), generator=g)
    return CalibrationSet(ids, {"source": "random token ids (uniform over the vocabulary)", "seed": seed,
                                "num_samples": samples, "seq_len": seq_len})


def _gpu_peak(device) -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def cmd_run(args) -> dict:
    import torch

    from compress import host_memory
    from compress.runtime import resolve_device, versions

    device = resolve_device(args.device)
    folder = Path(args.dir)
    if args.generate and not (folder / "config.json").is_file():
        write_config(args.shape, folder, args.seed, args.layers, generated=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if args.resume and out.is_file() else {}
    cfg = json.loads((folder / "config.json").read_text())
    calls = result.get("calls", [])
    result.update({
        "shape": args.shape, "layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
        "peer": args.peer or "compress (streaming)", "weights": "random (seeded normal, std 0.02)",
        "checkpoint": f"generated from the seed per block on {args.generate_device} (not on disk)" if args.generate
        else "sharded safetensors",
        "calibration": {"tokens": "random ids (seeded)", "samples": args.samples, "seq_len": args.seq_len},
        "quant": {"bits": 4, "group_size": 128, "sym": True}, "device": str(device),
        "gpu_fraction": args.gpu_fraction, "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    })
    if device.type == "cuda":
        if args.gpu_fraction:
            torch.cuda.set_per_process_memory_fraction(  # wants an index, not a bare 'cuda'
                args.gpu_fraction, device.index if device.index is not None else torch.cuda.current_device())
        result["gpu"] = torch.cuda.get_device_name(device)
        result["gpu_total_mb"] = round(torch.cuda.get_device_properties(device).total_memory / 2**20)
        torch.cuda.reset_peak_memory_stats(device)
    calib = calibration(cfg["vocab_size"], args.samples, args.seq_len, args.seed)
    host_memory.reset_peak()
    blocks = result.setdefault("block_seconds", {})
    t0 = last = time.perf_counter()

    saving = threading.Lock()  # the peer's heartbeat saves from its own thread

    def save():
        with saving:
            result["peak_host_rss_mb"] = max(result.get("peak_host_rss_mb") or 0, host_memory.peak_mb() or 0)
            result["peak_gpu_mb"] = max(result.get("peak_gpu_mb") or 0, _gpu_peak(device) or 0) or None
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=2))
            os.replace(tmp, out)

    def on_block(pass_index, i):
        nonlocal last
        now = time.perf_counter()
        blocks[str(i)] = round(now - last, 3)
        last = now
        save()

    if args.peer == "gptqmodel":
        # GPTQModel reports nothing per block to us: a heartbeat saves its elapsed time and the peaks so
        # far, so a run cut off by the window's time limit still says how long it ran and how much it held.
        stop = threading.Event()

        def heartbeat():
            while not stop.wait(args.heartbeat):
                result["peer_seconds_so_far"] = round(time.perf_counter() - t0, 1)
                save()

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            result.update(_run_gptqmodel(folder, calib, args, device))
        finally:
            stop.set()
            beat.join()
    else:
        from compress.stream_run import run_streaming

        recipe = {"model": {"id": str(folder), "dtype": "bfloat16", "device": args.device,
                            "stream": {"resume": args.resume}},
                  "calibration": {"num_samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size},
                  "stages": [{"name": "q", "steps": [{"algorithm": "gptq", "bits": 4, "group_size": 128,
                                                       "sym": True}]}],
                  "export": {"format": "gptq", "vllm": "off"}}
        ckpt = SeededCheckpoint(folder, json.loads((folder / GENERATED).read_text())["seed"], torch.bfloat16,
                                args.generate_device) if (folder / GENERATED).is_file() else None
        res = run_streaming(recipe, out_dir=args.export_dir or str(folder) + "-gptq", force=True,
                            progress=args.progress, log=print, calibration=calib, checkpoint=ckpt, on_block=on_block)
        if ckpt is not None:
            result["generate_seconds"] = round(ckpt.seconds, 1)  # part of the block times: CPU randn
        result["resumed"] = res.report["stream"]["resumed"]
        result["stream_seconds"] = res.report["stream"].get("seconds")  # block reads and writes, summed
        result["export_bytes"] = sum(f.stat().st_size for f in Path(res.out_dir).glob("*.safetensors"))
        result["timings"] = res.report["timings"]  # per phase: load, stage:q (the blocks), export
        result["peak_host_mb_per_phase"] = res.report.get("peak_host_mb")
        result["peak_device_mb_per_phase"] = res.report.get("peak_device_mb")
    calls.append(round(time.perf_counter() - t0, 1))
    result["calls"] = calls  # wall time of each call (a resumed run has several)
    result["total_seconds"] = round(sum(calls), 1)
    result["blocks_timed"] = len(blocks)
    save()
    return result


def _run_gptqmodel(folder: Path, calib, args, device) -> dict:
    """GPTQModel 7.6 with its defaults at W4 g128 (sym), the same token ids, its own peaks."""
    import torch
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 2))  # its default pool wants 2+ here
    from gptqmodel import GPTQModel, QuantizeConfig, __version__

    t0 = time.perf_counter()
    model = GPTQModel.load(str(folder), QuantizeConfig(bits=4, group_size=128), dtype=torch.bfloat16,
                           device=str(device))
    model.quantize([{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in calib.input_ids],
                   batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    model.save(args.export_dir or str(folder) + "-gptqmodel")
    return {"peer_version": __version__, "quantize_seconds": round(seconds, 1)}


def cmd_smoke(args) -> dict:
    """The tiny shape on this machine: write, then run (what tests/test_scale_bench.py checks)."""
    args.shape = "tiny"
    folder = Path(args.dir)
    args.dir = str(folder / "tiny")
    written = cmd_write(args)
    args.export_dir = str(folder / "tiny-gptq")
    return {"write": written, "run": cmd_run(args)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["write", "run", "smoke"])
    p.add_argument("--shape", choices=list(SHAPES), default="tiny", help="model shape (default: tiny)")
    p.add_argument("--dir", required=True, help="the checkpoint folder (written by `write`, read by `run`)")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder blocks than the shape has (default: all)")
    p.add_argument("--seed", type=int, default=0, help="weights and calibration ids (default: 0)")
    p.add_argument("--generate", action="store_true", help="run: tensors generated from the seed per block, "
                   "no shards on disk (the 70B shape)")
    p.add_argument("--generate-device", default="cpu", help="with --generate: where the random numbers are drawn "
                   "(default: cpu, the bytes `write` puts on disk; cuda: other numbers, far faster)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--samples", type=int, default=128, help="calibration sequences N (default: 128)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence L (default: 2048)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch (default: 8)")
    p.add_argument("--gpu-fraction", type=float, default=None,
                   help="cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction)")
    p.add_argument("--resume", action="store_true", help="keep finished blocks on disk; a later call continues")
    p.add_argument("--peer", choices=["gptqmodel"], default=None, help="run GPTQModel instead of ours")
    p.add_argument("--export-dir", default=None, help="where the GPTQ export goes (default: DIR-gptq)")
    p.add_argument("--out", required=True, help="results JSON (rewritten after every block)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--heartbeat", type=float, default=15.0,
                   help="--peer: seconds between saves of its elapsed time and peaks (default: 15)")
    args = p.parse_args(argv)
    if args.command == "smoke" and args.samples == 128 and args.seq_len == 2048:
        args.samples, args.seq_len = 4, 64  # the CPU smoke: a few short sequences
    result = {"write": cmd_write, "run": cmd_run, "smoke": cmd_smoke}[args.command](args)
    if args.command != "run":
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result if args.command != "run" else {k: result[k] for k in (
        "shape", "total_seconds", "peak_host_rss_mb", "peak_gpu_mb", "blocks_timed")}, indent=1))


if __name__ == "__main__":
    main()
