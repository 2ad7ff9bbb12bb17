"""Fine-tuning data as ``datasets.Dataset`` rows of ``input_ids`` and ``labels`` (-100 = no loss).

Two offline tasks:

* ``topic_dataset``: BBC-style topic classification as instruction data. The prompt is
  ``compress.tasks.topic_prompt(article[:max_chars])`` (the exact text the zero-shot
  evaluation scores), the answer is `` <topic>`` plus eos. Only the answer tokens carry a
  label. Prompt and answer are tokenized separately, as ``topic_label_logits`` does, so
  training and evaluation see the same token boundary.
* ``lm_dataset``: causal-LM adaptation on a corpus (e.g. ``stdlib`` code): non-overlapping
  windows of ``max_len`` tokens, every token labelled.

Both read one split of a corpus through ``compress.data.corpora`` (its seeded 80/10/10 hash
split), so the train and test splits never share a document.
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Iterator

import datasets
import pyarrow as pa
import torch
from datasets.table import InMemoryTable

from compress.data.corpora import split_documents
from compress.errors import CompressError
from compress.tasks import BBC_TOPICS, topic_prompt

IGNORE = -100  # labels of tokens that carry no loss (prompt, padding)
TASKS = ("bbc_topics", "lm")


def _split_docs(corpus: str, split: str):
    if split == "test":
        # The test split is what verify.topics / the benchmark score; training on it would leak.
        raise CompressError(f"fine-tuning data comes from the train or validation split, not {split!r}")
    return split_documents(corpus, split)


def topic_pairs(corpus: str = "bbc", split: str = "train", *, max_examples: int | None = None,
                max_chars: int = 600, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of labelled documents; every document must have a topic label."""
    if max_chars < 1:
        raise CompressError(f"max_chars must be >= 1, got {max_chars}")
    docs = _split_docs(corpus, split)
    if not docs:
        raise CompressError(f"split {split!r} of corpus {corpus!r} is empty: no training examples")
    unlabelled = [d.doc_id for d in docs if not d.label]
    if unlabelled:
        raise CompressError(
            f"corpus {corpus!r} ({split}): {len(unlabelled)} of {len(docs)} documents have no label "
            f"(e.g. {unlabelled[0]!r}); the topic task needs a 'label' per document "
            f"(one of {', '.join(BBC_TOPICS)}; in a .jsonl file a 'label' field per line)")
    unknown = sorted({d.label for d in docs} - set(BBC_TOPICS))
    if unknown:
        raise CompressError(f"corpus {corpus!r} ({split}): unknown topic labels {unknown[:5]}; "
                            f"allowed: {', '.join(BBC_TOPICS)}")
    if max_examples is not None:
        if max_examples < 1:
            raise CompressError(f"max_examples must be >= 1 or None, got {max_examples}")
        docs = sorted(random.Random(seed).sample(docs, min(max_examples, len(docs))), key=lambda d: d.doc_id)
    return [(topic_prompt(d.text[:max_chars]), " " + d.label) for d in docs]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _fit_prompt(tokenizer, prompt: str, answer_len: int, max_len: int) -> list[int]:
    """Prompt ids such that prompt + answer <= max_len, shortening the article (the prompt's
    instruction and its closing "Topic:" stay, so the answer position looks as at test time)."""
    ids = _ids(tokenizer, prompt)
    if len(ids) + answer_len <= max_len:
        return ids
    head, _, rest = prompt.partition("Article: ")
    article, _, tail = rest.rpartition("\nTopic:")
    keep = len(article)
    while keep > 0:  # a few rounds: shrink the article by the overshoot's share
        keep = int(keep * (max_len - answer_len) / (len(ids) + answer_len)) - 1
        ids = _ids(tokenizer, f"{head}Article: {article[:max(keep, 0)].strip()}\nTopic:{tail}")
        if len(ids) + answer_len <= max_len:
            return ids
    raise CompressError(f"max_len={max_len} is too short for the topic prompt's instruction "
                        f"({len(ids)} tokens) plus the answer ({answer_len}); use a larger max_len")


def _token_dataset(rows: dict[str, list[list[int]]]) -> datasets.Dataset:
    """An in-memory Dataset of token-id columns with a fingerprint we compute (sha256 of the ids).

    ``Dataset.from_dict`` fingerprints by pickling the Arrow table with dill, which fails on some
    Python 3.12 stacks (PicklingError on pyarrow's MonthDayNano, seen on the GPU machine)."""
    digest = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]
    table = InMemoryTable(pa.Table.from_pydict({k: pa.array(v, type=pa.list_(pa.int64())) for k, v in rows.items()}))
    return datasets.Dataset(table, fingerprint=digest)


