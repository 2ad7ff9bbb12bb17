"""Non-parametric calibrators on probabilities: histogram binning and isotonic regression.

Both learn a map f: [0, 1] → [0, 1] from events (p, y) where p = softmax(z)
is a predicted probability and y whether the event happened. Multi-class
inputs use one of two reductions (``mode``):

- ``one_vs_rest`` (Zadrozny & Elkan 2002; netcal's multi-class behaviour):
  one map per class k on (p_k, 1[y = k]); the calibrated row is f_k(p_k)
  renormalised to sum to 1 (a row that maps to all zeros keeps its input
  probabilities). For C = 2 a single map on class 1 is fitted and p₀ = 1 − p₁.
- ``top_label`` (Gupta & Ramdas 2022, "Top-label calibration"): one map on
  (max_k p_k, prediction correct); the predicted class gets f(max p) and the
  other classes share 1 − f(max p) in proportion to their input probabilities.
  This is what top-label ECE measures, but a small f(max p) can hand the
  argmax to another class.

Outputs are clipped to [``clip``, 1 − ``clip``] before renormalising so that a
bin with no positives does not produce a probability of exactly 0 (infinite NLL).

- Histogram binning (Zadrozny & Elkan 2001): ``n_bins`` bins, equal-width or
  equal-mass (edges at the quantiles of the fit probabilities), right-closed;
  a bin's value is the frequency of y in it, an empty bin's value its midpoint.
- Isotonic regression (Zadrozny & Elkan 2002) via scikit-learn's
  ``IsotonicRegression``; only its breakpoints are kept, and transform
  interpolates them linearly in torch (the same as sklearn's predict with
  ``out_of_bounds="clip"``), on the input's device.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from calibration.base import Calibrator, CalibratorConfig, register_calibrator


class BinaryMapConfig(CalibratorConfig):
    mode: Literal["one_vs_rest", "top_label"] = "one_vs_rest"
    clip: float = Field(1e-6, ge=0, lt=0.5, description="keep calibrated probabilities in [clip, 1 - clip]")


def _events(p: torch.Tensor, y: torch.Tensor, mode: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (probability, outcome) event sets, one per map to fit."""
    if mode == "top_label":
        conf, pred = p.max(dim=1)
        return [(conf, (pred == y).to(p.dtype))]
    if p.shape[1] == 2:
        return [(p[:, 1], (y == 1).to(p.dtype))]
    return [(p[:, k], (y == k).to(p.dtype)) for k in range(p.shape[1])]


def _assemble(p: torch.Tensor, mapped: list[torch.Tensor], mode: str, clip: float) -> torch.Tensor:
    """Calibrated [N, C] rows from the mapped event probabilities."""
    mapped = [m.clamp(clip, 1 - clip) for m in mapped]
    if mode == "top_label":
        pred = p.argmax(dim=1, keepdim=True)
        top = mapped[0][:, None]
        others = p.scatter(1, pred, 0.0)
        rest = others.sum(dim=1, keepdim=True)
        # Share 1 − f(max p) among the others in proportion to p; if they had nothing, share it equally.
        equal = torch.full_like(p, 1.0 / (p.shape[1] - 1)).scatter(1, pred, 0.0)
        share = torch.where(rest > 0, others / rest.clamp_min(1e-30), equal)
        return (share * (1 - top)).scatter(1, pred, top)
    if len(mapped) == 1:  # binary one-vs-rest: the class-1 map only
        return torch.stack([1 - mapped[0], mapped[0]], dim=1)
    q = torch.stack(mapped, dim=1)
    total = q.sum(dim=1, keepdim=True)
    return torch.where(total > 0, q / total.clamp_min(1e-30), p)


def _probs(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z.to(torch.float64 if z.dtype == torch.float64 else torch.float32), dim=1)


class HistogramConfig(BinaryMapConfig):
    n_bins: int = Field(15, ge=1, le=100_000)
    strategy: Literal["equal_width", "equal_mass"] = "equal_width"


