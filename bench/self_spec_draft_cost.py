"""Where a draft's time goes: each part of a self-drafter's draft step timed on its own, against one
target decode step, on the same engine.

    python bench/self_spec_draft_cost.py --target random:qwen2.5-coder-1.5b --exit-layer 1 --device cuda \
        --compile --out results/draft-cost.json

torch.profiler sees only a few kernels of a CUDA-graph replay (bench/results/draft/h200-profile-random/),
so the loop's own c (a draft's device time over a target step) cannot be split by profiling it. Here
every part is recorded as its own CUDA graph holding ``--repeats`` back-to-back copies of it, replayed
``--replays`` times between two CUDA events: per copy, that is the part's cost inside a longer graph
(the way a fused round runs it), with one graph launch spread over the copies. The parts, for one row at
position ``--position``:

  embed        the token's embedding
  block        one target block (the compiled layer; the shallow part of a draft runs k of them)
  fuse         a deep head's map of the previous position's final state, added (index_select, matmul)
  head_layer   the head's decoder block, with its mask
  head_tail    the head's final norm, the trimmed LM rows, argmax and the id map
  lm_rows_N    the matmul over N LM rows alone (N: the trimmed size, 16,384 and the full vocabulary)
  draft        one whole draft step as a fused round runs it (shallow blocks, head, argmax, id map)
  round_G      a round of G drafts (``--gamma``), per draft
  target_step  one target decode step: embedding, every block, final norm, full LM head, argmax
  launch       a graph of one tiny kernel: the floor a part's copy pays for being a kernel
  head_step    the draft minus its shallow blocks: fuse, head layer and tail (drafts only: no target state)

``--fused`` adds the same programs compiled whole by torch.compile (one program, kernels fused across the
calls' boundaries; the engine compiles one layer at a time): ``head_step_fused``, ``round_G_fused`` and
``target_step_fused``. They say what fusing would save; the loop does not run them (a fused round would
also compute the shallow blocks' states, which verification reuses, with other kernels than the target
alone: token identity would have to be shown again).

On the CPU (no graphs) the same parts run eagerly and are timed by the wall clock: mechanics only.
Random weights of a real shape (``random:SHAPE``, bench/self_spec_smoke.py's) cost the same as real
ones; no weights to stage. A real target and export: ``--target ID --self-spec DIR [--head NAME]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.draft.decoders import self_spec_pair, target_engine  # noqa: E402
from compress.draft.engine import _rms  # noqa: E402
from compress.draft.selfspec.head import ExitHead  # noqa: E402
from compress.pipeline import resolve_device, versions  # noqa: E402


def _model_and_head(args, device):
    if args.target.startswith("random:"):
        from bench.self_spec_smoke import random_model
        dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
        model = random_model(args.target.split(":", 1)[1], device, dtype)
        vocab = torch.arange(min(args.vocab, model.config.vocab_size))
        return model, ExitHead(model, args.exit_layer, vocab, context=args.context).to(device)
    if not args.self_spec:
        raise SystemExit("--self-spec is needed for a real target")
    from compress.draft.selfspec.step import load_self_spec
    from compress.models import load_model
    model = load_model(args.target, dtype=args.dtype, device=device).model
    head, _, _ = load_self_spec(args.self_spec, model, args.head)
    return model, head


def time_part(fn, device, repeats: int, replays: int) -> float:
    """Microseconds per copy of ``fn()``: a CUDA graph of ``repeats`` copies replayed ``replays`` times
    (CPU: ``fn`` called repeats × replays times)."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats * replays):
            fn()
        return (time.perf_counter() - t0) * 1e6 / (repeats * replays)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and lazy CUDA state outside the capture
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) * 1e3 / (repeats * replays)


