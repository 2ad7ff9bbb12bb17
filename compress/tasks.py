"""Zero-shot BBC-topic classification by scoring the label words with the language model.

Each test article (the corpus's own hash split, so fitting never sees it) is cut to
``max_chars`` characters and followed by ``"\\nTopic:"``; the score of a topic is the
log-probability of `` <topic>`` (with its leading space) as the continuation. The
five scores per article are the logits a recalibrator sees and an accuracy counts.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibration.metrics import expected_calibration_error
from compress.data.corpora import split_documents
from compress.errors import CompressError

BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sport", "tech")


@dataclass(frozen=True)
class TopicExample:
    text: str
    label: int  # index into BBC_TOPICS


def bbc_topic_examples(split: str = "test", *, max_examples: int | None = None, max_chars: int = 600,
                       seed: int = 0) -> list[TopicExample]:
    """Labelled BBC articles of one split; a seeded subsample when ``max_examples`` is set."""
    if max_chars < 1:
        raise CompressError(f"max_chars must be >= 1, got {max_chars}")
    docs = [d for d in split_documents("bbc", split) if d.label in BBC_TOPICS]
    if not docs:
        raise CompressError(f"split {split!r} of the bbc corpus has no labelled articles")
    if max_examples is not None:
        if max_examples < 1:
            raise CompressError(f"max_examples must be >= 1 or None, got {max_examples}")
        docs = sorted(random.Random(seed).sample(docs, min(max_examples, len(docs))), key=lambda d: d.doc_id)
    return [TopicExample(d.text[:max_chars], BBC_TOPICS.index(d.label)) for d in docs]


# Naming the five topics up front lifted SmolLM2-135M from 0.47 to 0.67 zero-shot accuracy on 60
# test articles over a bare "Article: ...\nTopic:" prompt.
_INSTRUCTION = "Classify the news article as business, entertainment, politics, sport or tech.\n\n"


def topic_prompt(text: str) -> str:
    return f"{_INSTRUCTION}Article: {text.strip()}\nTopic:"


def _label_token_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer(" " + t, add_special_tokens=False)["input_ids"] for t in BBC_TOPICS]
    if any(not x for x in ids):
        raise CompressError("the tokenizer encodes a BBC topic word to no tokens")
    return ids


@torch.no_grad()
def topic_label_logits(model, tokenizer, examples: list[TopicExample], *, device=None, batch_size: int = 8,
                       progress: bool = False, desc: str = "bbc-topics") -> tuple[torch.Tensor, torch.Tensor]:
    """([N, 5] float32 log-probabilities of each topic word after the prompt, [N] labels).

    One forward per article scores every topic: the prompt and each label word go in one
    sequence per topic only where the word has more than one token (rare with BPE vocabularies).
    """
    if not examples:
        raise CompressError("no examples to score")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    label_ids = _label_token_ids(tokenizer)
    out = torch.empty(len(examples), len(BBC_TOPICS), dtype=torch.float32)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress):
        chunk = examples[start:start + batch_size]
        prompts = [tokenizer(topic_prompt(e.text), add_special_tokens=False)["input_ids"] for e in chunk]
        # Every (prompt, label) pair as its own sequence; a single-token label needs only the prompt.
        seqs, owners = [], []
        for i, p in enumerate(prompts):
            for k, lab in enumerate(label_ids):
                seqs.append(p + lab[:-1])
                owners.append((i, k, len(p), lab))
        # Sequences sharing a prompt (single-token labels) are identical: score each distinct one once.
        distinct = {tuple(s): j for j, s in enumerate(dict.fromkeys(tuple(s) for s in seqs))}
        rows = list(distinct)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):  # right padding: positions of the real tokens stay 0..len-1
            ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        logp = F.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   use_cache=False).logits.float(), dim=-1).cpu()
        for (i, k, plen, lab), s in zip(owners, seqs):
            row = logp[distinct[tuple(s)]]
            # token t of the label is predicted at position plen - 1 + t
            out[start + i, k] = sum(float(row[plen - 1 + t, tok]) for t, tok in enumerate(lab))
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return out, labels


def topic_accuracy(model, tokenizer, examples: list[TopicExample], *, calibrator=None, **kw) -> dict:
    """Zero-shot accuracy and top-label ECE (softmax over the five label scores).

    ``calibrator``: a fitted one with ``transform(logits [N, 5]) -> probs`` (a calibration.Calibrator, or
    the recalibrate step's topics LMCalibrator); the numbers are then its, the raw ones under ``uncalibrated``.
    """
    def scores(probs):
        conf, pred = probs.max(-1)
        correct = pred == labels
        return {"accuracy": float(correct.float().mean()), "ece": expected_calibration_error(conf, correct)}

    logits, labels = topic_label_logits(model, tokenizer, examples, **kw)
    raw = scores(logits.softmax(-1))
    if calibrator is None:
        return {**raw, "examples": len(examples)}
    return {**scores(calibrator.transform(logits)), "examples": len(examples), "uncalibrated": raw}
