"""Self-distillation text: the target's own greedy continuations of corpus prompts (Medusa-2, EAGLE).

At decode time the exit head drafts continuations of the target's own greedy text, not of human
text; training on that text matches the decode-time distribution. A prompt is the first
``prompt_tokens`` of a corpus window, or text ending at a unit's end (both of one length, so batches
need no padding), or a unit alone (``units``: lengths differ; batches are padded on the left). The
target continues each greedily with its KV cache, one batch of prompts at a time, to a fixed length;
generation does not stop at EOS: rows stay rectangular, and ``continuation_mask`` leaves out what a
decoder that stops at EOS never sees.

Greedy decoding draws no random numbers: the sequences depend only on the prompts, the target's
weights and the batch split (fixed here), so a seed does not enter. (Batched and one-at-a-time
runs can differ where two logits tie to within float rounding; the tests use a confident target.)
"""
from __future__ import annotations

import ast
import io
import re
import textwrap

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from compress.errors import CompressError


def greedy_continuations(target, prompts: torch.Tensor, new_tokens: int, *, batch_size: int = 32,
                         progress: bool = True) -> torch.Tensor:
    """``prompts`` [N, P] -> [N, P + new_tokens] on the CPU: each prompt and its greedy continuation
    (``greedy_fill`` of prompts of one length: batches need no padding)."""
    if prompts.dim() != 2 or prompts.shape[0] == 0 or prompts.shape[1] == 0:
        raise CompressError(f"greedy continuations need a non-empty [N, P] batch of prompts, got {tuple(prompts.shape)}")
    if new_tokens < 1 or batch_size < 1:
        raise CompressError(f"new_tokens and batch_size must be >= 1, got {new_tokens} and {batch_size}")
    return greedy_fill(target, list(prompts), prompts.shape[1] + new_tokens, batch_size=batch_size,
                       progress=progress)[0]


def continuation_mask(seqs: torch.Tensor, prompt_tokens: int | torch.Tensor,
                      eos: set[int] = frozenset(), first: int | None = None) -> torch.Tensor:
    """[N, T] bool: the positions whose next-token prediction a decoder drafts — from the last prompt
    position (it predicts the first generated token) up to the one that predicts the first
    generated EOS; positions after an EOS are text a decoder that stops there never produces.
    ``prompt_tokens``: one length for every row, or each row's ([N], as ``greedy_fill`` returns).
    ``first``: only the positions predicting the first ``first`` generated tokens."""
    n, t = seqs.shape
    p = torch.as_tensor(prompt_tokens)
    shown = p.tolist()
    p = p.expand(n) if p.dim() == 0 else p
    if p.shape != (n,) or int(p.min()) < 1 or int(p.max()) >= t:
        raise CompressError(f"prompt_tokens must be in 1..{t - 1} for sequences of {t} tokens, one or one per row "
                            f"({n}), got {shown}")
    if first is not None and first < 1:
        raise CompressError(f"first must be >= 1 generated tokens, got {first}")
    pos = torch.arange(t)[None]
    mask = pos >= p[:, None] - 1
    if first is not None:
        mask &= pos < p[:, None] - 1 + first
    if eos:
        is_eos = torch.isin(seqs, torch.tensor(sorted(eos), dtype=seqs.dtype)) & (pos >= p[:, None])
        at = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full((n,), t))
        mask &= pos < at[:, None]  # position at−1 predicts the EOS: kept
    return mask


# Prompts that end where a user's prompt ends (``generation_prompts: unit_ends``). A prompt of the
# draft bench is a function's header and docstring, or an article's title and first paragraph; the
# first tokens of a corpus window end anywhere, mid-line and mid-word, and their continuations (often
# settling into repetition over 384 tokens) are easier to draft than a function body is.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]?$")


