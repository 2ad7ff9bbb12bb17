"""The training loop: causal-LM loss on the labelled tokens, for any set of trainable parameters.

``train(model, params, dataset, config)`` trains exactly ``params`` (S2FT deltas, LoRA
matrices or every weight of the model) with AdamW, gradient accumulation, a warmup +
cosine/linear/constant learning-rate schedule and gradient clipping.

* Loss: the sum of token cross-entropies over the labelled tokens (labels != -100) of all
  micro-batches of a step, divided by their count, so a step's loss does not depend on how
  it is split into micro-batches. Only the labelled positions go through ``lm_head``: for
  instruction data that is a few tokens per example instead of [batch, length, vocab] logits.
* Determinism: micro-batch k is a function of (seed, k) (``data.micro_batches``) and the
  torch RNGs are seeded, so the same seed gives the same parameters.
* Checkpoints (``checkpoint_dir``, every ``checkpoint_every`` steps and at the end): the
  trainable parameters, the optimizer state, the RNG states (``checkpoint.safetensors``)
  and the step, the losses so far, the scheduler, the optimizer's hyper-parameters and a
  fingerprint of the run (``trainer_state.json``). No pickles. Each is written into a
  temporary folder and renamed into place, so a crash loses at most the steps since the
  last checkpoint and never leaves half a checkpoint. A new run with the same
  ``checkpoint_dir`` resumes from the latest one; one whose settings, data or parameters
  differ is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from compress.errors import CompressError
from compress.finetune.config import TrainConfig
from compress.finetune.data import IGNORE, check_dataset, micro_batches

CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_STATE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainResult:
    losses: list[float]  # per optimizer step, from step 1 (restored ones included after a resume)
    start_step: int  # 0, or the checkpoint's step this run resumed from
    step_seconds: list[float] = field(default_factory=list)  # this run's steps only
    seconds: float = 0.0
    labelled_tokens: int = 0  # this run's

    def report(self) -> dict:
        times = sorted(self.step_seconds)
        return {"steps": len(self.losses), "resumed_from": self.start_step,
                "loss_first": round(self.losses[0], 5) if self.losses else None,
                "loss_last": round(self.losses[-1], 5) if self.losses else None,
                "loss_last10": round(sum(self.losses[-10:]) / len(self.losses[-10:]), 5) if self.losses else None,
                "seconds": round(self.seconds, 3),
                "step_seconds_median": round(times[len(times) // 2], 4) if times else None,
                "labelled_tokens": self.labelled_tokens}


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` for the update after ``step`` updates (LambdaLR's convention)."""
    if step < config.warmup:
        return (step + 1) / (config.warmup + 1)
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1.0 - progress


def _named(params) -> list[tuple[str, nn.Parameter]]:
    items = list(params.items()) if isinstance(params, dict) else list(params)
    if items and isinstance(items[0], nn.Parameter):
        items = [(f"param{i}", p) for i, p in enumerate(items)]
    seen, out = set(), []
    for name, p in items:
        if id(p) in seen:  # tied weights: one parameter, one optimizer entry
            continue
        seen.add(id(p))
        if not p.requires_grad:
            raise CompressError(f"training: parameter {name} does not require grad")
        out.append((name, p))
    if not out:
        raise CompressError("training: no trainable parameters were given")
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise CompressError("training: parameter names are not unique")
    return out


def _decoder_and_head(model: nn.Module):
    """The model's decoder stack and lm_head, to project only the labelled positions."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    if decoder is None or decoder is model or not isinstance(head, nn.Module):
        return None, None
    return decoder, head


def labelled_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of cross-entropies over the labelled next-token targets, their count)."""
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    n = int(keep.sum())
    decoder, head = _decoder_and_head(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if decoder is not None:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][keep])
    else:  # any other causal LM: full logits
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), n


def _fingerprint(named, dataset, config: TrainConfig) -> dict:
    digest = hashlib.sha256()
    for column in ("input_ids", "labels"):
        for row in dataset[column]:
            digest.update(json.dumps(row, separators=(",", ":")).encode())
            digest.update(b";")
    settings = config.model_dump(exclude={"checkpoint_dir", "checkpoint_every"})
    return {"settings": settings, "data": digest.hexdigest()[:16], "examples": len(dataset),
            "params": {n: list(p.shape) for n, p in named}}


# --------------------------------------------------------------------------- checkpoints

