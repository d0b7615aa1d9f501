"""Dense float64 references for the damping tests, built independently of curvlib.

Everything here works on the dense d_a·d_g × d_a·d_g matrix formed with ``torch.kron``
and solved with ``torch.linalg``; the column-major vec of DESIGN.md §1 is written out
again (vec(X) = Xᵀ.reshape(-1)), and spectral functions (PSD parts, clamps) are taken
with a dense ``eigh`` of the whole matrix, never factor by factor.
"""

from __future__ import annotations

import math


import torch

from curvlib.linalg import BlockDiagonalOperator, ShiftSolvable

F64 = torch.float64


def vec(X: torch.Tensor) -> torch.Tensor:
    """Column-major vec of X [..., r, c] -> [..., r·c] (Def. 3.2)."""
    return X.mT.reshape(*X.shape[:-2], -1)


def unvec(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`vec`: [..., rows·cols] -> [..., rows, cols]."""
    return x.reshape(*x.shape[:-1], cols, rows).mT


def dense_solve(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """MAT(M⁻¹ vec(X)) for X [..., d_g, d_a] and M [p, p]."""
    d_g, d_a = X.shape[-2:]
    y = torch.linalg.solve(M, vec(X).unsqueeze(-1)).squeeze(-1)
    return unvec(y, d_g, d_a)


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def spd(n: int, seed: int, min_eig: float = 0.1) -> torch.Tensor:
    X = randn(n, n, seed=seed)
    return X @ X.T / n + min_eig * torch.eye(n, dtype=F64)


def sym_fn(M: torch.Tensor, fn) -> torch.Tensor:
    """fn applied to the eigenvalues of symmetric M (dense eigh)."""
    e, Q = torch.linalg.eigh(0.5 * (M + M.T))
    return (Q * fn(e)) @ Q.T


def psd_part(M: torch.Tensor) -> torch.Tensor:
    """The PSD part of a symmetric matrix: its negative eigenvalues set to 0."""
    return sym_fn(M, lambda e: e.clamp_min(0))


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=F64)


def pi_by_hand(A: torch.Tensor, B: torch.Tensor) -> float:
    """π of (2.96): sqrt((tr A / d_a) / (tr B / d_g))."""
    return math.sqrt((float(torch.trace(A)) / A.shape[0]) / (float(torch.trace(B)) / B.shape[0]))


def clamped_two_term(A, B, C, D, floor):
    """The documented two-term operator of §3.2.5 with the floor rule, densely:

    M = (A^{1/2}⊗B^{1/2}) g(I + Ĉ⊗D̂) (A^{1/2}⊗B^{1/2}), g(μ) = max(μ, floor) applied
    spectrally (dense eigh of the whitened sum), Ĉ = A^{-1/2}CA^{-1/2}, D̂ = B^{-1/2}DB^{-1/2}.
    Returns ``(M, number of eigenvalues μ < floor)``.
    """
    A_is = sym_fn(A, lambda e: e.rsqrt())
    B_is = sym_fn(B, lambda e: e.rsqrt())
    W = eye(A.shape[0] * B.shape[0]) + torch.kron(A_is @ C @ A_is, B_is @ D @ B_is)
    mu, E = torch.linalg.eigh(0.5 * (W + W.T))
    S = torch.kron(sym_fn(A, torch.sqrt), sym_fn(B, torch.sqrt))
    return S @ ((E * mu.clamp_min(floor)) @ E.T) @ S, int((mu < floor).sum())


def whitened_pair(A, B, s1, s2, seed: int = 10):
    """C, D with A^{-1/2}CA^{-1/2} of eigenvalues s1 and B^{-1/2}DB^{-1/2} of eigenvalues s2."""
    Q1, _ = torch.linalg.qr(randn(len(s1), len(s1), seed=seed))
    Q2, _ = torch.linalg.qr(randn(len(s2), len(s2), seed=seed + 1))
    Ch = (Q1 * torch.tensor(s1, dtype=F64)) @ Q1.T
    Dh = (Q2 * torch.tensor(s2, dtype=F64)) @ Q2.T
    A_h, B_h = sym_fn(A, torch.sqrt), sym_fn(B, torch.sqrt)
    return A_h @ Ch @ A_h, B_h @ Dh @ B_h


def symmetric_indefinite(n: int, seed: int) -> torch.Tensor:
    """A symmetric matrix with eigenvalues of both signs (n ≥ 2)."""
    Q, _ = torch.linalg.qr(randn(n, n, seed=seed))
    e = torch.linspace(-1.0, 1.5, n, dtype=F64)
    return (Q * e) @ Q.T


def assert_solve_accuracy(actual: torch.Tensor, expected: torch.Tensor, M: torch.Tensor, tol: float) -> None:
    """For an iterative solve of M x = b stopped at ‖b − Mx‖ ≤ tol‖b‖: the normwise bound
    ‖x − x*‖ ≤ κ(M)·tol·‖x*‖ (per right-hand side), plus rounding of the dense reference."""
    cond = float(torch.linalg.cond(M))
    a = vec(actual).reshape(-1, M.shape[0])
    e = vec(expected).reshape(-1, M.shape[0])
    err = torch.linalg.vector_norm(a - e, dim=-1)
    bound = (cond * tol + cond * 1e-14) * torch.linalg.vector_norm(e, dim=-1)
    assert bool((err <= bound).all()), f"error {err.tolist()} above κ·tol bound {bound.tolist()} (κ = {cond:.3e})"


def FakeApproximation(blocks, slices=None, p=None):
    """A block-diagonal approximation without the approximators: the typed
    :class:`~curvlib.linalg.BlockDiagonalOperator` the dampings consume (slices default to
    the blocks one after another)."""
    if not slices:
        slices, start = [], 0
        for b in blocks:
            slices.append(slice(start, start + b.a_dim * b.b_dim))
            start += b.a_dim * b.b_dim
    return BlockDiagonalOperator(list(blocks), list(slices), p=p)


class FakeExactBlock(ShiftSolvable):
    """A stand-in for the approximators' ExactBlock: a dense PSD block F [p, p] declaring the
    ShiftSolvable capability (``tikhonov_solve`` returns (F + λI)⁻¹ vec(X) in matrix form)."""

    def __init__(self, F: torch.Tensor, a_dim: int, b_dim: int) -> None:
        self.F = F
        self._a_dim, self._b_dim = a_dim, b_dim
        self.calls = 0

    a_dim = property(lambda self: self._a_dim)
    b_dim = property(lambda self: self._b_dim)
    dtype = property(lambda self: self.F.dtype)
    device = property(lambda self: self.F.device)

    def _apply(self, X):
        return unvec((self.F @ vec(X).T).T, self._b_dim, self._a_dim)

    def tikhonov_solve(self, X, lam):
        self.calls += 1
        return dense_solve(self.F + lam * eye(self.F.shape[0]).to(self.F), X)