def _documented(text: str) -> list[tuple[ast.AST, int, int]] | None:
    """In Python source (a text that parses), each function and class with a docstring, as (node,
    character offset of its header line's start, character offset just after the docstring); None for
    any other text."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):  # not Python (or null bytes, or nested past the parser)
        return None
    # ast's lines end at \n, \r\n or \r only (str.splitlines also breaks at form feeds and others)
    lines = io.StringIO(text, newline="").readlines()
    starts = [0]  # character offset of each line
    for line in lines:
        starts.append(starts[-1] + len(line))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            doc = node.body[0]
            if (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str) and doc.end_lineno is not None):
                row = doc.end_lineno - 1  # end_col_offset counts UTF-8 bytes
                col = len(lines[row].encode()[:doc.end_col_offset].decode(errors="ignore"))
                out.append((node, starts[node.lineno - 1], starts[row] + col))  # lineno: the def line, not a decorator
    return out


def unit_ends(text: str) -> list[int]:
    """Character offsets in ``text`` where a unit ends and more text follows: in Python source (a text
    that parses), just after the docstring of each function and class; in any other text, the end of
    each paragraph (blank-line separated, ending a sentence) but the last."""
    documented = _documented(text)
    ends = []
    if documented is not None:
        ends = [end for _, _, end in documented]
    else:
        pos = 0
        for para in text.split("\n\n"):
            pos += len(para)
            if _SENTENCE_END.search(para.rstrip()) and pos < len(text.rstrip()):
                ends.append(pos - (len(para) - len(para.rstrip())))
            pos += 2
    return sorted(e for e in ends if 0 < e < len(text.rstrip()))


def units(text: str) -> list[str]:
    """Each unit of ``text`` alone, shaped as the draft bench's prompts are (``generation_prompts: units``):
    in Python source, each function's header and docstring, dedented, without the file around it; in other
    text (an article: a title line, then blank-line separated paragraphs), the title and the first paragraph
    on the next line."""
    documented = _documented(text)
    if documented is None:
        parts = [p.strip() for p in text.split("\n\n") if p.strip()]
        ok = len(parts) >= 3 and "\n" not in parts[0] and _SENTENCE_END.search(parts[1])  # more text follows
        return [parts[0] + "\n" + parts[1]] if ok else []
    return [textwrap.dedent(text[start:end]) for node, start, end in documented
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and end < len(text.rstrip())]


def unit_prompts(tokenizer, texts: list[str], max_tokens: int, count: int, *, min_tokens: int = 8,
                 seed: int = 0) -> list[torch.Tensor]:
    """Up to ``count`` of the texts' ``units``, chosen at random (``seed``), each tokenised alone as a
    prompt is: the ones of ``min_tokens`` to ``max_tokens`` tokens, so the prompts differ in length."""
    found = [u for text in texts for u in units(text)]
    order = torch.randperm(len(found), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for i in order:
        if len(out) == count:
            break
        ids = tokenizer(found[i], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if min_tokens <= len(ids) <= max_tokens:
            out.append(torch.tensor(ids, dtype=torch.long))
    if not out:
        raise CompressError(f"none of the {len(found)} units (a function's header and docstring, an article's title "
                            f"and first paragraph) in these {len(texts)} documents has {min_tokens} to {max_tokens} "
                            f"tokens; raise prompt_tokens or use generation_prompts: unit_ends")
    return out


@torch.no_grad()
def greedy_fill(target, prompts: list[torch.Tensor], length: int, *, batch_size: int = 32, pad_id: int = 0,
                progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths, each continued greedily to ``length`` tokens in all: ([N, length],
    the prompt lengths [N]). Batched with the prompts padded on the left and masked (the pad's id is
    never attended to), positions counted from each prompt's first token; prompts of similar length go
    together, so little is padded. A batch of one length runs unmasked, as a plain prompt does."""
    lens = torch.tensor([p.numel() for p in prompts])
    if not prompts or int(lens.min()) < 1 or int(lens.max()) >= length:
        raise CompressError(f"greedy_fill needs prompts of 1..{length - 1} tokens, got lengths "
                            f"{sorted(set(lens.tolist()))[:5]}... ({len(prompts)} prompts)")
    device = next(target.parameters()).device
    order = torch.argsort(lens, stable=True).tolist()
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    out = torch.empty(len(prompts), length, dtype=torch.long)
    bar = tqdm(total=sum(length - int(lens[idx].min()) for idx in batches), desc="generations", unit="step",
               disable=not progress)
    for idx in batches:
        width, shortest = int(lens[idx].max()), int(lens[idx].min())
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - lens[i]:] = prompts[i]
            mask[r, width - lens[i]:] = 1
        ids, mask = ids.to(device), mask.to(device)
        padded = shortest < width
        pos = (mask.cumsum(1) - 1).clamp(min=0) if padded else None
        cache = DynamicCache()
        logits = target(input_ids=ids, attention_mask=mask if padded else None, position_ids=pos,
                        past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        if not bool(torch.isfinite(logits).all()):  # a pad row's state must never reach a prompt's (e.g. NaN from
            # an attention row with every key masked, on stacks that do not guard it): its text would be garbage
            raise CompressError(f"greedy_fill: the target's logits for prompts of {shortest}..{width} tokens are "
                                f"not finite")
        new = [logits[:, -1].argmax(-1, keepdim=True)]
        nxt = pos[:, -1:] + 1 if padded else None
        for _ in range(length - shortest - 1):  # the shortest prompt needs the most
            if padded:
                mask = torch.cat([mask, torch.ones_like(new[-1])], 1)
            logits = target(input_ids=new[-1], attention_mask=mask if padded else None, position_ids=nxt,
                            past_key_values=cache, use_cache=True).logits
            new.append(logits[:, -1].argmax(-1, keepdim=True))
            nxt = nxt + 1 if padded else None
            bar.update(1)
        bar.update(1)
        gen = torch.cat(new, 1).cpu()
        for r, i in enumerate(idx):
            p = int(lens[i])
            out[i, :p] = prompts[i]
            out[i, p:] = gen[r, :length - p]
        del cache
    bar.close()
    return out, lens


def unit_end_prompts(tokenizer, texts: list[str], prompt_tokens: int, count: int, *, seed: int = 0) -> torch.Tensor:
    """[n, prompt_tokens]: up to ``count`` prompts, each the last ``prompt_tokens`` tokens of a text's
    prefix ending at one of its ``unit_ends`` (tokenised alone, as a prompt is), chosen at random
    (``seed``) among the ends with that many tokens before them."""
    ends = [(t, e) for t, text in enumerate(texts) for e in unit_ends(text)]
    order = torch.randperm(len(ends), generator=torch.Generator().manual_seed(seed)).tolist()
    out = []
    for i in order:
        if len(out) == count:
            break
        t, e = ends[i]
        # a bounded stretch before the end (16 characters a token is more than a tokenizer averages), so a
        # long document is not tokenised once per end
        ids = tokenizer(texts[t][max(0, e - 16 * prompt_tokens):e], add_special_tokens=False,
                        return_attention_mask=False)["input_ids"]
        if len(ids) > prompt_tokens:  # more than asked: the stretch's first token may be a cut word
            out.append(ids[-prompt_tokens:])
    if not out:
        raise CompressError(f"no unit end (a docstring's or a paragraph's) has {prompt_tokens} tokens before it "
                            f"in these {len(texts)} documents; shorten prompt_tokens or use generation_prompts: "
                            f"window_starts")
    return torch.tensor(out, dtype=torch.long)
