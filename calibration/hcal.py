"""h-calibration (Huang et al. 2025, "h-calibration: Rethinking Classifier Recalibration with
Probabilistic Error-Bounded Objective", arXiv:2506.17968), written here from its published description.

The idea: a classifier is calibrated when, among events predicted with
probability ≈ p, a fraction ≈ p happens. Sort the (p, y) events by p; in a
sliding window of ``window`` neighbouring events the mean of p − y estimates
the local miscalibration T. Penalise only what exceeds an error bound ε:

    loss = mean over windows of max(|T| − ε, 0)

and learn an order-preserving map of the probabilities that minimises it.

Our reading of each part:

- Events. ``events="all"`` (the paper's canonical form): every (p_ik, 1[y_i = k]).
  ``events="top_label"``: only (max_k p_ik, prediction correct).
- The map (C > 2). A strictly increasing piecewise-linear g on
  log-probabilities, shared by all classes, then a softmax:
  p' = softmax(g(log p)). Because g is increasing and shared, each row keeps
  its order of classes (accuracy is unchanged); g(x) = x / T is temperature
  scaling.
- The map (C = 2, or a 1-D score). An increasing piecewise-linear h with an
  intercept on the binary logit s = z₁ − z₀: p₁ = σ(h(s)). A map shared by
  both classes would force p₁(−s) = 1 − p₁(s) (no intercept), which cannot
  fix a top-label confidence that is off by a shift; h(s) = a·s + b is Platt
  scaling. For two classes the events of class 0 mirror those of class 1
  (same windows, opposite sign), so only class 1's are used.
- Initialisation: ``init="scaling"`` starts from the linear special case —
  temperature scaling (C > 2) or Platt scaling (C = 2) fitted on the same
  training part — so training only has to add shape; ``"identity"`` starts
  from the input probabilities. Knots sit at quantiles of the training inputs
  (log-probabilities, or s); slopes are a₀·exp(θ_j) > 0 with θ learned, and
  the map extends linearly past the end knots.
- Optimisation: Adam (lr 5e-3) on θ (and the intercept). Each step sorts the events by their
  current calibrated probability (the sort order is held fixed for the
  gradient) on a random subsample of at most ``max_events`` events.
- Early stopping on ECE: every ``eval_every`` steps the top-label ECE (for
  C = 2: the ECE of p₁) of a held-out ``val_fraction`` of the calibration rows
  is measured; the best map
  seen (the initial one included) is kept, and training stops after
  ``patience`` evaluations without improvement.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from calibration.base import Calibrator, CalibratorConfig, register_calibrator
from calibration.metrics import expected_calibration_error
from calibration.scaling import PlattScaling, TemperatureScaling


class HCalibrationConfig(CalibratorConfig):
    window: int = Field(200, ge=2, description="events per sliding window for the local mean of p − y")
    epsilon: float = Field(0.01, ge=0, lt=1, description="error bound ε: |T| below it costs nothing")
    events: Literal["all", "top_label"] = "all"
    n_knots: int = Field(16, ge=2, le=1024, description="knots of the monotone map on log-probabilities")
    init: Literal["scaling", "identity"] = "scaling"
    lr: float = Field(5e-3, gt=0)
    max_steps: int = Field(2000, ge=0)
    eval_every: int = Field(10, ge=1)
    patience: int = Field(20, ge=1, description="evaluations without a better validation ECE before stopping")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="held-out rows for early stopping (0: use all)")
    max_events: int = Field(50_000, ge=100, description="events sorted per step (a random subsample beyond it)")
    n_bins: int = Field(15, ge=1, description="bins of the early-stopping ECE")
    seed: int = 0


def monotone_map(x: torch.Tensor, knots: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """g(x): piecewise linear through ``knots`` (K ascending), g(knots[0]) = 0, with K + 1 slopes:
    slopes[0] left of the first knot, slopes[j] on (knots[j-1], knots[j]], slopes[K] right of the last."""
    at_knots = torch.cat([slopes.new_zeros(1), torch.cumsum(slopes[1:-1] * knots.diff(), 0)])
    seg = torch.bucketize(x, knots)  # 0 .. K
    base = (seg - 1).clamp_min(0)
    return at_knots[base] + slopes[seg] * (x - knots[base])


def _map_input(z: torch.Tensor) -> torch.Tensor:
    """What the monotone map acts on: the binary logit s [N] for C = 2, log-probabilities [N, C] otherwise."""
    return z[:, 1] - z[:, 0] if z.shape[1] == 2 else torch.log_softmax(z, dim=1)


def _calibrate(z: torch.Tensor, knots: torch.Tensor, slopes: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    if z.shape[1] == 2:
        u = intercept + monotone_map(z[:, 1] - z[:, 0], knots, slopes)
        return torch.stack([torch.sigmoid(-u), torch.sigmoid(u)], dim=1)
    return torch.softmax(monotone_map(torch.log_softmax(z, dim=1), knots, slopes), dim=1)


def window_loss(p: torch.Tensor, y: torch.Tensor, window: int, epsilon: float) -> torch.Tensor:
    """mean_j max(|T_j| − ε, 0), T_j the mean of p − y over the j-th window of events sorted by p."""
    order = p.detach().argsort()
    d = (p - y)[order].double()
    w = min(window, d.numel())
    csum = torch.cat([d.new_zeros(1), d.cumsum(0)])
    local = (csum[w:] - csum[:-w]) / w
    return (local.abs() - epsilon).clamp_min(0).mean()


@register_calibrator("hcal")
class HCalibration(Calibrator):
    """Order-preserving monotone map (on log-probabilities, or on the binary logit), fitted to keep the local
    |mean(p − y)| of sorted events within ε."""
    Config = HCalibrationConfig

    def _fit(self, z, y):
        cfg = self.config
        dt = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.to(dt)
        gen = torch.Generator().manual_seed(cfg.seed)
        n = z.shape[0]
        perm = torch.randperm(n, generator=gen).to(z.device)
        n_val = int(round(n * cfg.val_fraction))
        if n_val < 50 or n - n_val < 50 or len(y[perm[n_val:]].unique()) < 2:
            train, val = perm, perm  # too few rows to hold any out: early-stop on the training rows
        else:
            val, train = perm[:n_val], perm[n_val:]
        zt, yt, zv, yv = z[train], y[train], z[val], y[val]

        binary = z.shape[1] == 2
        x = _map_input(zt).flatten()
        if x.numel() > 1_000_000:
            x = x[torch.randint(x.numel(), (1_000_000,), generator=gen).to(z.device)]
        q = torch.linspace(0, 1, cfg.n_knots, device=z.device, dtype=dt)
        knots = torch.unique(x.sort().values[(q * (x.numel() - 1)).round().long()])
        if knots.numel() < 2:
            knots = torch.cat([knots - 1, knots])
        # Start from the linear special case: g(x) = a0·(x − knots[0]) + b0 reproduces a0·x + b.
        a0, b = 1.0, 0.0
        if cfg.init == "scaling":
            if binary:
                a0, b = PlattScaling().fit(zt, yt).scale_bias.tolist()
                a0 = max(a0, 1e-3)  # an anti-correlated score gets a flat start, never a decreasing map
            else:
                a0 = 1.0 / TemperatureScaling().fit(zt, yt).temperature
        theta = torch.zeros(knots.numel() + 1, dtype=dt, device=z.device, requires_grad=True)
        intercept = torch.tensor(b + a0 * float(knots[0]) if binary else 0.0, dtype=dt, device=z.device,
                                 requires_grad=binary)
        opt = torch.optim.Adam([theta, intercept] if binary else [theta], lr=cfg.lr)

        def current():
            return knots, a0 * theta.exp(), intercept

        c = z.shape[1]
        per_row = 1 if binary or cfg.events == "top_label" else c
        rows_per_step = max(1, cfg.max_events // per_row)
        best = (self._val_ece(zv, yv, *current()), [t.detach().clone() for t in current()], 0)
        stale, step = 0, 0
        for step in range(1, cfg.max_steps + 1):
            rows = torch.randint(zt.shape[0], (min(rows_per_step, zt.shape[0]),), generator=gen).to(z.device) \
                if zt.shape[0] > rows_per_step else slice(None)
            p = _calibrate(zt[rows], *current())
            yr = yt[rows]
            if cfg.events == "top_label":
                conf, pred = p.max(dim=1)
                ev_p, ev_y = conf, (pred == yr).to(dt)
            elif binary:
                ev_p, ev_y = p[:, 1], yr.to(dt)
            else:
                ev_p, ev_y = p.flatten(), torch.nn.functional.one_hot(yr, c).to(dt).flatten()
            loss = window_loss(ev_p, ev_y, cfg.window, cfg.epsilon)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % cfg.eval_every == 0:
                ece = self._val_ece(zv, yv, *current())
                if ece < best[0]:
                    best, stale = (ece, [t.detach().clone() for t in current()], step), 0
                else:
                    stale += 1
                    if stale >= cfg.patience:
                        break
        self.knots, self.slopes, self.intercept = best[1]
        self.fit_info = {"steps": step, "best_step": best[2], "val_ece": best[0], "initial_slope": a0,
                         "val_rows": int(len(val)) if val is not train else 0}

    def _val_ece(self, z, y, knots, slopes, intercept) -> float:
        """Top-label ECE; for two classes the ECE of p₁ against y = 1 (class 1 = "the prediction is right"
        in the top-label binary form of a language model's confidence)."""
        with torch.no_grad():
            p = _calibrate(z, knots, slopes, intercept)
        if z.shape[1] == 2:
            return expected_calibration_error(p[:, 1], y == 1, self.config.n_bins)
        conf, pred = p.max(dim=1)
        return expected_calibration_error(conf, pred == y, self.config.n_bins)

    def _transform(self, z):
        dt = torch.float64 if z.dtype == torch.float64 else torch.float32
        return _calibrate(z.to(dt), *(t.to(z.device, dt) for t in (self.knots, self.slopes, self.intercept)))

    def _state(self):
        return {"knots": self.knots, "slopes": self.slopes, "intercept": self.intercept}

    def _load_state(self, state):
        self.knots, self.slopes, self.intercept = state["knots"], state["slopes"], state["intercept"]
