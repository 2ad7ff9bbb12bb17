"""The tables ``compress run`` prints at the end: quality before and after (and, for a recipe that
recalibrates, the compressed model both raw and through its calibrator), the model's size before
and after, and each phase's time and peak memory. Everything comes from the report.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compress.sizes import human_bytes

_QUANTIZING = {"rtn", "gptq", "gptq_mixed"}


def quality_rows(report: dict) -> list[tuple[str, dict]]:
    """(label, metrics) per row: the float model, then the compressed one — split in two when a
    calibrator was fitted: raw, and through the calibrator (its effect, apart from compression's)."""
    rows = []
    if report.get("baseline"):
        cached = report.get("baseline_cache", {}).get("hit")
        rows.append(("float (before)" + (", cached" if cached else ""), report["baseline"]))
    v = report.get("verify")
    if not v:
        return rows
    if "calibrator" not in v:
        return rows + [("compressed", v)]
    raw = dict(v)
    raw.update(v.get("uncalibrated", {}))  # next-token scores before the calibrator (tokens target)
    topics_raw = v.get("topics", {}).get("uncalibrated")
    if topics_raw:  # topic scores before the calibrator (topics target)
        raw.update(accuracy=topics_raw["accuracy"], topics_ece=topics_raw["ece"])
    name = v["calibrator"].get("method") or v["calibrator"].get("name") or "calibrator"
    return rows + [("compressed, raw", raw), (f"compressed + {name}", v)]


def print_summary(report: dict, out_dir: Path | None, console: Console | None = None) -> None:
    console = console or Console()
    if "verify" in report:
        v = report["verify"]
        t = Table(title=f"{report['model']['source']}: {v['corpus']}/{v['split']} ({v['tokens']} tokens, {v['window']})")
        t.add_column("model")
        columns = [("perplexity", "perplexity", "{:.3f}"), ("nll", "nll", "{:.4f}"),
                   ("top-1 acc", "top1_accuracy", "{:.4f}"), ("ECE", "ece", "{:.4f}")]
        if "accuracy" in v:  # zero-shot BBC-topic accuracy, measured with verify.topics
            columns += [("topic acc", "accuracy", "{:.4f}"), ("topic ECE", "topics_ece", "{:.4f}")]
        for title, _, _ in columns:
            t.add_column(title, justify="right")
        for label, row in quality_rows(report):
            t.add_row(label, *(fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in columns))
        console.print(t)
    if "size" in report:
        console.print(_size_table(report, out_dir))
    console.print(_phase_table(report))
    if out_dir is not None:
        console.print(f"wrote {out_dir} (model, recipe.yaml, report.json)")


def _size_table(report: dict, out_dir: Path | None) -> Table:
    size = report["size"]
    t = Table(title="model size")
    for col in ("", "before", "after", "before / after"):
        t.add_column(col, justify="right" if col else "left")
    for kind, label in (("disk", "weights on disk"), ("memory", "in memory")):
        before, after = size["before"].get(f"{kind}_bytes"), size["after"].get(f"{kind}_bytes")
        if before is None and after is None:
            continue
        ratio = size.get(f"{kind}_ratio")
        t.add_row(label, human_bytes(before), human_bytes(after), f"{ratio:.2f}x" if ratio else "-")
    quantized = any(s.get("algorithm") in _QUANTIZING for st in report.get("stages", []) for s in st.get("steps", []))
    if quantized and _export_format(out_dir) == "hf":
        t.caption = ("format hf stores the quantized weights as floats; "
                     "export.format gptq or compressed-tensors packs them")
    elif quantized:
        t.caption = "in memory: the run's model, with quantized weights held as floats"
    return t


def _phase_table(report: dict) -> Table:
    host, device = report.get("peak_host_mb", {}), report.get("peak_device_mb", {})
    t = Table(title="time and peak memory per phase"
              + ("" if report.get("peak_host_per_phase", True) else " (CPU: the process's peak so far)"))
    t.add_column("phase")
    t.add_column("seconds", justify="right")
    t.add_column("peak CPU MB", justify="right")
    if device:
        t.add_column("peak GPU MB", justify="right")
    for key, secs in report.get("timings", {}).items():
        cells = [key, f"{secs:.1f}", f"{host[key]:,.0f}" if key in host else "-"]
        if device:
            cells.append(f"{device[key]:,.0f}" if key in device else "-")
        t.add_row(*cells)
    return t


def _export_format(out_dir: Path | None) -> str | None:
    marker = Path(out_dir) / "compress_export.json" if out_dir is not None else None
    if marker is None or not marker.is_file():
        return None
    return json.loads(marker.read_text()).get("format")
