"""GPTAQ (GPTQ v2; Li et al. 2025, "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric
Calibration"): fit each layer to the *float* model's output on the float model's inputs.

GPTQ minimises ||W·X − Ŵ·X||² with X the inputs the partly quantized model gives the layer.
GPTAQ minimises ||W·X̃ − Ŵ·X||² with X̃ the float model's inputs on the same tokens, so a layer
also undoes what earlier layers' rounding did to its input. Per row the objective is
    ||W·X̃ − Ŵ·X||² = ||(W* − Ŵ)·X||² + const,   W* = W·X̃ᵀX·(XᵀX)⁻¹ = W·(I + dXXT·H⁻¹)
(dXXT = (X̃ − X)ᵀX, H = XᵀX, both scaled by 2/n): the least-squares target W* under GPTQ's own
metric H, since the residual W·X̃ − W*·X is orthogonal to X's rows. So GPTAQ is GPTQ run on W*
with the same H — the same column loop, the same error feedback — and with X̃ == X it *is* GPTQ.
``alpha`` scales the correction (GPTQv2's alpha): the full target fits the calibration windows'
accumulated error exactly, which generalises worse than a fraction of it.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def asymmetric_target(W: Tensor, H: Tensor, dXXT: Tensor, *, percdamp: float, alpha: float) -> Tensor:
    """``W + alpha · W·dXXT·(H + damp·I)⁻¹`` in float32 (damp = percdamp · mean diag H, as GPTQ damps;
    dead inputs, diag(H) == 0, get H_ii = 1 and no correction)."""
    Hf = H.float().clone()
    dead = torch.diagonal(Hf) == 0
    Hf[dead, dead] = 1.0
    Hf += percdamp * torch.diagonal(Hf).mean() * torch.eye(Hf.shape[0], device=Hf.device)
    L = torch.linalg.cholesky(0.5 * (Hf + Hf.T))
    D = dXXT.float().clone()
    D[:, dead] = 0.0
    # W·D·Hd⁻¹ = (Hd⁻¹·Dᵀ·Wᵀ)ᵀ, Hd symmetric
    shift = torch.cholesky_solve(D.T @ W.float().T, L).T
    return W.float() + alpha * shift
