"""Command line: ``python -m compress {models,validate,run,eval,draft-eval,draft-bench} ...``.

User errors (bad recipe, unknown model, unreachable registry) print one message
and exit 2; no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from compress.errors import CompressError
from compress.logs import configure_logging


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless it has none to show (a flag, which is off
    unless given; an option whose absence the help line explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if ("%(default)" in help or not action.option_strings or default is None or default is False
                or default == [] or default is argparse.SUPPRESS):
            return help
        return f"{help} (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    from compress import __version__

    p = argparse.ArgumentParser(prog="python -m compress", description=__doc__.splitlines()[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--version", action="version", version=f"compress {__version__}",
                   help="print the toolkit's version and exit")
    # --verbose / --log-file on every command (after its name): argparse gives a subcommand's
    # defaults precedence over the same option given before it, so they live on the subcommands only.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true",
                        help="also print the warnings some libraries print on import (torchao, torch), "
                             "which say nothing about the run")
    common.add_argument("--log-file", metavar="PATH",
                        help="write every log record of every library, with its time, level and logger, to PATH")

    def command(parent, name: str, help: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, description=help, parents=[common], formatter_class=_HelpFormatter)

    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="the model zoo: list, fetch", description="the model zoo",
                            formatter_class=_HelpFormatter)
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    command(msub, "list", "list zoo ids, their sizes and whether they are fetched")
    fetch = command(msub, "fetch", "download, verify and convert a zoo model")
    fetch.add_argument("id", help="a zoo id (python -m compress models list)")

    val = command(sub, "validate", "check a recipe without loading weights; exit 0 if valid, 2 otherwise")
    val.add_argument("recipe", help="a recipe YAML file")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value by its YAML path, e.g. --set stages[0].steps[0].bits=3; repeatable")

    run = command(sub, "run", "run a recipe and export the result")
    run.add_argument("recipe", help="a recipe YAML file")
    run.add_argument("--out", metavar="DIR", help="output folder, written atomically; required unless --dry-run")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe value by its YAML path, e.g. --set stages[0].steps[0].bits=3; repeatable")
    run.add_argument("--force", action="store_true", help="replace an existing output folder")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--dry-run", action="store_true",
                     help="validate, print what would run and an estimate of its cost (model size, "
                          "calibration and verify tokens, steps); load nothing, write nothing")
    run.add_argument("--no-baseline-cache", action="store_true",
                     help="evaluate the float baseline even when an earlier run of the same model and verify "
                          "settings cached it")

    ev = command(sub, "eval", "perplexity, NLL, top-1 accuracy and ECE of a model on a text")
    ev.add_argument("model", help="a zoo id, a Hugging Face folder or an export")
    src = ev.add_mutually_exclusive_group()
    src.add_argument("--text", help="a text file (.txt, or .jsonl with a 'text' field)")
    src.add_argument("--corpus", help="a named corpus (bbc, shakespeare, milton, stdlib); bbc without --text")
    ev.add_argument("--split", default="test", help="the corpus split (train, validation, test)")
    ev.add_argument("--seq-len", type=int, default=512, help="tokens per window")
    ev.add_argument("--max-windows", type=int, default=None, help="score at most N windows (default: every window)")
    ev.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    ev.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ev.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    ev.add_argument("--speed", action="store_true",
                    help="also weight bytes, peak memory, batch-1 decode tokens/s and the bandwidth roofline")
    ev.add_argument("--new-tokens", type=int, default=128, help="decoded tokens for --speed")
    ev.add_argument("--compile", action="store_true", help="--speed: compiled decode step (CUDA graphs on GPU)")
    ev.add_argument("--int4", action="store_true", help="run a gptq export's 4-bit linears on the int4 kernel")
    ev.add_argument("--topics", type=int, default=0, help="BBC test articles for zero-shot topic accuracy (0: none)")
    ev.add_argument("--no-calibrator", action="store_true",
                    help="ignore the calibrator an export ships (calibrator/): raw perplexity, NLL and ECE")
    ev.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="memory bandwidth for the roofline (default: the nominal figure of a known GPU)")
    ev.add_argument("--tasks", default=None, help="lm-evaluation-harness tasks, zero-shot on local data, e.g. "
                    "hellaswag,arc_easy,bbc_topics (the eval extra; compress/harness/README.md)")
    ev.add_argument("--task-limit", type=int, default=None, help="--tasks: a seeded subset of N documents per task")
    ev.add_argument("--tasks-out", default=None, help="--tasks: write lm-eval's own results JSON here")

    de = command(sub, "draft-eval", "teacher-forced drafter vs target: agreement, alpha, tau(gamma)")
    de.add_argument("--target", required=True, help="a zoo id or a model / export folder")
    de.add_argument("--drafter", required=True, help="a zoo id or a model / export folder")
    de.add_argument("--text", required=True, help="prompts: .txt (blank-line separated) or .jsonl ('text')")
    de.add_argument("--gammas", default="1,2,3,4,5,6,7,8", help="draft lengths, comma-separated")
    de.add_argument("--max-new-tokens", type=int, default=128,
                    help="target greedy continuation per prompt; 0 scores the prompts themselves")
    de.add_argument("--max-prompts", type=int, default=None, help="use at most N prompts (default: all)")
    de.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for alpha")
    de.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    de.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    de.add_argument("--head", default=None, help="a self-spec drafter export's head (default: the one it chose)")

    db = command(sub, "draft-bench", "tokens/s of the target alone vs speculative decoding (fast path)")
    db.add_argument("--target", required=True, help="a zoo id or a model / export folder")
    db.add_argument("--drafter", required=True, help="a zoo id or a model / export folder")
    db.add_argument("--prompts", required=True, help=".txt (blank-line separated) or .jsonl ('text')")
    db.add_argument("--gamma", type=int, default=None,
                    help="draft length (default: the one a self-spec drafter export chose, else 4)")
    db.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    db.add_argument("--max-prompts", type=int, default=None, help="use at most N prompts (default: all)")
    db.add_argument("--int4-drafter", action="store_true", help="run a gptq drafter's 4-bit linears on the int4 kernel")
    db.add_argument("--compile", action="store_true",
                    help="compiled decode steps (CUDA graphs on GPU; a self-spec head step compiled as one program there)")
    db.add_argument("--hf-baseline", action="store_true", help="also time generate(cache_implementation='static')")
    db.add_argument("--confidence-threshold", type=float, default=None,
                    help="stop a round's drafting when the drafter's top-1 probability (through the calibrator a "
                         "drafter export ships, if it maps drafter confidences) falls below this (default: fixed γ)")
    db.add_argument("--head", default=None,
                    help="a self-spec drafter export's head to use (default: the one it chose, e.g. k5)")
    db.add_argument("--tree", default=None,
                    help='a self-spec drafter drafts a static tree each round: "default" or a JSON list of rank '
                         'paths such as "[[0],[1],[0,0]]" (greedy; γ becomes the tree\'s depth; default: no tree)')
    db.add_argument("--repeats", type=int, default=1,
                    help="time every prompt this many times and keep the median run (damps timing jitter)")
    db.add_argument("--no-matched", action="store_true",
                    help="skip the matched target-alone reference (exact identity check) and pad no verify pass")
    db.add_argument("--out", default=None, help="folder for draft_bench.json and draft_bench.png (default: none)")
    db.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    db.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.out is None and not args.dry_run:
        parser.error("run: --out DIR is required (unless --dry-run)")
    configure_logging(verbose=args.verbose, log_file=args.log_file)
    try:
        return _dispatch(args)
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"error: {getattr(exc, 'cli_message', None) or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        hint = _resume_hint(args)
        if hint:
            print(hint, file=sys.stderr)
        return 130


def _resume_hint(args) -> str | None:
    """After Ctrl-C in `compress run`: how the run could resume next time, if the recipe allows it."""
    recipe = getattr(args, "_recipe", None)
    if getattr(args, "command", None) != "run" or recipe is None:
        return None
    if recipe.model.stream is not None:
        return "run the same command again: it resumes at the first block not yet written"
    try:
        from compress.plan import check_stream
        check_stream(recipe)
    except Exception:  # noqa: BLE001 - a recipe that cannot stream: no hint
        return None
    return ("this recipe could stream (model: {stream: true}): it then writes each block as it finishes and "
            "resumes after an interruption")


def _is_user_error(exc: BaseException) -> bool:
    """CompressError, or bad input to a calibrator: ``calibration`` is a library of its own whose
    errors are ValueErrors. It is looked up only if it was imported (then it could have raised)."""
    checks = sys.modules.get("calibration.checks")
    return isinstance(exc, CompressError) or (checks is not None and isinstance(exc, checks.CalibrationError))


def _dispatch(args) -> int:
    # Each command imports what it runs, when it runs: `validate` must not pay for torch.
    if args.command == "models":
        from compress.models import ZOO, fetch_model, zoo_rows
        if args.models_command == "list":
            for row in zoo_rows():
                mark = "fetched" if row["fetched"] else "-"
                print(f"{row['id']:<20} {row['kind']:<9} {row['bytes'] / 1e6:8.1f} MB  {mark:<7}  {row['description']}")
            return 0
        if args.id not in ZOO:
            raise CompressError(f"unknown zoo id {args.id!r}; known ids: {', '.join(ZOO)}")
        print(fetch_model(args.id))
        return 0

    if args.command == "validate":
        from compress.plan import check_plan
        from compress.recipe import load_recipe
        from compress.structure import model_structure
        recipe = load_recipe(args.recipe, args.overrides)
        structure, note = model_structure(recipe.model.id, trust_remote_code=recipe.model.trust_remote_code)
        check_plan(recipe, structure)
        steps = sum(len(s.steps) for s in recipe.stages)
        print(f"{args.recipe}: valid (model {recipe.model.id}, {len(recipe.stages)} stages, {steps} steps)"
              + (f"; {note}" if note else ""))
        return 0

    if args.command == "run":
        from compress.recipe import load_recipe
        from compress.summary import print_summary
        if args.quiet:  # transformers' own bars ("Loading weights") too; read when it is first imported
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if not args.dry_run:
            from compress.pipeline import run_recipe  # torch and transformers: not for a dry run
        recipe = args._recipe = load_recipe(args.recipe, args.overrides)  # _recipe: Ctrl-C's resume hint
        if args.dry_run:
            from compress.dry_run import format_plan, plan_run
            plan = plan_run(recipe, out_dir=args.out, force=args.force, reuse_baseline=not args.no_baseline_cache)
            print(format_plan(plan, args.recipe))
            return 0
        from compress.distributed import is_main, launch
        with launch(recipe.model.device):  # under torchrun: one process group (compress/distributed.py)
            result = run_recipe(recipe, out_dir=args.out, force=args.force, progress=not args.quiet,
                                reuse_baseline=not args.no_baseline_cache)
            if is_main():
                print_summary(result.report, result.out_dir)
        return 0

    if args.command == "eval":
        from compress.measure import evaluate_source
        result = evaluate_source(args.model, text=args.text, corpus=args.corpus, split=args.split,
                                 seq_len=args.seq_len, max_windows=args.max_windows, batch_size=args.batch_size,
                                 device=args.device, dtype=args.dtype, topics=args.topics,
                                 use_calibrator=not args.no_calibrator, int4=args.int4, speed=args.speed,
                                 new_tokens=args.new_tokens, compile=args.compile, bandwidth_gbs=args.bandwidth_gbs,
                                 tasks=args.tasks, task_limit=args.task_limit, tasks_out=args.tasks_out)
        print(json.dumps(result))
        return 0

    if args.command == "draft-eval":
        print(json.dumps(_draft_eval(args)))
        return 0

    if args.command == "draft-bench":
        result = _draft_bench(args)
        print(json.dumps(result))
        return 0
    raise AssertionError(args.command)


def _draft_eval(args) -> dict:
    """Load the target and the drafter (a model, or a self-spec export's head on the target's own
    blocks) and run draft-eval's teacher-forced pass (compress/draft/agreement.py)."""
    from compress.draft.agreement import draft_eval, parse_gammas, read_prompts
    from compress.draft.selfspec.head import read_manifest
    from compress.draft.speculative import check_same_vocabulary
    from compress.models import load_model
    from compress.runtime import resolve_device

    gammas = parse_gammas(args.gammas)
    prompts = read_prompts(args.text, args.max_prompts)
    device = resolve_device(args.device)
    t = load_model(args.target, dtype=args.dtype, device=device)
    if read_manifest(args.drafter) is not None:
        from compress.draft.selfspec.head import HeadAsModel
        from compress.draft.selfspec.step import load_self_spec
        head, _, _ = load_self_spec(args.drafter, t.model, args.head)
        drafter = HeadAsModel(t.model, head)
    else:
        d = load_model(args.drafter, dtype=args.dtype, device=device)
        check_same_vocabulary(t.tokenizer, d.tokenizer)
        drafter = d.model
    ids = [t.tokenizer(p, return_attention_mask=False)["input_ids"] for p in prompts]
    eos = getattr(getattr(t.model, "generation_config", None), "eos_token_id", None)
    result = draft_eval(t.model, drafter, ids, gammas=gammas, temperature=args.temperature,
                        max_new_tokens=args.max_new_tokens, eos_token_id=eos)
    return {"target": args.target, "drafter": args.drafter, "text": args.text,
            "max_new_tokens": args.max_new_tokens, "eos_token_id": eos, **result}


