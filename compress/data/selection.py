"""Calibration-set selection strategies shared by quantization and pruning.

At 4 bits the calibration content matters little; at 3 and 2 bits a domain-matched or
well-chosen set limits the loss. Strategies (``select_calibration_set``):

- ``random``: seeded random windows of the corpus (``build_calibration_set``, unchanged).
- ``domain``: the same random windows, drawn from a domain-matched corpus the caller names
  (e.g. ``stdlib`` for a code model); only the fingerprint's strategy differs.
- ``diversity``: a seeded pool of ``pool_factor`` x ``num_samples`` random windows, embedded by
  the model (mean-pooled last hidden state), k-means with ``num_samples`` clusters, and the pool
  window nearest each centroid.
- ``kl`` (NIRVANA's selection): compress with each of ``candidates`` random sets (seeds
  seed, seed+1, ...) and keep the one whose compressed model has the lowest
  KL(P_orig || P_compressed) of next-token distributions on a fixed probe set.
"""
from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from compress.data.calibration_set import (CalibrationSet, _positive_int, build_calibration_set,
                                           calibration_set_from_offsets)
from compress.errors import CompressError
from compress.runtime import on_device

STRATEGIES = ("random", "domain", "diversity", "kl")


# --------------------------------------------------------------------------- probe & scoring

def probe_set(tokenizer, source: str, *, split: str = "validation", num_samples: int = 128,
              seq_len: int = 64, seed: int = 1234) -> CalibrationSet:
    """The fixed probe the KL strategy scores candidates on: seeded random windows, never from
    the test split (that one is kept for evaluation)."""
    if split == "test":
        raise CompressError("the KL probe set may not come from the 'test' split (it is kept for "
                            "evaluation); use split='validation' or 'train'")
    probe = build_calibration_set(tokenizer, source, split=split, num_samples=num_samples,
                                  seq_len=seq_len, seed=seed)
    return _restamped(probe, strategy="probe")


def _restamped(calib: CalibrationSet, **fields) -> CalibrationSet:
    return CalibrationSet(input_ids=calib.input_ids, fingerprint={**calib.fingerprint, **fields})


def _log_probs(model: nn.Module, ids: torch.Tensor, device) -> torch.Tensor:
    """[b, L, vocab] float32 next-token log-probabilities."""
    logits = model(input_ids=ids.to(device), use_cache=False).logits
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def kl_on_probe(reference: nn.Module, candidate: nn.Module, probe: CalibrationSet, *, device,
                batch_size: int = 8) -> float:
    """Mean over every probe position of KL(P_ref || P_cand) of the next-token distributions.

    Computed batch by batch (float32 log-softmax), so only [batch, L, vocab] log-probs exist at
    a time. Both models are moved to ``device`` for the call and back to where they were after:
    the device must hold both at once (for a model that only fits once, score on the CPU or
    compress layer-wise and compare outside this function).
    """
    _positive_int("batch_size", batch_size, 1)
    total, count = 0.0, 0
    with on_device(reference, device), on_device(candidate, device):
        for ids in probe.batches(batch_size):
            logp_ref = _log_probs(reference, ids, device)
            logp_cand = _log_probs(candidate, ids, device)
            # sum_v p_ref * (log p_ref - log p_cand), per position
            kl = F.kl_div(logp_cand, logp_ref, reduction="none", log_target=True).sum(-1)
            total += float(kl.double().sum())
            count += kl.numel()
            del logp_ref, logp_cand, kl
    return total / count


@torch.no_grad()
def mean_pooled_hidden(model: nn.Module, ids: torch.Tensor, *, device, batch_size: int = 8,
                       layer: int = -1, progress: bool = False) -> torch.Tensor:
    """[N, hidden] float32 CPU features: the mean over positions of ``layer``'s hidden states.

    Runs the base model (no LM head, so no [batch, L, vocab] logits); hidden_states[0] is the
    embedding output and hidden_states[-1] the final (normed) hidden state.
    """
    _positive_int("batch_size", batch_size, 1)
    body = getattr(model, "base_model", model)
    feats = []
    with on_device(model, device):
        for start in tqdm(range(0, len(ids), batch_size), desc="embed pool", unit="batch",
                          disable=not progress):
            out = body(input_ids=ids[start:start + batch_size].to(device), use_cache=False,
                       output_hidden_states=True)
            feats.append(out.hidden_states[layer].float().mean(dim=1).cpu())
    return torch.cat(feats)