def _json_ok(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def save_checkpoint(folder: Path, step: int, named, optimizer, scheduler, losses: list[float],
                    fingerprint: dict, keep: int = 1) -> Path:
    """Write ``folder/checkpoint-<step>`` atomically; keep only the newest ``keep`` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {id(p): i for i, (_, p) in enumerate(named)}
    tensors = {f"param.{n}": p.detach().to("cpu").contiguous() for n, p in named}
    opt = optimizer.state_dict()  # state keyed by the parameter's position in the optimizer
    scalars: dict = {}
    for idx, state in opt["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    sched = {k: v for k, v in scheduler.state_dict().items() if _json_ok(v)}
    state = {"step": step, "losses": losses, "fingerprint": fingerprint,
             "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars,
                           "params": [n for n, _ in named], "index": [index[id(p)] for _, p in named]},
             "scheduler": sched, "format": "compress-train", "version": 1}
    final = folder / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=folder))
    try:
        save_file(tensors, str(tmp / CHECKPOINT_TENSORS))
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    done = [p for p in sorted(Path(folder).glob(f"{CHECKPOINT_PREFIX}*"))
            if (p / CHECKPOINT_STATE).is_file() and (p / CHECKPOINT_TENSORS).is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, named, optimizer, scheduler, fingerprint: dict) -> tuple[int, list[float]]:
    """Restore params, optimizer, scheduler and RNGs from ``path``; returns (step, losses)."""
    try:
        state = json.loads((path / CHECKPOINT_STATE).read_text())
        tensors = load_file(str(path / CHECKPOINT_TENSORS))
    except (OSError, ValueError) as exc:
        raise CompressError(f"training checkpoint {path} cannot be read: {exc}") from None
    theirs = state.get("fingerprint", {})
    if theirs != fingerprint:
        differ = sorted(k for k in set(theirs) | set(fingerprint) if theirs.get(k) != fingerprint.get(k))
        detail = ""
        if "settings" in differ:
            a, b = theirs.get("settings", {}), fingerprint["settings"]
            detail = " (" + ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                                      if a.get(k) != b.get(k)) + ")"
        raise CompressError(f"training checkpoint {path} belongs to another run: its {', '.join(differ)} "
                            f"differ{detail}; resume with the same settings or use a fresh checkpoint_dir")
    device_of = {n: p.device for n, p in named}
    with torch.no_grad():
        for n, p in named:
            p.copy_(tensors[f"param.{n}"].to(device_of[n], p.dtype))
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, extra in state["optimizer"]["scalars"].items():
        opt_state.setdefault(int(idx), {}).update(extra)
    groups = state["optimizer"]["param_groups"]
    for g in groups:  # JSON turned tuples into lists
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    return int(state["step"]), [float(x) for x in state["losses"]]


# --------------------------------------------------------------------------- the loop

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]] | dict[str, nn.Parameter],
          dataset, config: TrainConfig | dict | None = None, *, pad_id: int = 0, device=None,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None,
          desc: str = "train") -> TrainResult:
    """Train ``params`` of ``model`` on ``dataset`` (rows of input_ids and labels); see the module doc.

    ``on_step(step, loss)`` runs after every optimizer step (and after its checkpoint).
    """
    config = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config or {})
    check_dataset(dataset)
    named = _named(params)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW([p for _, p in named], lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    fingerprint = _fingerprint(named, dataset, config) if ckpt_dir is not None else {}
    start, losses = 0, []
    if ckpt_dir is not None and (last := latest_checkpoint(ckpt_dir)) is not None:
        start, losses = load_checkpoint(last, named, optimizer, scheduler, fingerprint)
        losses = losses[:start]
    result = TrainResult(losses, start)
    was_training = model.training
    model.train()
    batches = micro_batches(dataset, config.batch_size, config.seed, start=start * config.grad_accum,
                            pad_id=pad_id)
    t_run = time.perf_counter()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc=desc, disable=not progress)
    try:
        for step in bar:
            t0 = time.perf_counter()
            micro = [next(batches) for _ in range(config.grad_accum)]
            count = sum(int((m["labels"][:, 1:] != IGNORE).sum()) for m in micro)
            total = 0.0
            for m in micro:
                loss_sum, _ = labelled_loss_sum(model, {k: v.to(device) for k, v in m.items()})
                (loss_sum / count).backward()
                total += float(loss_sum.detach())
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            result.step_seconds.append(time.perf_counter() - t0)
            result.labelled_tokens += count
            losses.append(total / count)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            done = step + 1
            if ckpt_dir is not None and (done % config.checkpoint_every == 0 or done == config.steps):
                save_checkpoint(ckpt_dir, done, named, optimizer, scheduler, losses, fingerprint)
            if on_step is not None:
                on_step(done, losses[-1])
    finally:
        bar.close()
        model.train(was_training)
        optimizer.zero_grad(set_to_none=True)
    result.seconds = time.perf_counter() - t_run
    return result
