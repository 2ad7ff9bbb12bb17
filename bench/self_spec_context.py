"""Shallow vs deep-context exit heads at the same depth, trained together on the same batches.

    python bench/self_spec_context.py --model smollm2-135m --exit-layer 2 --steps 300 \
        --out bench/results/draft/context-smollm2-cpu.json [--device cuda --dtype bfloat16] [--mid-depth M]

Both heads read h_k after block k; the deep one also reads the target's final state of the previous
position (compress/draft/selfspec/head.py). One target forward per batch serves both (distill_heads),
so the two differ only in what they read. Held-out: validation windows of the same corpora; every
draft of a round scored (per-draft agreement, τ(γ) by a round-by-round replay, the predicted speedup
τ / (v + γ·c) of train.py's cost model). A CPU run here says which head agrees more; the speed
question needs the GPU (compress draft-bench). ``--mid-depth M`` adds a third head, deep and also reading
the target's state after block M of the previous position (``ExitHead(mid_layer=M)``); ``--also-deep 0,1``
deep heads at other depths (0: the drafter shares no block, as EAGLE's head); ``--inits last,next`` each head
twice, started as the target's last block and as its block k; ``--lm-rows frozen,trained`` each head twice, with
the target's trimmed LM rows and with its own trained copy of them.
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
from compress.draft.selfspec.train import distill_heads, head_events, summarise_heads  # noqa: E402
from compress.models import load_model  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--exit-layer", type=int, default=2)
    ap.add_argument("--corpora", default="stdlib,bbc")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--train-windows", type=int, default=256, help="per corpus")
    ap.add_argument("--eval-windows", type=int, default=16, help="per corpus")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--unroll", type=int, default=3)
    ap.add_argument("--gammas", default="1,2,3,4")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mid-depth", type=int, default=None, help="add a deep head that also reads block M's state")
    ap.add_argument("--no-shallow", action="store_true", help="leave the shallow head out (deep against mid)")
    ap.add_argument("--also-deep", default="", help="deep heads at these depths too (comma-separated; 0: no shared "
                                                     "block, the head reads the token's embedding)")
    ap.add_argument("--inits", default="last", help="the block each head starts as, comma-separated (last, next: "
                                                     "block k); with two, every head is trained once per init")
    ap.add_argument("--lm-rows", default="frozen", help="each head once per entry, comma-separated (frozen, trained: "
                    "its trimmed LM rows trained with it, ExitHead(lm_rows=...))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = args.lm_rows.split(",")
    bad = sorted(set(rows) - {"frozen", "trained"})
    if bad:  # before the model loads
        ap.error(f"--lm-rows: {', '.join(bad)}: each entry is frozen or trained")
    torch.manual_seed(args.seed)
    loaded = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    model, tok = loaded.model, loaded.tokenizer
    model.requires_grad_(False)
    corpora = args.corpora.split(",")
    train, _ = _windows(tok, corpora, "train", args.seq_len, args.train_windows)
    held, _ = _windows(tok, corpora, "validation", args.seq_len, args.eval_windows)
    lm_rows = model.lm_head.weight.shape[0]
    vocab = trimmed_vocabulary(train.tolist(), args.vocab_size, vocab_size=lm_rows, always=eos_ids(model))
    k = args.exit_layer
    specs = {} if args.no_shallow else {f"shallow-k{k}": (k, vocab, "shallow")}
    specs[f"deep-k{k}"] = (k, vocab, "deep")
    specs.update({f"deep-k{d}": (d, vocab, "deep") for d in (int(x) for x in args.also_deep.split(",") if x)})
    if args.mid_depth is not None:
        specs[f"mid{args.mid_depth}-k{k}"] = (k, vocab, "deep", args.mid_depth)
    inits = args.inits.split(",")
    specs = {(n if len(inits) == 1 else f"{n}-{init}") + ("" if len(rows) == 1 else f"-rows-{r}"):
             (*spec, *(None,) * (4 - len(spec)), init, r)
             for r in rows for init in inits for n, spec in specs.items()}
    t0 = time.perf_counter()
    heads, history = distill_heads(model, train, specs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed, unroll=args.unroll)
    gammas = [int(g) for g in args.gammas.split(",")]
    events = head_events(model, heads, held, steps=max(gammas))
    curve = summarise_heads(events, heads, model.config.num_hidden_layers, gammas)
    out = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]), "args": vars(args),
           "training": history, "held_out_windows": int(held.shape[0]), "train_windows": int(train.shape[0]),
           "seconds": round(time.perf_counter() - t0, 1),
           "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "device": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")},
           "heads": {n: {key: c[key] for key in ("context", "greedy_agreement", "greedy_agreement_by_draft", "alpha",
                                                 "tau", "predicted_speedup", "best_gamma") if key in c}
                     for n, c in curve.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for n, c in out["heads"].items():
        print(n, "agreement", round(c["greedy_agreement"], 3), "by draft",
              [round(a, 3) for a in c.get("greedy_agreement_by_draft", [])],
              "tau", {g: round(t, 2) for g, t in c["tau"].items()}, flush=True)
    return out


if __name__ == "__main__":
    main()
