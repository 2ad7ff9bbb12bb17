"""The calibrator interface, the registry of calibrator types, and saving/loading without pickles.

A calibrator maps logits [N, C] to probabilities [N, C]:

    cal = make_calibrator("temperature").fit(logits, labels)   # torch or numpy
    probs = cal.transform(test_logits)
    cal.save("out/calibrator")            # folder: calibrator.json + calibrator.safetensors
    cal = load_calibrator("out/calibrator")

On disk a calibrator is its tensors (safetensors) plus a JSON header naming its
type, its validated config and its number of classes. Loading looks the type up
in ``CALIBRATORS`` (an allow-list: nothing else is ever constructed) and
re-validates the config, so a saved file can never run code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from calibration.checks import CalibrationError, as_tensor, check_fit_inputs, check_logits

FORMAT = "compress-calibrator"
FORMAT_VERSION = 1
STATE_FILE = "calibrator.safetensors"
HEADER_FILE = "calibrator.json"

CALIBRATORS: dict[str, type["Calibrator"]] = {}


class CalibratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def register_calibrator(name: str):
    def deco(cls):
        if name in CALIBRATORS:
            raise ValueError(f"calibrator {name!r} is registered twice")
        cls.name = name
        CALIBRATORS[name] = cls
        return cls
    return deco


class Calibrator:
    """Base class: subclasses set ``Config`` and implement ``_fit``, ``_transform``, ``_state``, ``_load_state``.

    ``_fit`` and ``_transform`` receive validated tensors on the caller's device;
    state tensors live where they were fitted and are moved to the input's
    device on use.
    """
    name: ClassVar[str] = "?"
    Config: ClassVar[type[CalibratorConfig]] = CalibratorConfig

    def __init__(self, config: CalibratorConfig | None = None, **kwargs):
        if config is not None and kwargs:
            raise CalibrationError(f"{type(self).__name__}: pass a config object or keyword options, not both")
        if config is None:
            try:
                config = self.Config(**kwargs)
            except ValidationError as exc:
                raise CalibrationError(f"bad options for calibrator {self.name!r}: {_pydantic_message(exc)}; "
                                       f"allowed options: {sorted(self.Config.model_fields)}") from exc
        self.config = config
        self.n_classes: int | None = None

    # -- public API -------------------------------------------------------------------------------
    def fit(self, logits, labels) -> "Calibrator":
        """Fit on a calibration split: logits [N, C] (or a 1-D binary score) and class ids [N]."""
        z, y = check_fit_inputs(logits, labels)
        self.n_classes = z.shape[1]
        self._fit(z, y)
        return self

    @torch.no_grad()
    def transform(self, logits) -> torch.Tensor:
        """Calibrated probabilities [N, C] (on the input's device) for logits [N, C] or a 1-D binary score."""
        if self.n_classes is None:
            raise CalibrationError(f"{type(self).__name__} is not fitted: call fit(logits, labels) first")
        z = check_logits(logits)
        if z.shape[1] != self.n_classes:
            raise CalibrationError(f"{type(self).__name__} was fitted on {self.n_classes} classes but the "
                                   f"logits have {z.shape[1]} columns")
        return self._transform(z)

    def fit_transform(self, logits, labels) -> torch.Tensor:
        return self.fit(logits, labels).transform(logits)

    @property
    def is_fitted(self) -> bool:
        return self.n_classes is not None

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "type": self.name,
                "config": self.config.model_dump(mode="json"), "n_classes": self.n_classes}

    def save(self, path) -> Path:
        """Write to a folder (calibrator.json + calibrator.safetensors) or, for a ``*.safetensors`` path,
        one file whose metadata holds the JSON header. Returns the path written."""
        if self.n_classes is None:
            raise CalibrationError(f"{type(self).__name__} is not fitted: there is nothing to save")
        path = Path(path)
        header = self.header()
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._state().items()}
        meta = {"calibrator": json.dumps(header, sort_keys=True)}
        if path.suffix == ".safetensors":
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(path), metadata=meta)
            return path
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / STATE_FILE), metadata=meta)
        (path / HEADER_FILE).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
        return path

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.model_dump().items())
        state = f"fitted on {self.n_classes} classes" if self.is_fitted else "not fitted"
        return f"{type(self).__name__}({opts}) [{state}]"

    # -- subclass hooks ---------------------------------------------------------------------------
    def _fit(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        raise NotImplementedError

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


def confidence_score(confidence, eps: float = 1e-7) -> torch.Tensor:
    """logit(c) of top-label confidences: the 1-D binary score for calibrating "is the prediction right"
    (a language model's next-token confidence, a drafter's acceptance). ``transform(score)[:, 1]`` is then
    the calibrated confidence. c is clamped to [eps, 1 − eps] so that c = 1 stays finite."""
    c = as_tensor(confidence, "confidence")
    c = (c if c.is_floating_point() else c.float()).clamp(eps, 1 - eps)
    return torch.log(c) - torch.log1p(-c)


def make_calibrator(name: str, **config) -> Calibrator:
    """A new, unfitted calibrator of a registered type; unknown names and options are rejected by name."""
    if name not in CALIBRATORS:
        raise CalibrationError(f"unknown calibrator {name!r}; allowed: {sorted(CALIBRATORS)}")
    return CALIBRATORS[name](**config)


def load_calibrator(path) -> Calibrator:
    """Load what ``Calibrator.save`` wrote (a folder or a ``*.safetensors`` file); no pickles involved."""
    path = Path(path)
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise CalibrationError(f"no calibrator at {str(path)!r}: expected a folder with {STATE_FILE} "
                               f"or a .safetensors file")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CalibrationError(f"{file} is not a readable safetensors file: {exc}") from exc
    if "calibrator" not in meta:
        raise CalibrationError(f"{file} has no calibrator header in its metadata (not written by Calibrator.save)")
    header = json.loads(meta["calibrator"])
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise CalibrationError(f"{file}: unsupported calibrator format {header.get('format')!r} "
                               f"version {header.get('version')!r} (this code reads {FORMAT!r} v{FORMAT_VERSION})")
    kind = header.get("type")
    if kind not in CALIBRATORS:
        raise CalibrationError(f"{file}: unknown calibrator type {kind!r}; allowed: {sorted(CALIBRATORS)}")
    cal = make_calibrator(kind, **header.get("config", {}))
    n_classes = header.get("n_classes")
    if not isinstance(n_classes, int) or n_classes < 2:
        raise CalibrationError(f"{file}: bad n_classes {n_classes!r} in the calibrator header")
    cal.n_classes = n_classes
    cal._load_state(state)
    return cal


def _pydantic_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors())
