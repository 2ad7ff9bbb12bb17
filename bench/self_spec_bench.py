"""The side-by-side drafter run (issue 14): one process, one target, every drafter, both prompt sets.

    python bench/self_spec_bench.py --summarise RESULTS.json     # the markdown table of a results file
    python bench/self_spec_bench.py --target qwen2.5-coder-1.5b --stock qwen2.5-coder-0.5b \
        --stock-w4 OUT/q05-w4 --self-spec OUT/self-spec --prompts bench/draft_bench_prompts/code.txt \
        bench/draft_bench_prompts/prose.txt --gamma 4 --device cuda --dtype bfloat16 --compile \
        --hf-assisted --out results.json

Rows per prompt set (compress/draft/bench.py says what each number is):
- ``target alone``: the compiled target on our block engine, one-row steps — every speedup's
  denominator — and its matched references (the same through a verify pass's kernels);
- ``hf assisted``: transformers' assisted generation with the stock drafter, its defaults;
- ``stock bf16`` / ``stock W4``: our loop with the stock 0.5B (block engine; W4 on the int4 kernel
  through its own forward), ``old self-drafter``: a width-pruned GPTQ export if given;
- ``self <head>``: the shared-prefix self-drafter's heads (fixed γ), and the default head with the
  export's calibrated confidence threshold; ``--untrimmed`` adds the default head over the whole
  vocabulary (the same trained weights: the trim's effect alone), ``--also-gamma G`` rows of that head at
  other draft lengths; with ``--tree``, each head drafting a static tree
  (several candidates per position, one verify pass: compress/draft/selfspec/tree.py).
The target's engine, its compiled steps and recorded graphs are built once and shared by every row;
results are written after every row, so a cut run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.draft.agreement import read_prompts  # noqa: E402
from compress.draft.bench import (hf_static_generate, spec_row, teacher_forced, time_speculative,  # noqa: E402
                                  time_target, warm_prefills, warm_up)
from compress.draft.decoders import cache_len, model_decoder, self_spec_pair, target_engine  # noqa: E402
from compress.draft.engine import EngineDecoder  # noqa: E402
from compress.draft.selfspec.head import HeadAsModel  # noqa: E402
from compress.draft.selfspec.step import load_self_spec  # noqa: E402
from compress.draft.selfspec.tree import as_tree  # noqa: E402
from compress.models import load_model  # noqa: E402
from compress.pipeline import resolve_device, versions  # noqa: E402


def _row(name, spec, alone, matched, gamma, extra=None):
    row = spec_row(spec, alone, matched, gamma)
    per_prompt = row.pop("per_prompt")
    return {"row": name, **(extra or {}), **row, "first_divergence": [r["first_divergence"] for r in per_prompt]}


def _say(set_name: str, row: dict, n: int) -> None:
    print(f"[{set_name}] {row['row']}: {row['speculative']['tokens_per_s']:.1f} tok/s x{row['speedup']:.2f} "
          f"tau {row['speculative']['tau']:.2f} c {row['c']:.3f} v {row['verify_cost_ratio']:.2f} "
          f"book {row['time_split']['bookkeeping']:.3f} identical {row['identical_prompts']}/{n}", flush=True)


def summarise(path) -> str:
    """A markdown table per prompt set from a results file. Speedups are taken against the FASTER of
    the two target-alone runs (one-row steps, and the matched (γ+1)-row reference), so a one-time
    cost that lands in one of them cannot inflate them; ``decode`` is the decode-only ratio (prefill
    excluded): tokens / (wall − prefill) of the speculative run × the target-alone step time."""
    r = json.loads(Path(path).read_text())
    lines = []
    for name, data in r["sets"].items():
        alone = data["rows"][0]
        base = max(alone["tokens_per_s"], alone["matched_tokens_per_s"])
        lines += [f"{name} ({data['prompts']} prompts x {r['max_new_tokens']} tokens, γ = {r['gamma']}): target alone "
                  f"{base:.1f} tok/s (step {alone['step_ms']:.3f} ms)", "",
                  "| drafter | tok/s | speedup | decode | τ | α | agreement | c | verify/step | bookkeeping | "
                  "identical (matched) | identical (1-row) |", "|" + "---|" * 12]
        for row in data["rows"][1:]:
            if "speculative" not in row:
                lines.append(f"| {row['row']} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base:.2f}x | | | | | | | | "
                             f"| {row.get('identical_to_fast_prompts')}/{data['prompts']} |")
                continue
            sp, n = row["speculative"], data["prompts"]
            f3 = lambda key: "" if row.get(key) is None else f"{row[key]:.3f}"  # noqa: E731 - tree rows: not teacher-forced
            decode = sp["new_tokens"] / (sp["wall_s"] - sp["prefill_s"]) * alone["step_ms"] / 1e3
            lines.append(f"| {row['row']} | {sp['tokens_per_s']:.1f} | {sp['tokens_per_s'] / base:.2f}x | {decode:.2f}x | "
                         f"{sp['tau']:.2f} | {f3('alpha')} | {f3('greedy_agreement')} | {row['c']:.3f} | "
                         f"{row['verify_cost_ratio']:.2f} | {row['time_split']['bookkeeping']:.1%} | "
                         f"{row['identical_prompts']}/{n} | {row['identical_to_fast_prompts']}/{n} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--summarise":
        print(summarise(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--stock", help="a stock drafter (zoo id / folder), run in bf16 on the block engine")
    ap.add_argument("--stock-w4", help="a GPTQ W4 export of the stock drafter (int4 kernel)")
    ap.add_argument("--old-self", help="a width-pruned GPTQ self-drafter export (int4 kernel)")
    ap.add_argument("--self-spec", help="a self-spec drafter export")
    ap.add_argument("--heads", default=None, help="comma-separated heads of the export (default: all)")
    ap.add_argument("--untrimmed", action="store_true",
                    help="also the default head over the target's whole vocabulary (the same trained head)")
    ap.add_argument("--fuse-head", action="store_true",
                    help="also the default head with its rounds' head step compiled as one program (SelfSpecPair's "
                         "fuse_head, the library's default under compile on a GPU; needs --compile): a row beside "
                         "the plain one, the same weights. The plain rows keep the unfused step, as every window "
                         "before h100-selfspec-five-h ran it")
    ap.add_argument("--prompts", nargs="+", required=True)
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--also-gamma", type=int, action="append", default=[],
                    help="more draft lengths for the export's default head, or the first of --heads without it "
                         "(linear rows, no stop); repeatable")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1,
                    help="time every prompt this many times per row and keep the median run (damps jitter)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--hf-assisted", action="store_true")
    ap.add_argument("--tree", action="append", default=[],
                    help='add tree-drafting rows for every head: "default" (compress/draft/selfspec/tree.py) or '
                         'a JSON list of rank paths, e.g. "[[0],[1],[0,0]]"; repeat for several trees')
    ap.add_argument("--out", required=True, help="JSON file, rewritten after every row")
    args = ap.parse_args(argv)
    if args.fuse_head and not (args.compile and args.self_spec):
        ap.error("--fuse-head needs --compile and --self-spec (it compiles the export's default head's step)")

    device, gamma, n_new, reps = resolve_device(args.device), args.gamma, args.max_new_tokens, args.repeats
    t0 = time.perf_counter()
    t = load_model(args.target, dtype=args.dtype, device=device)
    sets = {Path(p).stem: [torch.tensor(t.tokenizer(x, return_attention_mask=False)["input_ids"])
                           for x in read_prompts(p, args.max_prompts)] for p in args.prompts}
    trees = [as_tree(v if v == "default" else json.loads(v)) for v in args.tree]
    # the trees' scratch slots sit past every sequence's end
    max_len = cache_len([p.numel() for s in sets.values() for p in s], n_new,
                        max([gamma, *args.also_gamma]) + max((tree.size for tree in trees), default=0))
    engine = target_engine(t.model, max_len, compile=args.compile)
    target = EngineDecoder(engine, graphs=args.compile and device.type == "cuda", name="target")
    result = {"command": " ".join(sys.argv), "machine": {**versions(), "torch_threads": torch.get_num_threads()},
              "gamma": gamma, "max_new_tokens": n_new, "repeats": reps, "sets": {}}
    out = Path(args.out)

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")

    heads, trained, base = {}, [], None  # trained: the export's heads, without the untrimmed variant
    if args.self_spec:
        manifest = json.loads((Path(args.self_spec) / "self_spec.json").read_text())
        names = args.heads.split(",") if args.heads else list(manifest["heads"])
        for name in names:
            head, _, cal = load_self_spec(args.self_spec, t.model, name)
            heads[name] = (head, cal)
        trained = list(names)
        base = manifest["default"] if manifest["default"] in heads else names[0]  # the head of the variants
        if args.untrimmed:  # vocabulary trim's effect alone: the same weights, every LM row
            head, cal = heads[base]
            full = head.with_vocabulary(t.model, torch.arange(t.model.lm_head.weight.shape[0]))
            heads[f"{base} untrimmed"] = (full, cal)
        if args.fuse_head:  # what fusing the head step's small kernels saves: the same head, another program
            heads[f"{base} fused head"] = heads[base]
        result["self_spec"] = {k: manifest[k] for k in ("default", "gamma", "confidence_threshold", "stop",
                                                          "training", "depth_curve")}
    stock = load_model(args.stock, dtype=args.dtype, device=device).model if args.stock else None
    w4 = old = None
    if args.stock_w4 or args.old_self:
        from compress.quantize.int4 import int4_linears_from_gptq
        if args.stock_w4:
            w4 = load_model(args.stock_w4, dtype=args.dtype, device=device)
            int4_linears_from_gptq(w4.model, w4.path)
        if args.old_self:
            old = load_model(args.old_self, dtype=args.dtype, device=device)
            int4_linears_from_gptq(old.model, old.path)
    result["load_s"] = round(time.perf_counter() - t0, 1)

    pairs = {}
    for name, (head, cal) in heads.items():
        pairs[name] = self_spec_pair(engine, head, compile=args.compile, fuse_head=name.endswith(" fused head")) + \
            (HeadAsModel(t.model, head), cal)
    # trees for the trained heads only: the trim's effect is measured on linear rounds
    tree_pairs = {(name, i): (tree, *self_spec_pair(engine, heads[name][0], compile=args.compile, tree=tree))
                  for i, tree in enumerate(trees) for name in trained}
    models = {}
    if stock is not None:
        models["stock bf16"] = (model_decoder(stock, max_len, compile=args.compile, name="stock"), stock)
    if w4 is not None:
        models["stock W4"] = (model_decoder(w4.model, max_len, compile=args.compile, name="stock-w4"), w4.model)
    if old is not None:
        models["old self-drafter W4"] = (model_decoder(old.model, max_len, compile=args.compile, name="old"), old.model)

    for set_name, prompts in sets.items():
        prompts = [p.to(device) for p in prompts]
        rows = []
        result["sets"][set_name] = {"prompts": len(prompts), "rows": rows}
        run_target_warm = lambda dec, pad=None: time_target(dec, prompts[:1], 4, pad_to=pad)  # noqa: E731
        run_target_warm(target)
        warm_prefills(target, prompts)
        alone = time_target(target, prompts, n_new, repeats=reps)
        run_target_warm(target, gamma + 1)
        matched_full = time_target(target, prompts, n_new, pad_to=gamma + 1, repeats=reps)
        rows.append({"row": "target alone", "tokens_per_s": alone["tokens_per_s"], "step_ms": alone["step_ms"],
                     "wall_s": alone["wall_s"], "prefill_s": alone["prefill_s"],
                     "matched_tokens_per_s": matched_full["tokens_per_s"], "matched_step_ms": matched_full["step_ms"],
                     "matched_identical_to_fast": sum(a.tokens.tolist() == b.tokens.tolist()
                                                      for a, b in zip(alone["runs"], matched_full["runs"]))})
        save()
        print(f"[{set_name}] target alone {alone['tokens_per_s']:.1f} tok/s, step {alone['step_ms']:.3f} ms", flush=True)
        outputs = [r.tokens for r in alone["runs"]]
        for name, (tdec, ddec, teacher, cal) in pairs.items():
            default = name == result["self_spec"]["default"]
            stop_at = result["self_spec"]["confidence_threshold"]
            variants = [(None, gamma)] + ([(stop_at, gamma)] if default and stop_at is not None else [])
            variants += [(None, g) for g in args.also_gamma if name == base and g != gamma]
            for threshold, g in variants:
                kw = dict(confidence_threshold=threshold, calibrator=cal if threshold is not None else None,
                          pad_verify=True)
                warm_up(tdec, ddec, prompts[0], g, **kw)
                warm_prefills(tdec, prompts, ddec)
                run_target_warm(tdec, g + 1)
                matched = time_target(tdec, prompts, n_new, pad_to=g + 1, repeats=reps)
                before, fused = dict(ddec.pair.shallow_total), ddec.rounds_fused
                spec = time_speculative(tdec, ddec, prompts, n_new, g, repeats=reps, **kw)
                label = f"self {name}" + ("" if threshold is None else f" stop@{threshold}") + \
                    ("" if g == gamma else f" gamma={g}")
                row = _row(label, spec, alone, matched, g, {"exit_layer": heads[name][0].exit_layer,
                                                            "vocab_size": heads[name][0].vocab_size, "threshold": threshold,
                                                            "shallow_rows": {k: v - before[k] for k, v in
                                                                             ddec.pair.shallow_total.items()},
                                                            "fused_rounds": ddec.rounds_fused - fused})
                row.update(teacher_forced(t.model, teacher, prompts, outputs, g))
                rows.append(row)
                save()
                _say(set_name, row, len(prompts))
        for (name, _), (tree, tdec, ddec) in tree_pairs.items():
            kw = dict(tree=True)
            warm_up(tdec, ddec, prompts[0], tree.max_depth, **kw)
            warm_prefills(tdec, prompts, ddec)
            run_target_warm(tdec, tree.size + 1)
            matched = time_target(tdec, prompts, n_new, pad_to=tree.size + 1, repeats=reps)
            spec = time_speculative(tdec, ddec, prompts, n_new, tree.max_depth, repeats=reps, **kw)
            row = _row(f"self {name} tree ({tree.size} nodes, depth {tree.max_depth})", spec, alone, matched,
                       tree.max_depth, {"exit_layer": heads[name][0].exit_layer, "tree": [list(c) for c in tree.choices],
                                        "vocab_size": heads[name][0].vocab_size})
            rows.append(row)
            save()
            _say(set_name, row, len(prompts))
        for name, (ddec, dmodel) in models.items():
            kw = dict(pad_verify=True)
            warm_up(target, ddec, prompts[0], gamma, **kw)
            warm_prefills(target, prompts, ddec)
            spec = time_speculative(target, ddec, prompts, n_new, gamma, repeats=reps, **kw)
            row = _row(f"{name} (our loop)", spec, alone, matched_full, gamma)
            row.update(teacher_forced(t.model, dmodel, prompts, outputs, gamma))
            rows.append(row)
            save()
            _say(set_name, row, len(prompts))
        if args.hf_assisted and stock is not None:
            hf = hf_static_generate(t.model, prompts, n_new, assistant=stock)
            rows.append({"row": "hf assisted (stock bf16, transformers defaults)", "tokens_per_s": hf["tokens_per_s"],
                         "speedup": hf["tokens_per_s"] / alone["tokens_per_s"],
                         "identical_to_fast_prompts": sum(o == r.tokens.tolist() for o, r in zip(hf["outputs"], alone["runs"]))})
            save()
            print(f"[{set_name}] hf assisted: {hf['tokens_per_s']:.1f} tok/s x{rows[-1]['speedup']:.2f}", flush=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
