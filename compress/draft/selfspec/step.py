"""Recipe step ``self_spec`` and the ``self-spec`` export: a drafter cut from the target itself.

    - algorithm: self_spec
      exit_layers: [3, 5, 8]          # candidate depths; one head each, trained together
      vocab_size: 32768               # trimmed LM head (null: the full vocabulary)
      full_vocab_layers: [5]          # extra full-vocabulary heads, for comparison
      train_corpora: [stdlib, bbc]    # distillation text (train split)
      train_source: generations       # or corpus (default), or mixed (both): the target's own greedy continuations
      generation_prompts: unit_ends   #   of prompts ending after a docstring or a paragraph (default: window_starts,
      prompt_tokens: 128              #   each window's first tokens; units: a function's header and docstring
      generate_tokens: 384            #   alone, as the bench's prompts are); 128-token prompts, 384 new tokens
      context: deep                   # or shallow (default): also read the target's final state
      unroll: 3                       #   of the previous position; train 3 drafts of a round together
      shallow_layers: [3]             #   (+ shallow heads on the same batches, for comparison)
      mid_layers: [3]                 #   (+ deep heads that also read block mid_depth's state, likewise)
      steps: 600

The step leaves the target unchanged. It trains the heads (compress/draft/selfspec/train.py),
measures the depth curve on held-out windows (validation split) and, reported beside it, on the
target's greedy continuations of held-out prompts (the text a drafter meets when decoding;
``eval_generations``; again on their first ``eval_first_tokens``; all also per corpus), picks the
depth and draft length with the best predicted speedup on the continuations' first tokens where
there are any, else on the windows (``chosen_on`` says which; ``gamma`` pins the length),
fits a calibrator of the chosen head's confidence against acceptance on one half of the held-out
events (reporting ECE / AUROC on the other half, before and after) and picks the stopping threshold
there. ``export: {format: self-spec}`` writes the heads, the manifest and the calibrator — no copy of
the target: ``compress draft-bench --target T --drafter DIR`` rebuilds the drafter from the target's
own blocks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calibration.metrics import confidence_auroc, expected_calibration_error
from compress.algorithms import StepContext
from compress.draft.agreement import read_prompts
from compress.draft.confidence import fit_drafter_calibrator
from compress.draft.selfspec.config import SelfSpecConfig
from compress.draft.selfspec.generation_cache import generation_key, load_generations, save_generations
from compress.draft.selfspec.generations import continuation_mask, greedy_fill, unit_end_prompts, unit_prompts
from compress.draft.selfspec.head import (FORMAT, ExitHead, eos_ids, read_manifest, target_fingerprint,
                                          trimmed_vocabulary, write_manifest)
from compress.draft.selfspec.train import (agreement_probe, choose_threshold, cost_per_draft, distill_heads,
                                           first_events, head_events, summarise_heads)
from compress.errors import CompressError
from compress.formats.calibrator import load_lm_calibrator

CALIBRATOR_DIR = "calibrator"


@dataclass
class SelfSpecResult:
    """What the step leaves for the export (``ctx.state.self_spec``)."""

    heads: dict[str, ExitHead]
    manifest: dict
    calibrator: object | None = None
    curve: dict = field(default_factory=dict)


def _documents(corpus: str, split: str, exclude: list[str] = ()) -> tuple[list[str], int]:
    """The texts of a corpus's split but those containing the first line of an excluded prompt;
    (texts, documents left out)."""
    from compress.data.corpora import split_documents  # the corpora load datasets (slow): only training needs them
    docs = [d.text for d in split_documents(corpus, split)]
    kept = [d for d in docs if not any(line in d for line in exclude)]
    return kept, len(docs) - len(kept)


def _corpus_windows(tokenizer, corpora, split: str, seq_len: int, per_corpus: int,
                    exclude: list[str] = ()) -> tuple[list[torch.Tensor], int]:
    """Windows of each corpus's split (documents joined as for perplexity), leaving out documents
    that contain the first line of any excluded prompt; ([windows of each corpus], documents left out)."""
    from compress.evaluate import window_token_ids
    out, dropped = [], 0
    for c in corpora:
        kept, left_out = _documents(c, split, exclude)
        dropped += left_out
        out.append(window_token_ids(tokenizer, "\n\n".join(kept), seq_len, per_corpus))
    return out, dropped


def _windows(tokenizer, corpora, split: str, seq_len: int, per_corpus: int,
             exclude: list[str] = ()) -> tuple[torch.Tensor, int]:
    """``_corpus_windows``, the corpora's windows in one tensor."""
    out, dropped = _corpus_windows(tokenizer, corpora, split, seq_len, per_corpus, exclude)
    return torch.cat(out), dropped