def instruction_dataset(tokenizer, pairs: list[tuple[str, str]], *, max_len: int = 256,
                        add_eos: bool = True) -> datasets.Dataset:
    """Rows of prompt + answer token ids; labels are the answer ids, -100 on the prompt."""
    if not pairs:
        raise CompressError("the instruction dataset is empty: no (prompt, answer) pairs")
    eos = tokenizer.eos_token_id if add_eos else None
    rows = {"input_ids": [], "labels": []}
    for prompt, answer in pairs:
        if not answer:
            raise CompressError(f"an example has an empty answer (prompt {prompt[:60]!r}...): missing label")
        answer_ids = _ids(tokenizer, answer) + ([eos] if eos is not None else [])
        prompt_ids = _fit_prompt(tokenizer, prompt, len(answer_ids), max_len)
        rows["input_ids"].append(prompt_ids + answer_ids)
        rows["labels"].append([IGNORE] * len(prompt_ids) + answer_ids)
    return _token_dataset(rows)


def topic_dataset(tokenizer, corpus: str = "bbc", split: str = "train", *, max_len: int = 256,
                  max_examples: int | None = None, max_chars: int = 600, seed: int = 0) -> datasets.Dataset:
    """Topic classification as instruction data (see the module docstring)."""
    pairs = topic_pairs(corpus, split, max_examples=max_examples, max_chars=max_chars, seed=seed)
    return instruction_dataset(tokenizer, pairs, max_len=max_len)


def lm_dataset(tokenizer, corpus: str, split: str = "train", *, max_len: int = 256,
               max_examples: int | None = None) -> datasets.Dataset:
    """Non-overlapping ``max_len``-token windows of the split's text (documents joined by blank
    lines); every token is labelled. ``max_examples`` caps the number of windows."""
    if max_len < 2:
        raise CompressError(f"max_len must be >= 2 for language modelling, got {max_len}")
    docs = _split_docs(corpus, split)
    text = "\n\n".join(d.text for d in docs)
    ids = _ids(tokenizer, text) if text else []
    n = len(ids) // max_len
    if max_examples is not None:
        n = min(n, max_examples)
    if n == 0:
        raise CompressError(f"split {split!r} of corpus {corpus!r} has {len(ids)} tokens, fewer than one "
                            f"window of max_len={max_len}: the language-modelling dataset is empty")
    windows = [ids[i * max_len:(i + 1) * max_len] for i in range(n)]
    return _token_dataset({"input_ids": windows, "labels": [list(w) for w in windows]})


def check_dataset(dataset: datasets.Dataset) -> None:
    """Fail early on data the loop cannot learn from."""
    if dataset is None or len(dataset) == 0:
        raise CompressError("the training dataset is empty")
    missing = {"input_ids", "labels"} - set(dataset.column_names)
    if missing:
        raise CompressError(f"the training dataset has no {sorted(missing)} column(s); "
                            f"columns: {dataset.column_names}")
    for i, row in enumerate(dataset):
        if len(row["labels"]) != len(row["input_ids"]):
            raise CompressError(f"training example {i}: {len(row['labels'])} labels for "
                                f"{len(row['input_ids'])} input ids")
        # labels[t] is predicted from position t - 1, so the first token can never carry the loss
        if all(x == IGNORE for x in row["labels"][1:]):
            raise CompressError(f"training example {i} has no labelled token after the first: missing labels")


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: real tokens keep positions 0..len-1; padding is masked and unlabelled."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def micro_batches(dataset: datasets.Dataset, batch_size: int, seed: int, start: int = 0,
                  pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batch ``start``, ``start + 1``, ... of an endless seeded shuffle (a new permutation
    per epoch, drawn from seed + epoch). The k-th batch depends only on (seed, k), so a resumed
    run sees exactly the batches an uninterrupted one would."""
    n = len(dataset)
    per_epoch = max(1, n // batch_size) if n >= batch_size else 1
    k, order, order_epoch = start, [], None
    while True:
        epoch, index = divmod(k, per_epoch)
        if epoch != order_epoch:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            order_epoch = epoch
        picks = order[index * batch_size:(index + 1) * batch_size] if n >= batch_size else order
        yield collate([dataset[i] for i in picks], pad_id)
        k += 1