def parts(pair, position: int, gamma: int, fused: str | None = None) -> dict:
    """The parts' closures, on static inputs at ``position`` (every write lands where the real step's would);
    ``fused``: a torch.compile backend for the ``*_fused`` parts (None: none)."""
    e = pair.engine
    dev = e.device
    tok = torch.tensor([1], device=dev)
    pos = torch.tensor([position], device=dev)
    h = e.embed(tok)
    x = pair._fuse(h, pos)
    state = _rms(x, pair.norm, e.eps)
    full_lm = e.lm_head.weight
    scratch = torch.zeros(1, device=dev)
    head_step = pair._head_token_eager  # the head, argmax and id map of one draft (what fuse_head compiles)

    def target_step(t, p):
        return e.lm_head(e.norm(e.run_layers(e.embed(t), p, 0, e.num_layers))).argmax(-1)
    hk = e.run_layers(h, pos, 0, pair.k)
    out = {
        "launch": lambda: scratch.add_(1),
        "embed": lambda: e.embed(tok),
        "block": lambda: e.run_layers(h, pos, 0, 1),
    }
    if pair.deep:
        out["fuse"] = lambda: pair._fuse(h, pos)
    out["head_layer"] = lambda: pair._head_layer(x, pos, pos, e.mask(pos))
    out["head_tail"] = lambda: pair.vocab_map.index_select(
        0, torch.nn.functional.linear(_rms(x, pair.norm, e.eps), pair.lm_rows).float()[0].argmax(-1, keepdim=True))
    out[f"lm_rows_{pair.lm_rows.shape[0]}"] = lambda: torch.nn.functional.linear(state, pair.lm_rows)
    for n in (16384, full_lm.shape[0]):
        if n != pair.lm_rows.shape[0] and n <= full_lm.shape[0]:
            out[f"lm_rows_{n}"] = (lambda w: lambda: torch.nn.functional.linear(state, w))(full_lm[:n].contiguous())
    out["head_step"] = lambda: head_step(hk, pos)
    out["draft"] = lambda: head_step(pair._shallow(tok, pos), pos)
    out[f"round_{gamma}"] = lambda: pair._round(tok, pos, gamma)
    out["target_step"] = lambda: target_step(tok, pos)
    if fused:  # last: the whole target step's compilation is the slowest part of a run
        def whole(fn):
            return torch.compile(fn, fullgraph=True, dynamic=False, backend=fused)
        fused_head, fused_round, fused_target = whole(head_step), whole(pair._round), whole(target_step)
        out["head_step_fused"] = lambda: fused_head(hk, pos)
        out[f"round_{gamma}_fused"] = lambda: fused_round(tok, pos, gamma)
        out["target_step_fused"] = lambda: fused_target(tok, pos)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True, help="random:SHAPE (no weights) or a zoo id / folder with --self-spec")
    ap.add_argument("--self-spec", help="a self-spec drafter export (a real target)")
    ap.add_argument("--head", default=None, help="a head of the export (default: the export's default)")
    ap.add_argument("--context", default="deep", help="random target: the random head's context")
    ap.add_argument("--exit-layer", type=int, default=1, help="random target: the random head's depth")
    ap.add_argument("--vocab", type=int, default=32768, help="random target: the random head's trimmed vocabulary")
    ap.add_argument("--gamma", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=320, help="the engine's cache positions (the bench's: ~256-320)")
    ap.add_argument("--position", type=int, default=200, help="the row's position (a mid-generation draft)")
    ap.add_argument("--repeats", type=int, default=16, help="copies of a part in one graph")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fused", action="store_true",
                    help="also the head step, a round and a target step compiled whole (inductor with --compile, "
                         "else dynamo's eager backend)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if not 0 <= args.position < args.max_len - args.gamma:
        raise SystemExit(f"--position {args.position} must lie in [0, {args.max_len - args.gamma}) (--max-len "
                         f"{args.max_len} less --gamma {args.gamma})")
    device = resolve_device(args.device)
    model, head = _model_and_head(args, device)
    engine = target_engine(model, args.max_len, compile=args.compile)
    _, drafter = self_spec_pair(engine, head, compile=args.compile, fuse_head=False)  # round_G: the unfused head
    pair = drafter.pair
    k, full = head.exit_layer, model.lm_head.weight.shape[0]
    us: dict[str, float] = {}
    result = {"command": " ".join(sys.argv), "machine": versions(), "target": args.target,
              "exit_layer": k, "context": head.context, "vocab": int(pair.lm_rows.shape[0]),
              "layers": engine.num_layers, "gamma": args.gamma, "max_len": args.max_len, "position": args.position,
              "repeats": args.repeats, "replays": args.replays, "graphs": device.type == "cuda", "us": us}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        fused = ("inductor" if args.compile else "eager") if args.fused else None
        for name, fn in parts(pair, args.position, args.gamma, fused).items():
            t0 = time.perf_counter()
            per_copy = time_part(fn, device, args.repeats, args.replays)
            us[name] = round(per_copy / args.gamma if name.startswith("round_") else per_copy, 2)  # a round: per draft
            print(f"  {name}: {us[name]:.2f} us ({time.perf_counter() - t0:.0f} s with its warm-up)", flush=True)
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every part: a timeout keeps what ran
    step = us["target_step"]
    parts_sum = us["embed"] + k * us["block"] + us.get("fuse", 0.0) + us["head_layer"] + us["head_tail"]
    result.update({"of_target_step": {n: round(v / step, 4) for n, v in us.items()},
                   "draft_parts_sum_us": round(parts_sum, 2),
                   "target_per_block_us": round((step - us[f"lm_rows_{full}"]) / engine.num_layers, 2)})
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.target}: k {k}, {head.context} context, vocab {result['vocab']}, {engine.num_layers} blocks, "
          f"{'graphs' if result['graphs'] else 'eager, wall clock'}")
    for n, v in us.items():
        print(f"  {n:16s} {v:9.2f} us  {v / step:6.3f} of a target step")
    print(f"  parts of a draft, summed: {parts_sum:.2f} us ({parts_sum / step:.3f}); the draft whole "
          f"{us['draft']:.2f} us; a round's draft {us[f'round_{args.gamma}']:.2f} us")
    return result


if __name__ == "__main__":
    main()
