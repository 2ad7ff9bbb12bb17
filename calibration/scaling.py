"""Parametric scaling calibrators fitted by minimising NLL with L-BFGS.

- Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
  Networks"): p = softmax(z / T), one scalar; T = exp(θ) so it stays positive.
  Accuracy is unchanged. A pure temperature can ship as a generation-config
  ``temperature``.
- Vector scaling (Guo et al. 2017): p = softmax(w ⊙ z + b), w, b ∈ R^C.
- Matrix scaling (Guo et al. 2017) with ODIR regularisation (Kull et al. 2019,
  "Beyond temperature scaling: obtaining well-calibrated multiclass
  probabilities with Dirichlet calibration"): p = softmax(W z + b), loss =
  NLL + λ_od · mean_{i≠j} W_ij² + λ_b · mean_j b_j². O(C²) parameters, so it is
  for classifiers with few classes, not for a vocabulary.
- Platt scaling (Platt 1999), binary only: p₁ = σ(a·s + b) with s = z₁ − z₀
  (or the 1-D score itself); optional Platt targets (N₊+1)/(N₊+2), 1/(N₋+2).

Parameters are float64 and are cast to the logits' dtype on use; every tensor
stays on the logits' device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from calibration.base import Calibrator, CalibratorConfig, register_calibrator
from calibration.checks import CalibrationError


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _lbfgs(params: list[torch.Tensor], loss_fn, max_iter: int) -> float:
    """Minimise ``loss_fn()`` over ``params`` with one strong-Wolfe L-BFGS run; returns the final loss."""
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-12, history_size=20)

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        final = float(loss_fn())
    if not math.isfinite(final):
        raise CalibrationError(f"the NLL fit diverged (loss {final}); check the logits for extreme values")
    return final


class ScalingConfig(CalibratorConfig):
    max_iter: int = Field(200, ge=1, le=10_000, description="L-BFGS iterations")


@register_calibrator("temperature")
class TemperatureScaling(Calibrator):
    """softmax(z / T) with T fitted by NLL; ``.temperature`` is T as a float."""
    Config = ScalingConfig

    def _fit(self, z, y):
        dt = _compute_dtype(z)
        log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
        zc = z.to(dt)
        _lbfgs([log_t], lambda: F.cross_entropy(zc / log_t.exp().to(dt), y), self.config.max_iter)
        self.log_temperature = log_t.detach()

    def _transform(self, z):
        dt = _compute_dtype(z)
        return torch.softmax(z.to(dt) / self.log_temperature.to(z.device).exp().to(dt), dim=1)

    @property
    def temperature(self) -> float:
        if not self.is_fitted:
            raise CalibrationError("TemperatureScaling is not fitted: call fit(logits, labels) first")
        return float(self.log_temperature.exp())

    def header(self):
        return {**super().header(), "temperature": self.temperature}

    def _state(self):
        return {"log_temperature": self.log_temperature}

    def _load_state(self, state):
        self.log_temperature = state["log_temperature"]


@register_calibrator("vector")
class VectorScaling(Calibrator):
    """softmax(w ⊙ z + b), one scale and one bias per class."""
    Config = ScalingConfig

    def _fit(self, z, y):
        dt = _compute_dtype(z)
        c = z.shape[1]
        w = torch.ones(c, dtype=torch.float64, device=z.device, requires_grad=True)
        b = torch.zeros(c, dtype=torch.float64, device=z.device, requires_grad=True)
        zc = z.to(dt)
        _lbfgs([w, b], lambda: F.cross_entropy(zc * w.to(dt) + b.to(dt), y), self.config.max_iter)
        self.weight, self.bias = w.detach(), b.detach()

    def _transform(self, z):
        dt = _compute_dtype(z)
        return torch.softmax(z.to(dt) * self.weight.to(z.device, dt) + self.bias.to(z.device, dt), dim=1)

    def _state(self):
        return {"weight": self.weight, "bias": self.bias}

    def _load_state(self, state):
        self.weight, self.bias = state["weight"], state["bias"]


class MatrixScalingConfig(ScalingConfig):
    off_diagonal_l2: float = Field(1e-2, ge=0, description="λ_od on the mean squared off-diagonal entry of W")
    bias_l2: float = Field(1e-2, ge=0, description="λ_b on the mean squared bias")
    max_classes: int = Field(1024, ge=2, description="refuse more classes than this (W is C×C)")


@register_calibrator("matrix")
class MatrixScaling(Calibrator):
    """softmax(W z + b) with ODIR (off-diagonal and intercept) L2 regularisation; W starts at the identity."""
    Config = MatrixScalingConfig

    def _fit(self, z, y):
        cfg = self.config
        c = z.shape[1]
        if c > cfg.max_classes:
            raise CalibrationError(f"matrix scaling on {c} classes needs a {c}×{c} matrix (max_classes="
                                   f"{cfg.max_classes}); use 'temperature' or 'vector' for large label sets")
        dt = _compute_dtype(z)
        W = torch.eye(c, dtype=torch.float64, device=z.device).requires_grad_(True)
        b = torch.zeros(c, dtype=torch.float64, device=z.device, requires_grad=True)
        off = ~torch.eye(c, dtype=torch.bool, device=z.device)
        zc = z.to(dt)

        def loss():
            nll = F.cross_entropy(zc @ W.to(dt).T + b.to(dt), y)
            return nll + cfg.off_diagonal_l2 * W[off].pow(2).mean() + cfg.bias_l2 * b.pow(2).mean()

        _lbfgs([W, b], loss, cfg.max_iter)
        self.weight, self.bias = W.detach(), b.detach()

    def _transform(self, z):
        dt = _compute_dtype(z)
        return torch.softmax(z.to(dt) @ self.weight.to(z.device, dt).T + self.bias.to(z.device, dt), dim=1)

    def _state(self):
        return {"weight": self.weight, "bias": self.bias}

    def _load_state(self, state):
        self.weight, self.bias = state["weight"], state["bias"]


class PlattConfig(ScalingConfig):
    platt_targets: bool = Field(False, description="fit to Platt's smoothed targets instead of 0/1")


@register_calibrator("platt")
class PlattScaling(Calibrator):
    """Binary: p₁ = σ(a·(z₁ − z₀) + b). Give [N, 2] logits or a 1-D score (the logit of class 1)."""
    Config = PlattConfig

    def _fit(self, z, y):
        if z.shape[1] != 2:
            raise CalibrationError(f"platt scaling is binary: got {z.shape[1]} classes; use 'temperature', "
                                   f"'vector' or 'matrix' for more than two")
        dt = _compute_dtype(z)
        s = (z[:, 1] - z[:, 0]).to(dt)
        target = y.to(dt)
        if self.config.platt_targets:
            n_pos = float(y.sum())
            n_neg = y.numel() - n_pos
            target = torch.where(y == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2)).to(dt)
        ab = torch.tensor([1.0, 0.0], dtype=torch.float64, device=z.device, requires_grad=True)
        _lbfgs([ab], lambda: F.binary_cross_entropy_with_logits(s * ab[0].to(dt) + ab[1].to(dt), target),
               self.config.max_iter)
        self.scale_bias = ab.detach()

    def _transform(self, z):
        dt = _compute_dtype(z)
        ab = self.scale_bias.to(z.device, dt)
        u = (z[:, 1] - z[:, 0]).to(dt) * ab[0] + ab[1]
        return torch.stack([torch.sigmoid(-u), torch.sigmoid(u)], dim=1)

    def _state(self):
        return {"scale_bias": self.scale_bias}

    def _load_state(self, state):
        self.scale_bias = state["scale_bias"]