@register_calibrator("histogram")
class HistogramBinning(Calibrator):
    """Replace a probability by the outcome frequency of its bin."""
    Config = HistogramConfig

    def _fit(self, z, y):
        cfg = self.config
        p = _probs(z)
        edges, values = [], []
        for prob, hit in _events(p, y, cfg.mode):
            prob, hit = prob.double(), hit.double()
            if cfg.strategy == "equal_width":
                e = torch.linspace(0, 1, cfg.n_bins + 1, dtype=torch.float64, device=p.device)
            else:
                srt = prob.sort().values
                pos = torch.linspace(0, srt.numel() - 1, cfg.n_bins + 1, device=p.device).round().long()
                e = srt[pos].clone()
                e[0], e[-1] = 0.0, 1.0
                e = torch.cummax(e, dim=0).values
            idx = torch.bucketize(prob.clamp(0, 1), e[1:-1], right=False)
            count = torch.bincount(idx, minlength=cfg.n_bins).double()
            hits = torch.bincount(idx, weights=hit, minlength=cfg.n_bins)
            mid = (e[:-1] + e[1:]) / 2
            values.append(torch.where(count > 0, hits / count.clamp_min(1), mid))
            edges.append(e)
        self.edges, self.values = torch.stack(edges), torch.stack(values)

    def _transform(self, z):
        p = _probs(z)
        edges, values = self.edges.to(p.device), self.values.to(p.device)
        mapped = []
        for (prob, _), e, v in zip(_events(p, torch.zeros(len(p), dtype=torch.long, device=p.device),
                                           self.config.mode), edges, values):
            idx = torch.bucketize(prob.double().clamp(0, 1), e[1:-1], right=False)
            mapped.append(v[idx].to(p.dtype))
        return _assemble(p, mapped, self.config.mode, self.config.clip)

    def _state(self):
        return {"edges": self.edges, "values": self.values}

    def _load_state(self, state):
        self.edges, self.values = state["edges"], state["values"]


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp in torch: piecewise-linear through (xp, fp), constant beyond the ends; xp ascending."""
    if xp.numel() == 1:
        return fp.expand_as(x).clone()
    x = x.clamp(xp[0], xp[-1])
    i = (torch.searchsorted(xp, x, right=True) - 1).clamp(0, xp.numel() - 2)
    x0, x1, f0, f1 = xp[i], xp[i + 1], fp[i], fp[i + 1]
    span = x1 - x0
    t = torch.where(span > 0, (x - x0) / span.clamp_min(1e-300), torch.zeros_like(x))
    return f0 + t * (f1 - f0)


@register_calibrator("isotonic")
class IsotonicCalibration(Calibrator):
    """A non-decreasing step-then-linear map fitted by pool-adjacent-violators (scikit-learn)."""
    Config = BinaryMapConfig

    def _fit(self, z, y):
        from sklearn.isotonic import IsotonicRegression  # scikit-learn is slow to import: isotonic only

        p = _probs(z)
        xs, fs, offsets = [], [], [0]
        for prob, hit in _events(p, y, self.config.mode):
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
            iso.fit(prob.double().cpu().numpy(), hit.double().cpu().numpy())
            xs.append(torch.as_tensor(iso.X_thresholds_, dtype=torch.float64))
            fs.append(torch.as_tensor(iso.y_thresholds_, dtype=torch.float64))
            offsets.append(offsets[-1] + len(xs[-1]))
        # Breakpoints of every map, concatenated; offsets[k]:offsets[k+1] belong to map k.
        self.x, self.f = torch.cat(xs), torch.cat(fs)
        self.offsets = torch.tensor(offsets, dtype=torch.long)

    def _transform(self, z):
        p = _probs(z)
        x, f, off = self.x.to(p.device), self.f.to(p.device), self.offsets.tolist()
        dummy = torch.zeros(len(p), dtype=torch.long, device=p.device)
        mapped = [interp(prob.double(), x[off[k]:off[k + 1]], f[off[k]:off[k + 1]]).to(p.dtype)
                  for k, (prob, _) in enumerate(_events(p, dummy, self.config.mode))]
        return _assemble(p, mapped, self.config.mode, self.config.clip)

    def _state(self):
        return {"x": self.x, "f": self.f, "offsets": self.offsets}

    def _load_state(self, state):
        self.x, self.f, self.offsets = state["x"], state["f"], state["offsets"]