def _prompts(cfg: SelfSpecConfig, tokenizer, windows: list[torch.Tensor], split: str, per_corpus: int,
             exclude: list[str]) -> list[torch.Tensor]:
    """The generations' prompts of ``split``, per corpus: its windows' first tokens, or ``per_corpus``
    prompts ending at a unit's end (``generation_prompts``)."""
    p_len = cfg.generation_shape[0]
    if cfg.generation_prompts == "window_starts":
        return [w[:, :p_len] for w in windows]
    pick = unit_prompts if cfg.generation_prompts == "units" else unit_end_prompts
    return [pick(tokenizer, _documents(c, split, exclude)[0], p_len, per_corpus, seed=cfg.seed)
            for c in cfg.train_corpora]


def _continue(cfg: SelfSpecConfig, model, prompts: list, progress: bool, seen: dict, name: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's greedy continuations of every corpus's prompts, in order, and each row's prompt length
    (``units``: prompts of different lengths, each continued to seq_len tokens in all) — read back from
    the generation cache when an earlier run made the same ones (``seen[name]``: hit or miss)."""
    p_len, g_len = cfg.generation_shape
    length = cfg.seq_len if cfg.generation_prompts == "units" else p_len + g_len
    flat = [p for part in prompts for p in part]
    key = generation_key(model, flat, length, cfg.generate_batch_size) if cfg.generation_cache else None
    got = None if key is None else load_generations(key, len(flat), length)
    seen[name] = "off" if key is None else "hit" if got is not None else "miss"
    if got is None:
        got = greedy_fill(model, flat, length, batch_size=cfg.generate_batch_size, progress=progress)
        if key is not None:
            save_generations(key, *got)
    return got


def _train_sample(train: torch.Tensor, loss_mask: torch.Tensor | None, n: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` training sequences for the learning curve, fixed by ``seed`` (its own generator: the training
    draws are untouched), from the continuations where there are any (the rows whose loss mask is not
    all true: a mixed text's corpus windows keep every position), with their kept positions."""
    rows = torch.arange(train.shape[0])
    if loss_mask is not None and not bool(loss_mask.all()):
        rows = rows[~loss_mask.all(1)]
    pick = rows[torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(seed))[:n]].sort().values
    return train[pick], None if loss_mask is None else loss_mask[pick]


def _lengths(p_lens) -> dict:
    lens = torch.as_tensor(p_lens).reshape(-1).float()
    return {"min": int(lens.min()), "median": float(lens.median()), "max": int(lens.max())}


def _curves_by_corpus(events: dict, corpora: list[str], counts: list[int], heads, layers: int, gammas) -> dict:
    """The depth curve of each corpus's own held-out sequences (``events`` lists them corpus after corpus,
    ``counts`` each): a code set and a prose set drafted differently, as the bench's two prompt sets do."""
    out, start = {}, 0
    for corpus, n in zip(corpora, counts):
        if n:
            part = {k: {key: rows[start:start + n] for key, rows in ev.items()} for k, ev in events.items()}
            out[corpus] = summarise_heads(part, heads, layers, gammas)
        start += n
    return out


def _prompt_lines(files: list[str]) -> list[str]:
    return [p.strip().splitlines()[0].strip() for f in files for p in read_prompts(f) if p.strip()]


def _split_events(agrees, confs):
    """Alternate windows into a fitting half and a reporting half."""
    return (agrees[0::2], confs[0::2]), (agrees[1::2], confs[1::2])


def _flat(rows):
    return [x for r in rows for x in r]


def _acceptance_quality(conf: torch.Tensor, accepted: torch.Tensor) -> dict:
    """ECE and AUROC of confidence against acceptance (AUROC None when all or none were accepted)."""
    both = 0 < int(accepted.sum()) < accepted.numel()
    return {"ece": expected_calibration_error(conf, accepted), "auroc": confidence_auroc(conf, accepted) if both else None}


