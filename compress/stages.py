"""The pieces every run is made of, in memory (``compress.pipeline``) or streamed
(``compress.stream_run``): the result, the phase timer, the recipe's model settings and the stages."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from compress import host_memory
from compress.algorithms import ALGORITHMS, StepContext
from compress.layout import BlockLayout, pin_layout
from compress.moe import set_routing
from compress.recipe import CalibrationSpec, Recipe
from compress.state import RunState

__all__ = ["PhaseTimer", "RunResult", "apply_stages", "configure_model"]


@dataclass
class RunResult:
    model: torch.nn.Module
    tokenizer: Any
    recipe: Recipe  # fully resolved
    report: dict
    out_dir: Path | None = None
    state: RunState = field(default_factory=RunState)  # what the steps left: quantized levels, adapters, calibrator


class PhaseTimer:
    """Wall time per phase, the peak resident host memory within each phase (``compress.host_memory``)
    and, on CUDA, the peak allocated device memory within each phase (the final move of the whole
    model to the device, after the stages, belongs to no phase)."""

    def __init__(self, device: torch.device | None = None):
        self.timings: dict[str, float] = {}
        self.peak_device_mb: dict[str, float] = {}
        self.peak_host_mb: dict[str, float] = {}
        self.host_per_phase = True  # False where the host peak cannot be reset (then: process peak so far)
        self._cuda = device if device is not None and device.type == "cuda" else None
        self._open: tuple[str, float, float] | None = None  # the phase running now: key, start, time before

    @contextmanager
    def __call__(self, key: str):
        self.start(key)
        try:
            yield
        finally:
            self.stop()

    def start(self, key: str) -> None:
        self.host_per_phase = host_memory.reset_peak() and self.host_per_phase
        if self._cuda is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda)
        self._open = (key, time.perf_counter(), self.timings.get(key, 0.0))

    def stop(self) -> None:
        if self._open is None:
            return
        key, t0, before = self._open
        self._open = None
        self.timings[key] = round(before + time.perf_counter() - t0, 3)
        host = host_memory.peak_mb()
        if host is not None:
            self.peak_host_mb[key] = round(max(host, self.peak_host_mb.get(key, 0.0)), 1)
        if self._cuda is not None:
            peak = torch.cuda.max_memory_allocated(self._cuda) / 2**20
            self.peak_device_mb[key] = round(max(peak, self.peak_device_mb.get(key, 0.0)), 1)


def configure_model(model, recipe: Recipe) -> None:
    """What the recipe says about the model beyond its weights: a hand-written block layout, and how
    a mixture of experts feeds its experts' calibration statistics."""
    if recipe.model.layout is not None:
        layout = recipe.model.layout
        pin_layout(model, BlockLayout(layout.blocks, tuple(tuple(s) for s in layout.subsets)))
    spec = recipe.calibration or CalibrationSpec()
    set_routing(model, spec.expert_routing, spec.expert_min_tokens)


def apply_stages(model, recipe: Recipe, ctx: StepContext, log, timer=None) -> list[dict]:
    ctx.keep_float_weights = any(ALGORITHMS[step.algorithm].uses_float_weights
                                 for s in recipe.stages for step in s.steps)
    reports = []
    for si, stage in enumerate(recipe.stages):
        stage_report = {"name": stage.name, "steps": []}
        with timer(f"stage:{stage.name}") if timer else nullcontext():
            for ki, step in enumerate(stage.steps):
                # A streamed model resumes inside the step: its source knows the blocks already written.
                ctx.where = f"stages[{si}].steps[{ki}] ({step.algorithm})"
                t0 = time.perf_counter()
                log(f"stage {stage.name!r}: {step.algorithm}")
                result = ALGORITHMS[step.algorithm].apply(model, step, ctx)
                stage_report["steps"].append({"algorithm": step.algorithm, "config": step.model_dump(mode="json"),
                                              "seconds": round(time.perf_counter() - t0, 3), **result})
        reports.append(stage_report)
    return reports
