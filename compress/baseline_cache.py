"""The float baseline of a recipe's ``verify``, cached across runs.

Running a recipe again into a new folder (another bit width, another seed) evaluated the same
unchanged model on the same windows each time. The baseline depends only on the model as loaded
and on what verify measures, so it is cached under a fingerprint of exactly those:

  - the model folder: every top-level file's name, size and modification time (weights, config,
    tokenizer) — a re-converted or re-exported model is another model — and the load dtype;
  - the device type (CPU and CUDA kernels differ in the last bits) and the versions of the toolkit,
    torch and transformers (the metrics' code and the numerics) and of Python (``stdlib`` is its
    source);
  - the verify settings (corpus, split, seq_len, max_windows, batch_size, topics) and, for a local
    text file, its path, size and modification time.

A model that is not a local folder (a hub id) is not cached. ``COMPRESS_CACHE/baselines`` holds one
small JSON file per fingerprint; deleting it only costs the next run its baseline evaluation.
"""
from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from compress import __version__
from compress.cache import cache_dir
from compress.fs import write_json_atomic

_VERIFY_FIELDS = ("corpus", "split", "seq_len", "max_windows", "batch_size", "topics")


def baseline_fingerprint(model_dir: str | Path | None, *, dtype: str, device_type: str, verify) -> dict | None:
    """What the baseline of ``verify`` (a VerifySpec) on the model in ``model_dir`` depends on, or
    None when it cannot be pinned (no local folder)."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    folder = Path(model_dir).resolve()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    spec = {k: getattr(verify, k) for k in _VERIFY_FIELDS}
    corpus = Path(str(verify.corpus)).expanduser()
    if corpus.is_file():
        spec["corpus_file"] = [str(corpus.resolve()), corpus.stat().st_size, corpus.stat().st_mtime_ns]
    fingerprint = {"model": {"folder": str(folder), "files": files, "dtype": dtype}, "device_type": device_type,
                   "verify": spec, "versions": {"compress": __version__, "torch": _version("torch"),
                                                "transformers": _version("transformers"),
                                                "python": platform.python_version()}}
    return json.loads(json.dumps(fingerprint))  # as it reads back from the cache file (tuples become lists)


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:32]


def cached_baseline(fingerprint: dict | None) -> dict | None:
    """The baseline an earlier run stored under ``fingerprint``, or None."""
    if fingerprint is None:
        return None
    path = _path(fingerprint)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or a half-written file from a crash: evaluate again
        return None
    return data.get("baseline") if data.get("fingerprint") == fingerprint else None


def store_baseline(fingerprint: dict | None, baseline: dict) -> None:
    if fingerprint is not None:
        write_json_atomic(_path(fingerprint), {"fingerprint": fingerprint, "baseline": baseline})


def _path(fingerprint: dict) -> Path:
    return cache_dir("baselines") / f"{fingerprint_key(fingerprint)}.json"


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None