def _draft_bench(args) -> dict:
    """Load the target and the drafter (a model, a GPTQ export with --int4-drafter, or a self-spec
    export), build their decoders and time them (compress/draft/bench.py)."""
    # Imported here, as every command's code is: the CLI must start without torch for `validate`.
    import torch

    from compress.draft.agreement import read_prompts
    from compress.draft.bench import draft_bench, write_bench
    from compress.draft.decoders import cache_len, model_decoder, self_spec_pair, target_engine
    from compress.draft.selfspec.head import read_manifest
    from compress.draft.speculative import check_gamma, check_same_vocabulary
    from compress.models import load_model
    from compress.runtime import resolve_device, versions

    manifest = read_manifest(args.drafter)
    # a self-spec export ships the draft length its recipe chose; anything else drafts 4 unless told
    gamma = check_gamma(args.gamma if args.gamma is not None else manifest.get("gamma", 4) if manifest else 4)
    tree = None
    if args.tree is not None:
        import json

        from compress.draft.selfspec.tree import as_tree
        try:
            tree = as_tree(args.tree if args.tree == "default" else json.loads(args.tree))
        except (ValueError, TypeError) as exc:
            raise CompressError(f"--tree {args.tree!r}: expected \"default\" or a JSON list of rank lists ({exc})")
        if manifest is None:
            raise CompressError("--tree is for a self-spec drafter export (its heads draft the tree)")
    device = resolve_device(args.device)
    texts = read_prompts(args.prompts, args.max_prompts)
    t = load_model(args.target, dtype=args.dtype, device=device)
    ids = [t.tokenizer(p, return_attention_mask=False)["input_ids"] for p in texts]
    max_len = cache_len([len(i) for i in ids], args.max_new_tokens, gamma + (tree.size if tree else 0))
    compile = args.compile
    info: dict = {"target": args.target, "drafter": args.drafter, "prompts_file": args.prompts}
    calibrator = teacher = None
    if manifest is not None:  # a self-spec drafter: heads on the target's own blocks
        from compress.draft.selfspec.head import HeadAsModel
        from compress.draft.selfspec.step import load_self_spec
        if args.int4_drafter:
            raise CompressError("--int4-drafter is for GPTQ exports; a self-spec drafter runs the target's own blocks")
        head, manifest, calibrator = load_self_spec(args.drafter, t.model, args.head)
        engine = target_engine(t.model, max_len, compile=compile)
        target, drafter = self_spec_pair(engine, head, compile=compile, tree=tree)
        teacher = HeadAsModel(t.model, head)
        info["self_spec"] = {"head": args.head or manifest["default"], "exit_layer": head.exit_layer,
                             "vocab_size": head.vocab_size, "fused_head": drafter.pair.fuse_head,
                             "tree": None if tree is None else [list(c) for c in tree.choices]}
    else:
        d = load_model(args.drafter, dtype=args.dtype, device=device)
        check_same_vocabulary(t.tokenizer, d.tokenizer)
        if args.int4_drafter:
            from compress.quantize.int4 import int4_linears_from_gptq
            int4 = int4_linears_from_gptq(d.model, d.path)
            info["int4_drafter"] = {"linears": len(int4["converted"]), "kept_float": len(int4["kept_float"])}
        calibrator = d.calibrator if getattr(d.calibrator, "target", None) == "drafter" else None
        target = model_decoder(t.model, max_len, compile=compile, name="target",
                               step_shapes={(1, 1), (gamma + 1, gamma + 1)})
        drafter = model_decoder(d.model, max_len, compile=compile, name="drafter")
        teacher = d.model
    result = draft_bench(target, drafter, ids, gamma=gamma, max_new_tokens=args.max_new_tokens,
                         confidence_threshold=args.confidence_threshold,
                         calibrator=calibrator if args.confidence_threshold is not None else None,
                         teacher_drafter=teacher, target_model=t.model, hf_baseline=args.hf_baseline,
                         matched=not args.no_matched, tree=tree is not None, repeats=args.repeats)
    machine = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch_threads": torch.get_num_threads(), **versions()}
    result = {**info, "dtype": args.dtype, "compile": bool(compile),
              "decoders": {"target": type(target).__name__, "drafter": type(drafter).__name__},
              "machine": machine, **result}
    if args.out:
        write_bench(result, args.out)
    return result
