"""Small networks and dense float64 references for the coarse-space / two-level tests.

Everything here is written out from the thesis's formulas with dense matrices: F• from
``F.to_dense()`` + λI, the KFAC/KFC factors from the statistics by explicit sums, the
π-split (2.96) by hand, Kronecker products with ``torch.kron``, solves with
``torch.linalg``.  Nothing calls the code under test except to read its inputs (F, the
first level as an operator, the basis columns it returned).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import nn

import curvlib
from curvlib.errors import PerformanceWarning

DT = torch.float64


# -- networks ---------------------------------------------------------------------------------
def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 3))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, stride=2), nn.Tanh(), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


def conv_autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(),
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
        nn.Conv2d(3, 1, 1), nn.Flatten(),
    )


ARCHS = ("mlp", "cnn", "convae")


def make_problem(arch: str, m: int = 5, seed: int = 0):
    """``(model, loss_fn, X, y)`` of a small float64 problem."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if arch == "mlp":
        model = mlp().to(DT)
        X = torch.randn(m, 4, generator=g, dtype=DT)
        y = torch.randint(0, 3, (m,), generator=g)
        loss = nn.CrossEntropyLoss()
    elif arch == "cnn":
        model = cnn().to(DT)
        X = torch.randn(m, 2, 6, 6, generator=g, dtype=DT)
        y = torch.randint(0, 3, (m,), generator=g)
        loss = nn.CrossEntropyLoss()
    elif arch == "convae":
        model = conv_autoencoder().to(DT)
        X = torch.rand(m, 1, 6, 6, generator=g, dtype=DT)
        y = X.reshape(m, -1)
        loss = nn.BCEWithLogitsLoss()
    else:
        raise KeyError(arch)
    return model, loss, X, y


@functools.lru_cache(maxsize=None)
def make_curvature(arch: str, kind: str = "ggn", m: int = 5, seed: int = 0):
    """``(F, model, loss_fn, X, y)``, cached per session (the operators are read-only)."""
    model, loss, X, y = make_problem(arch, m, seed)
    opts = {"mc_samples": 2, "generator": torch.Generator().manual_seed(seed + 1)} if kind == "fisher" else {}
    return curvlib.curvature(kind, model, loss, (X, y), **opts), model, loss, X, y


def dense(op) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerformanceWarning)
        return op.to_dense()


def damped_dense(F, lam: float) -> torch.Tensor:
    """F• = F + λI ``[p, p]`` (4.2)."""
    return dense(F) + lam * torch.eye(F.p, dtype=DT)


# -- KFAC by hand ---------------------------------------------------------------------------------
def factors(F, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = (1/m) Σ_b Σ_t ā ā ᵀ, G = (scale/T) Σ_{b,c,t} g gᵀ (3.19), (3.29), by explicit sums."""
    s = F.statistics(i)
    a, g = s.a, s.g  # [m, T, a], [m, c, T, g]
    m, T = a.shape[0], a.shape[1]
    # sums of explicit outer products ā ā ᵀ over (b, t) and g gᵀ over (b, c, t)
    A = (a[..., :, None] * a[..., None, :]).sum((0, 1)) / m
    G = (g[..., :, None] * g[..., None, :]).sum((0, 1, 2))
    return A, G * (s.scale / T)


def pi_damped(A: torch.Tensor, G: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A + π√λ I, G + π⁻¹√λ I), π = sqrt((tr A/d_a)/(tr G/d_g)) (2.95)–(2.96)."""
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    return A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=DT), G + math.sqrt(lam) / pi * torch.eye(G.shape[0], dtype=DT)


def kfac_inverse_dense(F, lam: float) -> torch.Tensor:
    """The dense block-diagonal F•KFAC⁻¹ with heuristic damping ``[p, p]``."""
    M = torch.zeros(F.p, F.p, dtype=DT)
    for i, L in enumerate(F.layers):
        Ad, Gd = pi_damped(*factors(F, i), lam)
        M[L.slice, L.slice] = torch.linalg.inv(torch.kron(Ad, Gd))
    return M


def pooled(F, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ã = Σ_t ā_t ``[m, a]``, g̃ = T^{-1/2} Σ_t g_t ``[m, c, g]`` (the documented conv pooling)."""
    s = F.statistics(i)
    if s.a.ndim == 2:
        return s.a, s.g
    T = s.a.shape[1]
    return s.a.sum(1), s.g.sum(2) / math.sqrt(T)


def tko_dense(F, lam: float) -> torch.Tensor:
    """F̄• of (4.20b) as a dense ``[p, p]`` matrix (heuristic diagonal blocks)."""
    Fbar = torch.zeros(F.p, F.p, dtype=DT)
    for i, Li in enumerate(F.layers):
        for j, Lj in enumerate(F.layers):
            if i == j:
                Ad, Gd = pi_damped(*factors(F, i), lam)
                Fbar[Li.slice, Li.slice] = torch.kron(Ad, Gd)
            else:
                ai, gi = pooled(F, i)
                aj, gj = pooled(F, j)
                m = ai.shape[0]
                A_ij = (ai[:, :, None] * aj[:, None, :]).sum(0) / m  # E[ã_i ã_jᵀ]
                G_ij = (gi[..., :, None] * gj[..., None, :]).sum((0, 1))  # Σ_{b,c} g̃_i g̃_jᵀ
                Fbar[Li.slice, Lj.slice] = torch.kron(A_ij, G_ij * F.statistics(i).scale)
    return Fbar


# -- coarse algebra by hand ---------------------------------------------------------------------
def dense_R0T(groups, columns, p: int) -> torch.Tensor:
    """R₀ᵀ ``[p, N]`` from groups (slices or index tensors) and V_g ``[p_g, N_g]`` (4.23)."""
    N = sum(V.shape[1] for V in columns)
    P = torch.zeros(p, N, dtype=DT)
    c = 0
    for grp, V in zip(groups, columns):
        rows = torch.arange(grp.start, grp.stop) if isinstance(grp, slice) else torch.as_tensor(grp)
        for k in range(V.shape[1]):
            P[rows, c + k] = V[:, k]
        c += V.shape[1]
    return P


def scaled_pinv_solve(Fc: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """β = D pinv(D F_c D) D rhs with D = diag(F_c)^{-1/2} (1 on zero diagonals).

    The Jacobi scaling only reparametrises β (same R₀ᵀβ in exact arithmetic); without it
    a pinv of F_c built on Krylov/Taylor columns, whose norms differ by powers of 1/λ,
    loses ~6 digits and is not an accurate reference."""
    d = torch.diagonal(Fc)
    s = torch.where(d > 0, d.clamp_min(1e-300).rsqrt(), torch.ones_like(d))
    return s * (torch.linalg.pinv(s[:, None] * Fc * s[None, :], hermitian=True) @ (s * rhs))


def two_level_dense(M, Fb, P, u, mode: str = "multiplicative", Fc=None) -> torch.Tensor:
    """ζ_2L of (4.17) (multiplicative) or (4.19) (additive, previous with ``Fc``) (pinv)."""
    Fc = P.T @ Fb @ P if Fc is None else Fc
    rhs = P.T @ (u - Fb @ (M @ u)) if mode == "multiplicative" else P.T @ u
    return M @ u + P @ scaled_pinv_solve(Fc, rhs)


def energy_error(z, zeta, Fb) -> torch.Tensor:
    """‖z − ζ‖²_F• (4.41)."""
    d = z - zeta
    return d @ Fb @ d