# --------------------------------------------------------------------------- diversity

def _kmeans_picks(features: torch.Tensor, n: int, seed: int) -> tuple[list[int], np.ndarray]:
    """(one pool index per cluster, sorted by cluster id; cluster label of every pool item)."""
    from sklearn.cluster import KMeans  # scikit-learn is slow to import: the diversity strategy only

    if features.ndim != 2:
        raise CompressError(f"features must be [N, d], got shape {tuple(features.shape)}")
    _positive_int("n", n, 1)
    N = features.shape[0]
    if n > N:
        raise CompressError(f"cannot select {n} items from a pool of {N}; the pool must hold at "
                            f"least n items (raise pool_factor or lower num_samples)")
    x = features.detach().to("cpu", torch.float64).numpy()
    with warnings.catch_warnings():
        # Fewer distinct points than clusters is fine here: the greedy pick stays unique.
        warnings.filterwarnings("ignore", message=".*[Nn]umber of distinct clusters.*")
        km = KMeans(n_clusters=n, random_state=seed, n_init=4).fit(x)
    dist = km.transform(x).T  # [n, N] Euclidean distances to the centroids
    chosen: list[int] = []
    taken = np.zeros(N, dtype=bool)
    for c in range(n):
        # stable sort: ties go to the lowest pool index, so the pick is deterministic
        i = next(int(i) for i in np.argsort(dist[c], kind="stable") if not taken[i])
        taken[i] = True
        chosen.append(i)
    return chosen, km.labels_


def diversity_select(features: torch.Tensor, n: int, *, seed: int = 0) -> list[int]:
    """Indices of ``n`` distinct pool items: k-means (``n`` clusters, seeded) on ``features``,
    then for each centroid in cluster-id order the nearest item not already chosen."""
    return _kmeans_picks(features, n, seed)[0]


# --------------------------------------------------------------------------- strategies

@dataclass
class Selection:
    calibration: CalibrationSet  # fingerprint["strategy"] names the strategy
    report: dict  # JSON-able: strategy, chosen digest and the strategy's evidence


def select_calibration_set(tokenizer, *, strategy: str, source: str, split: str = "train",
                           num_samples: int, seq_len: int, seed: int = 0,
                           model: nn.Module | None = None, device="cpu", batch_size: int = 8,
                           pool_factor: int = 4, candidates: int = 4,
                           probe_source: str | None = None, probe_samples: int = 128,
                           probe_seq_len: int = 64,
                           compress_fn: Callable[[CalibrationSet], nn.Module] | None = None,
                           progress: bool = True) -> Selection:
    """Choose a calibration set by ``strategy`` (see the module docstring).

    ``model`` is the uncompressed model (diversity: the embedder; kl: the reference).
    ``compress_fn(calibration)`` (kl only) must return a compressed *copy* of ``model``,
    leaving ``model`` untouched; each copy is freed after it is scored.
    """
    if strategy not in STRATEGIES:
        raise CompressError(f"unknown calibration strategy {strategy!r}; allowed: "
                            f"{', '.join(STRATEGIES)}")
    _positive_int("num_samples", num_samples, 1)
    _positive_int("batch_size", batch_size, 1)
    common = dict(split=split, num_samples=num_samples, seq_len=seq_len)
    if strategy in ("random", "domain"):
        calib = build_calibration_set(tokenizer, source, seed=seed, **common)
        if strategy == "domain":
            calib = _restamped(calib, strategy="domain")
        return Selection(calib, {"strategy": strategy, "digest": calib.digest})
    if model is None:
        role = "to embed the pool" if strategy == "diversity" else "as the KL reference"
        raise CompressError(f"calibration strategy {strategy!r} needs the model ({role})")
    if strategy == "diversity":
        _positive_int("pool_factor", pool_factor, 1)
        return _select_diverse(tokenizer, model, source, seed=seed, pool_factor=pool_factor,
                               device=device, batch_size=batch_size, progress=progress, **common)
    _positive_int("candidates", candidates, 1)
    if compress_fn is None:
        raise CompressError("calibration strategy 'kl' needs compress_fn (calibration set -> "
                            "compressed copy of the model) to score each candidate")
    probe = probe_set(tokenizer, probe_source or source, split="validation",
                      num_samples=probe_samples, seq_len=probe_seq_len)
    return _select_by_kl(tokenizer, model, source, probe, seed=seed, candidates=candidates,
                         compress_fn=compress_fn, device=device, batch_size=batch_size,
                         progress=progress, **common)


