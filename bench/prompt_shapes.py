"""Which held-out text predicts the draft bench? A training-free probe of the three kinds of prompt (issue 14).

The self-drafter's held-out curve (greedy continuations of window-start prompts) said 0.80 agreement at k1
while the bench's code prompts gave α 0.53. This asks, on a real target and without a trained head, whether
the kind of prompt explains the gap: for each kind the target continues the prompts greedily, then a
training-free drafter — the target's own early exit read through its final norm and LM head (the logit
lens) at a few depths — is scored, teacher-forced, on the continuation positions: greedy agreement with the
target. Also the share of continuation tokens that close a 4-gram seen earlier in the same sequence (easy
repeats). Kinds, per corpus and its bench prompt file:
  window_starts  the first P tokens of validation windows (what the recipe's held-out generations use)
  unit_ends      P tokens ending after a docstring or a paragraph (generation_prompts: unit_ends)
  units          a function's header and docstring alone, an article's title and first paragraph, up to P
                 tokens (generation_prompts: units)
  bench          the draft bench's own prompts (bench/draft_bench_prompts/), each alone

    python bench/prompt_shapes.py --model qwen2.5-coder-0.5b --out bench/results/draft/prompt-shapes-cpu.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from compress.draft.agreement import read_prompts
from compress.draft.selfspec.generations import greedy_continuations, unit_end_prompts, unit_prompts
from compress.draft.selfspec.step import _documents, _prompt_lines, _windows
from compress.models import load_model
from compress.runtime import versions

PAIRS = {"stdlib": "bench/draft_bench_prompts/code.txt", "bbc": "bench/draft_bench_prompts/prose.txt"}


@torch.no_grad()
def probe(model, seqs: list[torch.Tensor], prompt_lens: list[int], depths: list[int]) -> dict:
    """Per depth: greedy agreement of the logit lens with the target on the continuation positions; and the
    share of continuation tokens closing a 4-gram seen before in their sequence."""
    hits = {d: 0 for d in depths}
    n = repeats = 0
    per_seq = []  # each sequence's own repeat share: a mean over 8 prompts can be one degenerate continuation
    for seq, p in zip(seqs, prompt_lens):
        out = model(input_ids=seq[None], output_hidden_states=True, use_cache=False)
        target = out.logits[0, p - 1:-1].argmax(-1)
        for d in depths:
            lens = model.lm_head(model.model.norm(out.hidden_states[d][0, p - 1:-1]))
            hits[d] += int((lens.argmax(-1) == target).sum())
        n += target.numel()
        ids = seq.tolist()
        seen = {tuple(ids[i - 3:i + 1]) for i in range(3, p)}
        mine = 0
        for i in range(p, len(ids)):
            gram = tuple(ids[i - 3:i + 1])
            mine += gram in seen
            seen.add(gram)
        repeats += mine
        per_seq.append(round(mine / max(1, len(ids) - p), 3))
    return {"positions": n, "repeat_4gram_share": round(repeats / n, 4),
            "repeat_4gram_share_per_sequence": per_seq,
            "lens_agreement": {str(d): round(hits[d] / n, 4) for d in depths}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per kind and corpus")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128, help="as the draft bench generates")
    ap.add_argument("--depths", default="", help="comma-separated exit depths (default: L/4, L/2, 3L/4)")
    ap.add_argument("--corpora", default=",".join(PAIRS), help=f"comma-separated, among {', '.join(PAIRS)}")
    ap.add_argument("--kinds", default="window_starts,unit_ends,units,bench", help="comma-separated kinds to run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    unknown = set(args.kinds.split(",")) - {"window_starts", "unit_ends", "units", "bench"}
    if unknown:
        ap.error(f"--kinds: unknown {sorted(unknown)}; among window_starts, unit_ends, units, bench")
    loaded = load_model(args.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    layers = model.config.num_hidden_layers
    depths = [int(d) for d in args.depths.split(",")] if args.depths else [layers // 4, layers // 2, 3 * layers // 4]
    exclude = _prompt_lines(list(PAIRS.values()))
    results, start = {}, time.perf_counter()
    for corpus in args.corpora.split(","):
        bench_file, p = PAIRS[corpus], args.prompt_tokens
        wanted = args.kinds.split(",")
        texts = _documents(corpus, "validation", exclude)[0]
        kinds = {}  # kind -> prompts of one length ([N, P]) or each alone (a list of [1, P_i])
        if "window_starts" in wanted:
            kinds["window_starts"] = _windows(tok, [corpus], "validation", p + args.new_tokens, args.prompts,
                                              exclude)[0][:, :p]
        if "unit_ends" in wanted:
            kinds["unit_ends"] = unit_end_prompts(tok, texts, p, args.prompts)
        if "units" in wanted:
            kinds["units"] = [u[None] for u in unit_prompts(tok, texts, p, args.prompts)]
        if "bench" in wanted:
            kinds["bench"] = [torch.tensor(tok(t)["input_ids"])[None] for t in read_prompts(bench_file, args.prompts)]
        for kind, prompts in kinds.items():
            if isinstance(prompts, torch.Tensor):
                seqs = list(greedy_continuations(model, prompts, args.new_tokens, batch_size=args.prompts,
                                                 progress=False))
                lens = [p] * len(seqs)
            else:
                seqs = [greedy_continuations(model, b, args.new_tokens, batch_size=1, progress=False)[0]
                        for b in prompts]
                lens = [b.shape[1] for b in prompts]
            results[f"{corpus}/{kind}"] = probe(model, seqs, lens, depths)
            print(corpus, kind, results[f"{corpus}/{kind}"], flush=True)
    report = {"model": args.model, "layers": layers, "depths": depths, "prompts_per_kind": args.prompts,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "results": results,
              "seconds": round(time.perf_counter() - start, 1),
              "machine": {**versions(), "torch_threads": torch.get_num_threads()},
              "command": "python bench/prompt_shapes.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v not in ("", None))}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
