"""Statistics the layer-wise runner accumulates per linear: GPTQ's input Hessian, and GPTAQ's
cross term between the float model's inputs and the quantized model's (``compress.twin`` runs
the float block beside the one being quantized and hands each batch's float inputs over)."""
from __future__ import annotations

import math

import torch


class HessianAccumulator:
    """Running mean of H = 2·X·Xᵀ over every token seen by a linear layer (GPTQ's statistic)."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(self.H.device, torch.float32)
        n = x.shape[0]
        self.H *= self.count / (self.count + n)
        self.count += n
        x = x * math.sqrt(2.0 / self.count)
        self.H += x.T @ x


class AsymmetricAccumulator(HessianAccumulator):
    """H over the quantized model's inputs X, and dXXT = 2·(X̃ − X)ᵀ·X / n with X̃ the float model's
    inputs to the same linear on the same tokens (GPTAQ's extra statistic). ``float_input()`` returns
    the float input of the batch being fed (the twin's capture for this module)."""

    def __init__(self, in_features: int, device: torch.device | str, float_input):
        super().__init__(in_features, device)
        self.dXXT = torch.zeros_like(self.H)
        self.float_input = float_input

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(self.H.device, torch.float32)
        xf = self.float_input().reshape(-1, inp.shape[-1]).to(self.H.device, torch.float32)
        if xf.shape != x.shape:
            raise RuntimeError(f"float input {tuple(xf.shape)} does not pair with quantized input {tuple(x.shape)}")
        n = x.shape[0]
        self.dXXT *= self.count / (self.count + n)
        super().add_batch(inp)  # updates count
        self.dXXT += (xf - x).T @ x * (2.0 / self.count)
