"""The calibrator an export ships: ``LMCalibrator`` (a fitted ``calibration`` calibrator and what it
applies to) and its files in the export's ``calibrator/`` folder.

The ``recalibrate`` step fits one (``compress.recalibrate``); the export writes it here; the loader
attaches it to the model it loads (``LoadedModel.calibrator``); verify and ``compress eval`` score
through it. Files: ``calibrator.json`` + ``calibrator.safetensors`` (the calibrator's own, see
``calibration/``) and ``lm_use.json`` (target, form, what it was fitted on). No pickles.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from calibration import confidence_score, load_calibrator
from compress.errors import CompressError
from compress.formats.registry import is_export
from compress.fs import write_json_atomic

CALIBRATOR_DIR = "calibrator"  # export subfolder: calibrator.json + calibrator.safetensors + lm_use.json
USE_FILE = "lm_use.json"  # what the calibrator applies to (target, form) and what it was fitted on


@dataclass
class LMCalibrator:
    """A fitted calibrator and what it applies to.

    ``form == "logits"``: ``calibrator.transform`` takes the logits (full vocabulary for a tokens
    temperature, [N, 5] for topics). ``form == "top_label"``: it takes the 1-D score
    logit(confidence) and its class-1 probability is the calibrated confidence.
    """

    calibrator: Any  # calibration.Calibrator, fitted
    target: Literal["tokens", "topics", "drafter"]
    form: Literal["logits", "top_label"]
    fitted_on: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.calibrator.name

    @property
    def temperature(self) -> float | None:
        """T when this is a pure temperature on the logits (it can ship as generation temperature)."""
        return self.calibrator.temperature if self.name == "temperature" and self.form == "logits" else None

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of any shape [..., V] divided by T for a pure temperature; unchanged otherwise."""
        t = self.temperature
        return logits if t is None else logits / t

    def confidence(self, conf: torch.Tensor) -> torch.Tensor:
        """Calibrated top-1 confidences (same shape, device and dtype) for the top-label form; a pure
        temperature has already acted through ``scale_logits``, so confidences pass unchanged."""
        if self.form != "top_label":
            return conf
        flat = conf.reshape(-1)
        return self.calibrator.transform(confidence_score(flat))[:, 1].to(conf.dtype).view_as(conf)

    __call__ = confidence  # a drafter calibrator: raw confidences -> calibrated (compress.draft's Calibrator)

    def transform(self, logits) -> torch.Tensor:
        """Calibrated probabilities [N, C] for logits [N, C] (the ``logits`` form, e.g. topics)."""
        if self.form != "logits":
            raise CompressError(f"this {self.name} calibrator maps top-1 confidences ({self.target}, top_label "
                                f"form), not logits; use .confidence(c)")
        return self.calibrator.transform(logits)

    def describe(self) -> dict:
        out = {"method": self.name, "target": self.target, "form": self.form, "fitted_on": self.fitted_on}
        if self.temperature is not None:
            out["temperature"] = self.temperature
        return out

    def save(self, folder) -> Path:
        folder = Path(folder)
        self.calibrator.save(folder)
        (folder / USE_FILE).write_text(json.dumps({"target": self.target, "form": self.form,
                                                   "fitted_on": self.fitted_on}, indent=2) + "\n")
        return folder


def load_lm_calibrator(folder) -> LMCalibrator:
    """Read what ``LMCalibrator.save`` wrote (no pickles: safetensors + JSON)."""
    folder = Path(folder)
    use_file = folder / USE_FILE
    if not use_file.is_file():
        raise CompressError(f"{folder} has no {USE_FILE}: not a calibrator written by the recalibrate step")
    use = json.loads(use_file.read_text())
    target, form = use.get("target"), use.get("form")
    if target not in ("tokens", "topics", "drafter") or form not in ("logits", "top_label"):
        raise CompressError(f"{use_file}: bad target/form {target!r}/{form!r}; allowed targets tokens, topics, "
                            f"drafter and forms logits, top_label")
    cal = load_calibrator(folder)
    if target == "tokens" and form == "logits" and cal.name != "temperature":
        raise CompressError(f"{use_file}: only a temperature can act on a vocabulary's logits, got {cal.name!r}")
    return LMCalibrator(cal, target, form, use.get("fitted_on", {}))


def attached_calibrator(model_dir) -> LMCalibrator | None:
    """The calibrator a toolkit export ships (``<dir>/calibrator/``), or None (also for folders that are
    not exports of this toolkit, whose ``calibrator/`` would be someone else's)."""
    folder = Path(model_dir) / CALIBRATOR_DIR
    return load_lm_calibrator(folder) if folder.is_dir() and is_export(model_dir) else None


def write_calibrator(folder: Path, calibrator: LMCalibrator) -> None:
    """The recalibrate step's calibrator in ``calibrator/``; a pure next-token temperature also becomes
    ``generation_config.json``'s ``temperature``, so sampling with the export's defaults draws from
    softmax(z / T) (greedy decoding is unchanged; transformers warns that temperature is unused
    while do_sample is false). A model written without a generation config gets none: one holding only
    a temperature would hide the defaults transformers derives from config.json (eos, bos)."""
    calibrator.save(folder / CALIBRATOR_DIR)
    gen_file = folder / "generation_config.json"
    if calibrator.target == "tokens" and calibrator.temperature is not None and gen_file.is_file():
        gen = {**json.loads(gen_file.read_text()), "temperature": calibrator.temperature}
        gen.pop("_from_model_config", None)  # no longer what transformers derived from config.json
        write_json_atomic(gen_file, gen)
