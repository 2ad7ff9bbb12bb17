"""Seeded calibration sets: random fixed-length token windows from one split of a corpus.

The fingerprint records everything that determines the windows (corpus text hash, tokenizer
hash, seed, offsets), so a compressed model can say exactly what it was calibrated on.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from compress.data.corpora import check_split, corpus_python, split_documents
from compress.errors import CompressError

STRATEGY = "random_windows"  # uniform window starts over the concatenated split
_SEPARATOR = "\n\n"
_BATCH_DOCS = 256  # documents per tokenizer call: parallel in Rust, bounded Python memory


def tokenizer_fingerprint(tokenizer) -> str:
    """Short sha256 of what decides the token ids: vocab, merges, normalisation, added tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Runtime call settings that transformers toggles per call; not part of the vocabulary.
        state.pop("truncation", None)
        state.pop("padding", None)
        blob = json.dumps(state, sort_keys=True)
    else:
        blob = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class CalibrationSet:
    input_ids: torch.LongTensor  # [num_samples, seq_len]
    fingerprint: dict

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode()).hexdigest()[:16]

    def batches(self, batch_size: int) -> Iterator[torch.LongTensor]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise CompressError(f"batch_size must be a positive integer, got {batch_size!r}")
        for i in range(0, len(self), batch_size):
            yield self.input_ids[i:i + batch_size]

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class _ByFingerprint:
    """Wraps a tokenizer so lru_cache keys on its fingerprint rather than object identity."""

    def __init__(self, tokenizer):
        self.tokenizer, self.fingerprint = tokenizer, tokenizer_fingerprint(tokenizer)

    def __hash__(self):
        return hash(self.fingerprint)

    def __eq__(self, other):
        return isinstance(other, _ByFingerprint) and other.fingerprint == self.fingerprint


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # truncation/padding off explicitly: a tokenizer may carry settings from earlier calls.
    return tokenizer(texts, add_special_tokens=False, truncation=False, padding=False,
                     verbose=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def _tokenized_split(source: str, split: str, tok: _ByFingerprint) -> tuple[torch.Tensor, str]:
    """(token ids of the split's documents joined by blank lines, sha256 of that joined text).

    Documents are tokenized separately (batched) and joined with the separator's tokens; this
    differs from tokenizing the joined string only at document boundaries, and is much faster.
    """
    texts = [d.text for d in split_documents(source, split)]
    corpus_sha = hashlib.sha256(_SEPARATOR.join(texts).encode()).hexdigest()
    sep = np.asarray(_encode(tok.tokenizer, [_SEPARATOR])[0], dtype=np.int64)
    parts = []
    for i in range(0, len(texts), _BATCH_DOCS):
        for ids in _encode(tok.tokenizer, texts[i:i + _BATCH_DOCS]):
            if parts:
                parts.append(sep)
            parts.append(np.asarray(ids, dtype=np.int64))
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return torch.from_numpy(ids), corpus_sha


def _positive_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CompressError(f"{name} must be an integer >= {minimum}, got {value!r}")


def build_calibration_set(tokenizer, source: str, *, split: str = "train", num_samples: int = 128,
                          seq_len: int = 512, seed: int = 0, strict: bool = False) -> CalibrationSet:
    """Draw ``num_samples`` windows of ``seq_len`` tokens at seeded uniform offsets of the split.

    Windows may overlap; if the split is too small for them not to, this warns (strict: raises).
    """
    _positive_int("num_samples", num_samples, 1)
    _positive_int("seq_len", seq_len, 2)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise CompressError(f"seed must be an integer, got {seed!r}")
    check_split(split)
    keyed = _ByFingerprint(tokenizer)
    ids, corpus_sha = _tokenized_split(source, split, keyed)
    n = len(ids)
    where = f"split {split!r} of corpus {source!r}"
    if n < seq_len + 1:
        raise CompressError(f"{where} has {n} tokens, but seq_len={seq_len} needs at least "
                            f"{seq_len + 1}; use a smaller seq_len, split='all', or a larger corpus")
    if num_samples * seq_len > n:
        msg = (f"{where} has {n} tokens, fewer than num_samples*seq_len = {num_samples}*{seq_len} "
               f"= {num_samples * seq_len}, so calibration windows overlap")
        if strict:
            raise CompressError(f"{msg}; lower num_samples or seq_len, or pass strict=False")
        warnings.warn(msg, stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seq_len + 1, (num_samples,), generator=gen)
    input_ids = ids[starts[:, None] + torch.arange(seq_len)]
    fingerprint = {
        "source": source, "split": split, "num_samples": num_samples, "seq_len": seq_len,
        "seed": seed, "indices": starts.tolist(), "tokenizer": keyed.fingerprint,
        "corpus_sha": corpus_sha, "python": corpus_python(source), "strategy": STRATEGY,
    }
    return CalibrationSet(input_ids=input_ids, fingerprint=fingerprint)


# Keys that pin the windows themselves; a strategy's extra fingerprint keys may not replace them.
_PINNED_KEYS = ("source", "split", "num_samples", "seq_len", "indices", "tokenizer", "corpus_sha",
                "python", "strategy")


def calibration_set_from_offsets(tokenizer, source: str, *, split: str, offsets, seq_len: int,
                                 strategy: str, extra_fingerprint: dict | None = None,
                                 strict: bool = False) -> CalibrationSet:
    """Windows of ``seq_len`` tokens starting at the given token ``offsets`` of the split,
    tokenized exactly as ``build_calibration_set`` does; for strategies that choose the windows
    themselves (e.g. diversity selection from a random pool).

    The fingerprint has build_calibration_set's keys (``indices`` = ``offsets`` in the given
    order, ``seed`` None unless ``extra_fingerprint`` sets it) plus ``extra_fingerprint``'s,
    which may not replace the keys that pin the data. Overlap warns (strict: raises) by the same
    rule as build_calibration_set.
    """
    offsets = [int(o) for o in offsets]  # accepts numpy/torch integers; JSON needs plain ints
    _positive_int("number of offsets", len(offsets), 1)
    _positive_int("seq_len", seq_len, 2)
    extra = dict(extra_fingerprint or {})
    clash = sorted(set(extra) & set(_PINNED_KEYS))
    if clash:
        raise CompressError(f"extra_fingerprint may not set {', '.join(clash)}: those keys are "
                            f"derived from the windows themselves")
    check_split(split)
    keyed = _ByFingerprint(tokenizer)
    ids, corpus_sha = _tokenized_split(source, split, keyed)
    n = len(ids)
    where = f"split {split!r} of corpus {source!r}"
    bad = [o for o in offsets if not 0 <= o <= n - seq_len]
    if bad:
        raise CompressError(f"{where} has {n} tokens: window offsets must lie in "
                            f"[0, {n - seq_len}] for seq_len={seq_len}, got {bad[:5]}")
    if len(offsets) * seq_len > n:
        msg = (f"{where} has {n} tokens, fewer than num_samples*seq_len = {len(offsets)}*{seq_len}"
               f", so calibration windows overlap")
        if strict:
            raise CompressError(f"{msg}; choose fewer windows or pass strict=False")
        warnings.warn(msg, stacklevel=2)
    starts = torch.tensor(offsets, dtype=torch.long)
    fingerprint = {
        "source": source, "split": split, "num_samples": len(offsets), "seq_len": seq_len,
        "seed": None, "indices": offsets, "tokenizer": keyed.fingerprint,
        "corpus_sha": corpus_sha, "python": corpus_python(source), "strategy": strategy, **extra,
    }
    return CalibrationSet(input_ids=ids[starts[:, None] + torch.arange(seq_len)],
                          fingerprint=fingerprint)
