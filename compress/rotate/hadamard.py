"""Orthogonal matrices for rotating a model's residual stream: randomised Hadamard where a Hadamard
matrix of the width can be built, a seeded random orthogonal one otherwise.

A Hadamard matrix H (entries ±1, H·Hᵀ = n·I) spreads every coordinate evenly over all the others,
so H/√n turns a few outlier channels into many moderate ones: what makes weights and activations
easy to quantize (QuaRot, Ashkboos et al. 2024). Random signs on its rows (diag(s)·H/√n) keep it
orthogonal and make it a random draw. Widths built here:
  - Sylvester: 2^k;
  - Paley I: q + 1 for a prime q ≡ 3 (mod 4); Paley II: 2(q + 1) for a prime q ≡ 1 (mod 4);
  - Kronecker products: 2^k · m with m one of the above. SmolLM2's 576 = 8 · 72 (Paley I, q = 71),
    Qwen2.5-0.5B's 896 = 4 · 224 (Paley I, q = 223), 1.5B's 1536 = 128 · 12 (Paley I, q = 11).
Every matrix built is checked (H·Hᵀ = n·I) before use; a width with no construction here gets a
random orthogonal matrix (QR of a Gaussian, signs fixed), which rotates exactly as well, only
without the Hadamard's guaranteed spreading.
"""
from __future__ import annotations

import torch


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _legendre(q: int) -> list[int]:
    squares = {(x * x) % q for x in range(1, q)}
    return [0] + [1 if a in squares else -1 for a in range(1, q)]


def _jacobsthal(q: int) -> torch.Tensor:
    chi = _legendre(q)
    idx = torch.arange(q)
    return torch.tensor(chi, dtype=torch.float64)[(idx[None, :] - idx[:, None]) % q]


def paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``n`` by Paley's constructions, or None."""
    q = n - 1
    if _is_prime(q) and q % 4 == 3:  # Paley I: I + S, S the skew conference matrix
        S = torch.zeros(n, n, dtype=torch.float64)
        S[0, 1:], S[1:, 0] = 1.0, -1.0
        S[1:, 1:] = _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + S
    q = n // 2 - 1
    if n % 2 == 0 and _is_prime(q) and q % 4 == 1:  # Paley II from the symmetric conference matrix
        C = torch.zeros(n // 2, n // 2, dtype=torch.float64)
        C[0, 1:], C[1:, 0] = 1.0, 1.0
        C[1:, 1:] = _jacobsthal(q)
        a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(C, a) + torch.kron(torch.eye(n // 2, dtype=torch.float64), b)
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """A ±1 matrix H of order ``n`` with H·Hᵀ = n·I (float64), or None when none is built here."""
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    for p2 in [power >> k for k in range(power.bit_length())]:  # the largest power of two first
        m = n // p2
        base = torch.ones(1, 1, dtype=torch.float64) if m == 1 else paley(m)
        if base is None:
            continue
        H = base
        s = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        while H.shape[0] < n:
            H = torch.kron(s, H)
        if torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64)):
            return H
    return None


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal (float64): QR of a Gaussian with R's diagonal signs folded into Q."""
    Q, R = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))[None, :]


def rotation(n: int, kind: str, seed: int) -> tuple[torch.Tensor, str]:
    """An orthogonal [n, n] float64 matrix and what it is: ``hadamard`` (diag(random ±1)·H/√n, or a
    random orthogonal one when no Hadamard of order n is built) or ``random``."""
    g = torch.Generator().manual_seed(seed)
    if kind == "hadamard":
        H = hadamard(n)
        if H is not None:
            signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
            return signs[:, None] * H / n ** 0.5, f"randomised Hadamard of order {n}"
        return random_orthogonal(n, g), f"random orthogonal (no Hadamard of order {n} built here)"
    return random_orthogonal(n, g), "random orthogonal"
