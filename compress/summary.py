"""The short table ``compress run`` prints at the end."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(report: dict, out_dir: Path | None) -> None:
    console = Console()
    if "verify" in report:
        t = Table(title=f"{report['model']['source']}: {report['verify']['corpus']}/{report['verify']['split']} "
                        f"({report['verify']['tokens']} tokens, {report['verify']['window']})")
        t.add_column("model")
        for col in ("perplexity", "nll", "top-1 acc", "ECE"):
            t.add_column(col, justify="right")
        rows = [("before", report.get("baseline")), ("after", report["verify"])]
        for name, r in rows:
            if r:
                t.add_row(name, f"{r['perplexity']:.3f}", f"{r['nll']:.4f}", f"{r['top1_accuracy']:.4f}", f"{r['ece']:.4f}")
        console.print(t)
    timing = Table(title="time per stage (s)")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for key, secs in report.get("timings", {}).items():
        timing.add_row(key, f"{secs:.1f}")
    console.print(timing)
    if out_dir is not None:
        console.print(f"wrote {out_dir} (model, recipe.yaml, report.json)")