def _select_diverse(tokenizer, model, source, *, split, num_samples, seq_len, seed, pool_factor,
                    device, batch_size, progress) -> Selection:
    pool_size = pool_factor * num_samples
    with warnings.catch_warnings():
        # The pool may overlap on a small corpus; the chosen set is checked on its own below.
        warnings.filterwarnings("ignore", message=".*calibration windows overlap")
        pool = build_calibration_set(tokenizer, source, split=split, num_samples=pool_size,
                                     seq_len=seq_len, seed=seed)
    feats = mean_pooled_hidden(model, pool.input_ids, device=device, batch_size=batch_size,
                               progress=progress)
    chosen, labels = _kmeans_picks(feats, num_samples, seed)
    offsets = [pool.fingerprint["indices"][i] for i in chosen]
    calib = calibration_set_from_offsets(
        tokenizer, source, split=split, offsets=offsets, seq_len=seq_len, strategy="diversity",
        extra_fingerprint={"seed": seed, "pool_size": pool_size, "feature_layer": -1})
    sizes = np.bincount(labels, minlength=num_samples).tolist()
    return Selection(calib, {"strategy": "diversity", "digest": calib.digest,
                             "pool_size": pool_size, "pool_digest": pool.digest,
                             "cluster_sizes": sizes})


def _select_by_kl(tokenizer, model, source, probe, *, split, num_samples, seq_len, seed,
                  candidates, compress_fn, device, batch_size, progress) -> Selection:
    scored = []  # (kl or inf, candidate set, report row), in evaluation order
    bar = tqdm(range(seed, seed + candidates), desc="kl candidates", unit="set",
               disable=not progress)
    for s in bar:
        cand = build_calibration_set(tokenizer, source, split=split, num_samples=num_samples,
                                     seq_len=seq_len, seed=s)
        compressed = compress_fn(cand)
        if compressed is model:
            raise CompressError("compress_fn returned the reference model itself; it must "
                                "return a compressed copy and leave the model untouched")
        kl = kl_on_probe(model, compressed, probe, device=device, batch_size=batch_size)
        del compressed  # free the copy before the next candidate is compressed
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        finite = math.isfinite(kl)
        scored.append((kl if finite else math.inf, cand,
                       {"seed": s, "digest": cand.digest, "kl": kl if finite else None}))
        bar.set_postfix(seed=s, kl=f"{kl:.4g}")
    best_kl, best, best_row = min(scored, key=lambda t: t[0])  # ties: first evaluated
    if not math.isfinite(best_kl):
        raise CompressError(f"every KL candidate scored NaN/inf on the probe set "
                            f"(seeds {seed}..{seed + candidates - 1}); the compression diverged")
    calib = _restamped(best, strategy="kl", candidate_seeds=list(range(seed, seed + candidates)),
                       probe=probe.digest)
    fp = probe.fingerprint
    return Selection(calib, {
        "strategy": "kl", "digest": calib.digest, "chosen_seed": best_row["seed"],
        "chosen_kl": best_kl, "candidates": [row for _, _, row in scored],
        "probe": {"digest": probe.digest, "source": fp["source"], "split": fp["split"],
                  "num_samples": fp["num_samples"], "seq_len": fp["seq_len"], "seed": fp["seed"]}})