def apply_self_spec(model: torch.nn.Module, cfg: SelfSpecConfig, ctx: StepContext) -> dict:
    """Shared-prefix self-drafter: distil exit heads at several depths, pick one, calibrate its stop."""

    layers = model.config.num_hidden_layers
    for k in cfg.exit_layers + cfg.full_vocab_layers + cfg.shallow_layers + cfg.mid_layers:
        if k >= layers:
            raise CompressError(f"{ctx.where}: exit layer {k} must be below the target's {layers} blocks")
    mid_depth = layers // 2 if cfg.mid_depth is None else cfg.mid_depth
    if cfg.mid_layers and not max(cfg.mid_layers) < mid_depth < layers:
        raise CompressError(f"{ctx.where}: mid_depth {mid_depth} must lie after every exit block of mid_layers "
                            f"{cfg.mid_layers} and before the target's last block ({layers - 1})")
    p_len, g_len = cfg.generation_shape
    max_pos = getattr(model.config, "max_position_embeddings", None)
    uses_generations = cfg.train_source != "corpus" or cfg.eval_generations
    if uses_generations and max_pos is not None and p_len + g_len > max_pos:
        raise CompressError(f"{ctx.where}: prompt_tokens + generate_tokens = {p_len} + {g_len} exceeds the target's "
                            f"{max_pos} positions (max_position_embeddings); shorten generate_tokens")
    model.to(ctx.device)
    phases, mark = {}, [time.perf_counter()]

    def lap(name: str) -> None:  # where the step's time goes (each phase ends in a read of the device)
        now = time.perf_counter()
        phases[name] = round(phases.get(name, 0.0) + now - mark[0], 1)
        mark[0] = now

    exclude = _prompt_lines(cfg.exclude_prompts)
    gen_seen: dict[str, str] = {}  # the generation cache: hit or miss, per text
    train_parts, dropped = _corpus_windows(ctx.tokenizer, cfg.train_corpora, "train", cfg.seq_len, cfg.train_windows,
                                           exclude)
    held_parts, _ = _corpus_windows(ctx.tokenizer, cfg.train_corpora, "validation", cfg.seq_len, cfg.eval_windows,
                                    exclude)
    train, held = torch.cat(train_parts), torch.cat(held_parts)
    eos = eos_ids(model)
    loss_mask = None
    if cfg.train_source != "corpus":
        # Self-distillation: the target continues each training window's prompt greedily. The loss
        # covers the continuation positions only (from the prompt's last token, which predicts the
        # first generated one, to the one predicting the first EOS): those are the contexts a drafter
        # drafts from at decode time, which is the point of this text; the prompt positions are
        # corpus text, what train_source: corpus already trains on, and keeping them would make the
        # comparison of the two sources a mixture. They still run through the target as context.
        prompts = _prompts(cfg, ctx.tokenizer, train_parts, "train", cfg.train_windows, exclude)
        lap("text")
        generated, train_p = _continue(cfg, model, prompts, ctx.progress, gen_seen, "train")
        lap("generations")
        loss_mask = continuation_mask(generated, train_p, eos)
        if cfg.train_source == "mixed":  # corpus windows (every position) beside their continuations
            loss_mask = torch.cat([torch.ones_like(train, dtype=torch.bool), loss_mask])
            generated = torch.cat([train, generated])
        train = generated
    lm_rows = model.lm_head.weight.shape[0]
    full = torch.arange(lm_rows)
    trimmed = (full if cfg.vocab_size is None or cfg.vocab_size >= lm_rows else
               trimmed_vocabulary(train.tolist(), cfg.vocab_size, vocab_size=lm_rows, always=eos_ids(model)))
    how = (cfg.head_init, cfg.lm_rows)
    specs = {f"k{k}": (k, trimmed, cfg.context, None, *how) for k in cfg.exit_layers}
    specs.update({f"k{k}-full": (k, full, cfg.context, None, *how) for k in cfg.full_vocab_layers
                  if trimmed.numel() < lm_rows})
    specs.update({f"k{k}-shallow": (k, trimmed, "shallow", None, *how) for k in cfg.shallow_layers})
    specs.update({f"k{k}-mid": (k, trimmed, "deep", mid_depth, *how) for k in cfg.mid_layers})
    lap("text")
    if cfg.eval_generations:  # before training: the learning curve reads them (the tokens do not depend on it)
        gen_prompts = _prompts(cfg, ctx.tokenizer, held_parts, "validation", cfg.eval_windows, exclude)
        held_gen, held_p = _continue(cfg, model, gen_prompts, ctx.progress, gen_seen, "held_out")
        held_keep = continuation_mask(held_gen, held_p, eos)
        lap("held_out_generations")
    probe = None
    if cfg.learning_curve_every:
        probe = agreement_probe(model, {"held_out": (held_gen, held_keep),
                                        "train": _train_sample(train, loss_mask, held_gen.shape[0], cfg.seed)},
                                first=cfg.eval_first_tokens)
    heads, history = distill_heads(model, train, specs, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                   seed=cfg.seed, progress=ctx.progress, loss_mask=loss_mask, unroll=cfg.unroll,
                                   teacher_cache=cfg.teacher_cache, tf32=cfg.tf32, probe=probe,
                                   probe_every=cfg.learning_curve_every, argmax_weight=cfg.argmax_weight)
    lap("training")
    # a deep head's later drafts read its own states: score every draft of the longest round considered
    steps = max(cfg.gammas) if cfg.context == "deep" else 1
    events = head_events(model, heads, held, steps=steps)
    curve = summarise_heads(events, heads, layers, cfg.gammas)
    more_curves = {"depth_curve_by_corpus": _curves_by_corpus(events, cfg.train_corpora,
                                                              [w.shape[0] for w in held_parts], heads, layers,
                                                              cfg.gammas)}
    lap("held_out_windows")
    curve_gen = None
    if cfg.eval_generations:  # beside the corpus curve; depth and γ are chosen on these (below)
        events_gen = head_events(model, heads, held_gen, keep=held_keep, steps=steps)
        curve_gen = summarise_heads(events_gen, heads, layers, cfg.gammas)
        more_curves["depth_curve_generations_by_corpus"] = _curves_by_corpus(
            events_gen, cfg.train_corpora, [len(p) for p in gen_prompts], heads, layers, cfg.gammas)
        if cfg.eval_first_tokens is not None:  # a bench's length: the text before repeats set in
            events_first = first_events(events_gen, cfg.eval_first_tokens)  # the same pass, cut: no second one
            more_curves["depth_curve_generations_first"] = summarise_heads(events_first, heads, layers, cfg.gammas)
            more_curves["depth_curve_generations_first_by_corpus"] = _curves_by_corpus(
                events_first, cfg.train_corpora, [len(p) for p in gen_prompts], heads, layers, cfg.gammas)
        lap("held_out_generation_curves")
    trimmed_names = [f"k{k}" for k in cfg.exit_layers]
    # depth and γ from the curve nearest decode time: the held-out continuations' first tokens (on the
    # H200 it predicted 1.72x for k1 at γ 3 and 1.34x for k0, measured 1.60-1.78x and 1.36-1.43x, where
    # the corpus windows said 1.29x and 1.07x; bench/results/draft/h200-selfspec-five-f/), else their
    # whole, else the corpus windows
    curves = {"depth_curve_generations_first": more_curves.get("depth_curve_generations_first"),
              "depth_curve_generations": curve_gen, "depth_curve": curve}
    choice_curve, picked = next((name, c) for name, c in curves.items() if c is not None)
    best = max(trimmed_names, key=lambda n: max(picked[n]["predicted_speedup"].values()))
    gamma = picked[best]["best_gamma"] if cfg.gamma is None else cfg.gamma
    (fit_a, fit_c), (rep_a, rep_c) = _split_events(events[best]["agree"], events[best]["confidence"])
    stop = {"gamma": gamma, "gamma_from": choice_curve if cfg.gamma is None else "recipe",
            "calibrator": None}
    calibrator = None
    conf_rep = torch.tensor(_flat(rep_c), dtype=torch.float64)
    acc_rep = torch.tensor(_flat(rep_a))
    before = _acceptance_quality(conf_rep, acc_rep)
    thr_confs = fit_c
    if cfg.calibrator is not None:
        calibrator = fit_drafter_calibrator(_flat(fit_c), _flat(fit_a), method=cfg.calibrator,
                                            fitted_on={"windows": len(fit_a), "split": "validation"})
        cal_rep = calibrator(conf_rep.float()).double()
        stop["calibrator"] = calibrator.describe()
        stop["acceptance_calibration"] = {
            "events": int(conf_rep.numel()), "before": before,
            "after": _acceptance_quality(cal_rep, acc_rep)}
        thr_confs = [calibrator(torch.tensor(c)).tolist() for c in fit_c]
    else:
        stop["acceptance_calibration"] = {"events": int(conf_rep.numel()), "before": before}
    # the threshold is chosen on first drafts' confidences (for a deep head, later drafts are surer of
    # less: optimistic there); a stop is charged its host reads on the replay's upper count of drafts
    # (choose_threshold), so it is chosen only where it cuts enough drafts to pay for them
    choice = choose_threshold(fit_a, thr_confs, gamma, cost_per_draft(heads[best].exit_layer, layers))
    stop.update(threshold=choice["threshold"], predicted=choice)
    lap("calibrator_and_stop")
    shape = ({"prompt_tokens": p_len, "generate_tokens": g_len} if cfg.generation_prompts != "units" else
             {"prompt_tokens_max": p_len, "sequence_tokens": cfg.seq_len})
    generation_info = ({"source": cfg.train_source, "prompts": cfg.generation_prompts, **shape}
                       if cfg.train_source != "corpus" else {"source": "corpus"})
    if cfg.train_source != "corpus" and cfg.generation_prompts == "units":
        generation_info["prompt_lengths"] = _lengths(train_p)
    if cfg.eval_generations:
        generation_info["held_out_generations"] = {"prompts": cfg.generation_prompts, **shape,
                                                   "sequences": int(held_gen.shape[0]),
                                                   "first_tokens": cfg.eval_first_tokens}
        if cfg.generation_prompts == "units":
            generation_info["held_out_generations"]["prompt_lengths"] = _lengths(held_p)
    manifest = {"format": FORMAT, "target": {"source": getattr(model.config, "_name_or_path", None),
                                             **target_fingerprint(model)},
                "heads": {n: {"exit_layer": h.exit_layer, "vocab_size": h.vocab_size, "context": h.context,
                              **({} if h.mid_layer is None else {"mid_layer": h.mid_layer}),
                              **({"lm_rows": "trained"} if h.lm_rows_trained else {}),
                              "file": f"head-{n}.safetensors"} for n, h in heads.items()},
                "default": best, "gamma": gamma, "chosen_on": choice_curve,
                "confidence_threshold": choice["threshold"],
                "training": {**history, "corpora": cfg.train_corpora, "windows": int(train.shape[0]),
                             "held_out_windows": int(held.shape[0]), "documents_excluded": dropped,
                             **generation_info, "phase_seconds": phases,
                             **({"generation_cache": gen_seen} if gen_seen else {})},
                "depth_curve": curve, "stop": stop}
    if curve_gen is not None:
        manifest["depth_curve_generations"] = curve_gen
    manifest.update(more_curves)
    ctx.state.self_spec = SelfSpecResult(heads, manifest, calibrator, curve)
    return {"heads": list(heads), "default": best, "gamma": gamma, "chosen_on": choice_curve,
            "confidence_threshold": choice["threshold"],
            "training": manifest["training"], "depth_curve": curve,
            **({} if curve_gen is None else {"depth_curve_generations": curve_gen}), **more_curves, "stop": stop}


