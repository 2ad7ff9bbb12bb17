"""Calibration statistics the layer-wise runner accumulates, kept as sums.

A sum over batches can be split into parts (the batches of several processes, ``compress.distributed``)
and added back; a running mean rounds at every batch, so its parts cannot be merged into the same
bits. Each batch's product is float32 (on CUDA a bf16/fp16 input's XᵀX runs on the tensor cores,
see :func:`gram`); the sum over batches is float64,
so the order in which parts are added changes at most the last float64 bit, and the float32 statistic
handed to a solver is the same whichever way the batches were split (unless a float64 sum lands within
one float64 ulp of a float32 rounding boundary: about 2⁻²⁹ per entry that differs at all).

``statistics()`` / ``load_statistics()`` expose the sums, so that ``compress.distributed`` can add the
parts of every rank; an accumulator without them cannot be used across processes.
"""
from __future__ import annotations

import torch

_HALF = (torch.bfloat16, torch.float16)
_MM_OUT_DTYPE: list[bool] = []  # [False] once torch.mm(out_dtype=) has failed in this process


def gram(x: torch.Tensor) -> torch.Tensor:
    """XᵀX of a [tokens, features] matrix, in float32.

    A bf16 or fp16 input on CUDA is multiplied as it is, with float32 accumulation and output
    (``torch.mm(..., out_dtype=float32)``). The product of two bf16 (8-bit significand) or fp16 (11-bit)
    numbers is exact in float32's 24 bits, so this differs from casting X to float32 first only in how
    the float32 sums are formed (their order, the tensor cores' accumulation): on an H200, by at most
    1.4e-5 of the largest entry over 4,096 tokens (``tests/test_runner.py``). It runs on the tensor cores
    instead of as a float32 GEMM: on 3 blocks of the Llama-3.1-8B shape, 128 x 2,048 tokens, the block
    took 6.9-7.7 s against 8.1-8.3 s (``bench/results/scale/``). Other inputs, and stacks without
    ``out_dtype``, take the float32 product."""
    if x.is_cuda and x.dtype in _HALF and not _MM_OUT_DTYPE:
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # an older torch or an unsupported build
            _MM_OUT_DTYPE.append(False)
    x = x.float()
    return x.T @ x


class HessianAccumulator:
    """H = 2·X·Xᵀ / n over every token seen by a linear layer (GPTQ's statistic).

    Kept as the float64 sum of each batch's XᵀX; ``H`` (float32) is formed when first read, and the
    sum is then freed (no batch may be added after that)."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0
        self._H: torch.Tensor | None = None

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        if self._H is not None:
            raise RuntimeError("HessianAccumulator: H was read; no batch can be added after that")
        x = inp.reshape(-1, inp.shape[-1]).to(self.sum.device)
        self.count += x.shape[0]
        self.sum += gram(x)  # the float32 product, added in float64

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            scale = 2.0 / self.count if self.count else 0.0  # no token: zeros (the runner refuses to solve it)
            self._H = (self.sum * scale).to(torch.float32)
            self.sum = None
        return self._H

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "count": torch.tensor([self.count], dtype=torch.int64, device=self.sum.device)}

    def load_statistics(self, stats: dict[str, torch.Tensor]) -> None:
        self.sum, self.count = stats["sum"], int(stats["count"].item())


class MeanAccumulator:
    """Mean of a linear layer's inputs over every token seen (float64 sum; ``mean`` float32)."""

    def __init__(self, in_features: int, device: torch.device | str):
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(self.sum.device, torch.float32)
        self.count += x.shape[0]
        self.sum += x.sum(dim=0)

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).to(torch.float32)

    def statistics(self) -> dict[str, torch.Tensor]:
        return {"sum": self.sum, "count": torch.tensor([self.count], dtype=torch.int64, device=self.sum.device)}

    def load_statistics(self, stats: dict[str, torch.Tensor]) -> None:
        self.sum, self.count = stats["sum"], int(stats["count"].item())


class AsymmetricAccumulator(HessianAccumulator):
    """H over the quantized model's inputs X, and dXXT = 2·(X̃ − X)ᵀ·X / n with X̃ the float model's
    inputs to the same linear on the same tokens (GPTAQ's extra statistic), both kept as float64 sums.
    ``float_input()`` returns the float input of the batch being fed (``compress.twin``)."""

    def __init__(self, in_features: int, device: torch.device | str, float_input):
        super().__init__(in_features, device)
        self.dsum = torch.zeros_like(self.sum)
        self.float_input = float_input

    def add_batch(self, inp: torch.Tensor, out: torch.Tensor | None = None) -> None:
        x = inp.reshape(-1, inp.shape[-1]).to(self.sum.device, torch.float32)
        xf = self.float_input().reshape(-1, inp.shape[-1]).to(self.sum.device, torch.float32)
        if xf.shape != x.shape:
            raise RuntimeError(f"float input {tuple(xf.shape)} does not pair with quantized input {tuple(x.shape)}")
        super().add_batch(inp)
        self.dsum += (xf - x).T @ x

    @property
    def dXXT(self) -> torch.Tensor:
        return (self.dsum * (2.0 / self.count if self.count else 0.0)).to(torch.float32)

    def statistics(self) -> dict[str, torch.Tensor]:
        return {**super().statistics(), "dsum": self.dsum}

    def load_statistics(self, stats: dict[str, torch.Tensor]) -> None:
        super().load_statistics(stats)
        self.dsum = stats["dsum"]