def write_self_spec(model, tokenizer, folder: Path, state, spec) -> None:
    result = state.self_spec
    if result is None:
        raise CompressError("export format self-spec needs a self_spec step in the recipe")
    for name, head in result.heads.items():
        head.save_as(folder, result.manifest["heads"][name]["file"])
    if result.calibrator is not None:
        result.calibrator.save(folder / CALIBRATOR_DIR)
    write_manifest(folder, result.manifest)


def load_self_spec(folder, target, head: str | None = None):
    """(ExitHead on the target's device, manifest, drafter calibrator or None) from a self-spec export."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("format") != FORMAT:
        raise CompressError(f"{folder} is not a self-spec drafter export (no {FORMAT} self_spec.json)")
    name = head or manifest["default"]
    if name not in manifest["heads"]:
        raise CompressError(f"{folder} has no head {name!r}; it has {', '.join(manifest['heads'])}")
    info = manifest["heads"][name]
    fp = {k: manifest["target"][k] for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                            "weights_sha256")}
    exit_head = ExitHead.load(target, folder / info["file"], info["exit_layer"], fp, info.get("context", "shallow"),
                              info.get("mid_layer"))
    cal_dir = folder / CALIBRATOR_DIR
    calibrator = load_lm_calibrator(cal_dir) if cal_dir.is_dir() else None
    return exit_head.to(next(target.parameters()).device), manifest, calibrator
