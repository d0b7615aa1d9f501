"""The coarse operator F_coarse = R₀F•R₀ᵀ ``[N, N]`` (4.14) on a coarse basis R₀ᵀ, and the
solve of the coarse system F_coarse β = rhs (thesis §4.2).

- :func:`exact_coarse_operator` — exact and matrix-free ((4.73)–(4.77)): with
  W = Jᵀ R₀ᵀ ``[n, N]`` (one J_iᵀ product per layer on the columns that touch it) and
  C = scale·JJᵀ, F_coarse = scale·WᵀW + λ·R₀R₀ᵀ.  A curvature without a Jacobian
  factorization (the Hessian) gets F_coarse = R₀(F R₀ᵀ) + λR₀R₀ᵀ from one product with the
  N columns.  No p × p matrix is formed; F_coarse is rebuilt for every new basis (never
  averaged across steps, DESIGN.md §10).
- :func:`tko_coarse_operator` — the approximate coarse operator R₀F̄•R₀ᵀ of
  Tselepidis–Kohler–Orvieto (4.20), from per-layer Kronecker statistics (the ``"previous"``
  mode of :class:`~curvlib.coarse.two_level.TwoLevelPreconditioner`).
- :func:`solve_coarse` — β for F_coarse β = rhs by the equilibrated pseudo-inverse below.

**Coarse solve.**  The N × N system is tiny and often ill-conditioned (columns of very
different scales, nearly collinear Krylov iterates), so it is solved in float64 (the
documented upcast of this module; the operators are returned in float64 too) as follows:

1. the operator is equilibrated, S = D F_coarse D with D = diag(F_coarse)^{-1/2} (1 where
   the diagonal is not positive);
2. S = QΛQᵀ; eigenvalues with |Λ_k| ≤ rcond·max|Λ| are cut, and
   β = D Q_kept Λ_kept⁻¹ Q_keptᵀ D rhs.

For an exact F_coarse = R₀F•R₀ᵀ with F• ≻ 0, null(F_coarse) = null(R₀ᵀ): the cut
directions are combinations of columns that cancel, so the correction R₀ᵀβ is the
unique one of the reduced problem (the same as with the minimum-norm solution
pinv(F_coarse)·rhs), and it is finite.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from curvlib.coarse.base import kfc_factors
from curvlib.coarse.basis import CoarseBasis
from curvlib.curvatures.operator import CurvatureOperator, NoStatisticsError
from curvlib.errors import ConfigError
from curvlib.linalg import pi_split, unvec

__all__ = [
    "exact_coarse_operator",
    "solve_coarse",
    "tko_coarse_operator",
]


# --------------------------------------------------------------------------- coarse operators
def exact_coarse_operator(curvature: Any, basis: CoarseBasis, damping: float) -> torch.Tensor:
    """F_coarse = R₀ F• R₀ᵀ ``[N, N]`` in float64, matrix-free ((4.14), (4.73)–(4.77)).

    For a :class:`~curvlib.curvatures.operator.CurvatureOperator` (C = scale·JJᵀ):
    W = Jᵀ R₀ᵀ ``[n, N]`` accumulated layer by layer with ``Jt_i`` on the columns of R₀ᵀ
    that touch layer i, then F_coarse = scale·WᵀW + λ·R₀R₀ᵀ (4.74), (4.77).  For any other
    operator (the Hessian): one product F·R₀ᵀ with the N columns, then R₀(F R₀ᵀ) + λR₀R₀ᵀ.
    """
    N = basis.N
    f64 = torch.float64
    if N == 0:
        return torch.zeros(0, 0, dtype=f64, device=basis.device)
    gram = basis.gram().to(f64)
    if isinstance(curvature, CurvatureOperator):
        slices = [L.slice for L in curvature.layers]
        W = torch.zeros(curvature.num_pairs, N, dtype=f64, device=basis.device)
        for i, L in enumerate(curvature.layers):
            B, cols = basis.layer_block(L.slice, slices)
            if cols.numel():
                W.index_add_(1, cols.to(W.device), curvature.Jt_i(i, B).to(f64))
        Fc = curvature.scale * (W.T @ W) + damping * gram
    else:
        P = basis.dense()
        FP = curvature.matmat(P)
        Fc = P.to(f64).T @ FP.to(f64) + damping * gram
    return 0.5 * (Fc + Fc.T)


def _pooled(stats: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-pooled statistics of one layer: ``(ã [m, a_dim], g̃ [m, c, g_dim])``,
    ã = Σ_t ā_t and g̃ = T^{-1/2} Σ_t g_t over the positions of the untransposed uses
    (T their number; the identity for a Linear layer, T = 1)."""
    uses = [u for u in stats.uses if u.transposed == stats.uses[0].transposed]
    T = sum(u.T for u in uses)
    a = sum(u.a.position_sum().a[:, 0] for u in uses)
    g = sum(u.g.sum(2) for u in uses) / math.sqrt(T)
    return a, g


def tko_coarse_operator(
    curvature: Any, basis: CoarseBasis, damping: float, diagonal: Literal["heuristic", "tikhonov"] = "heuristic"
) -> torch.Tensor:
    """The approximate coarse operator R₀ F̄• R₀ᵀ of Tselepidis et al. ``[N, N]`` in float64 (4.20).

    F̄• has layer blocks (4.20b)

        [F̄•]_ij = A_ij ⊗ G_ij,  A_ij = E[ā_i ā_jᵀ] ``[a_i, a_j]``, G_ij = E[g_i g_jᵀ] ``[g_i, g_j]``   (i ≠ j),
        [F̄•]_ii = (A_i + π_i√λ I) ⊗ (G_i + π_i⁻¹√λ I)   (``diagonal="heuristic"``, (2.95)–(2.96))
                 or A_i ⊗ G_i + λI                       (``diagonal="tikhonov"``, (4.54)),

    with A_i, G_i the KFAC/KFC factors of the current batch (:func:`~curvlib.coarse.base.kfc_factors`)
    and E over the batch with the curvature's weights: A_ij = (1/m)Σ_b ã_{i,b}ã_{j,b}ᵀ,
    G_ij = scale·Σ_{b,c} g̃_{i,b,c}g̃_{j,b,c}ᵀ (so A_ij ⊗ G_ij is C_ij for one sample).
    F̄• is never formed: V_iᵀ(A_ij ⊗ G_ij)V_j = ⟨MAT(V_i), G_ij MAT(V_j) A_ijᵀ⟩ for every
    pair of columns, batched.

    **Layers with positions** (convolutions, Linear layers on tokens).  Two layers have
    different sets of positions, so positions cannot be paired across layers.  Each layer's per-sample statistics are pooled over
    positions, ã_i = Σ_t ā_{i,t}, g̃_i = T_i^{-1/2} Σ_t g_{i,t}, and the cross factors use
    the pooled vectors.  The split keeps the scale of KFC: in KFC's own regime
    (positions uncorrelated and alike) E[ã_iã_iᵀ] ≈ E[Σ_t ā_tā_tᵀ] and
    E[g̃_ig̃_iᵀ] ≈ (1/T)E[Σ_t g_tg_tᵀ], the factors of (3.29).  A Linear layer is
    unchanged (T = 1).  The diagonal blocks are the KFC blocks of (3.29).  A weight tied in
    transposed form (embedding and output layer) enters F̄• through its untransposed uses
    only (F̄• is an approximation of F• already; its transposed part has no factor on the
    layer's own sides).

    F̄• need not be positive semi-definite (its off-diagonal blocks are not those of a
    Gram matrix); the coarse solve handles an indefinite operator.
    """
    f64 = torch.float64
    N = basis.N
    if N == 0:
        return torch.zeros(0, 0, dtype=f64, device=basis.device)
    layers = curvature.layers
    slices = [L.slice for L in layers]
    try:
        stats = [curvature.statistics(i) for i in range(len(layers))]
    except NoStatisticsError as exc:
        raise ConfigError(
            f"mode='previous' builds F̄• from per-layer Kronecker statistics, which {type(curvature).__name__} "
            "does not have; use a 'fisher', 'empirical_fisher' or 'ggn' curvature"
        ) from exc
    mats, cols = [], []
    for i, L in enumerate(layers):
        B, c = basis.layer_block(L.slice, slices)
        mats.append(unvec(B.T, L.g_dim, L.a_dim))  # MAT of each column: [n_i, g_i, a_i]
        cols.append(c.to(basis.device))
    pooled = [_pooled(s) for s in stats]
    Fc = torch.zeros(N, N, dtype=f64, device=basis.device)
    for i in range(len(layers)):
        if not cols[i].numel():
            continue
        Xi = mats[i]
        A, G = kfc_factors(stats[i])
        if diagonal == "heuristic":
            A_d, G_d, _ = pi_split(A, G, damping)
            Y = G_d @ Xi @ A_d.T
        else:
            Y = G @ Xi @ A.T + damping * Xi
        block = torch.einsum("kga,lga->kl", Xi, Y).to(f64)
        Fc.index_put_((cols[i][:, None], cols[i][None, :]), block, accumulate=True)
        a_i, g_i = pooled[i]
        m = a_i.shape[0]
        for j in range(i + 1, len(layers)):
            if not cols[j].numel():
                continue
            a_j, g_j = pooled[j]
            A_ij = a_i.T @ a_j / m  # [a_i, a_j]
            G_ij = torch.einsum("mcg,mch->gh", g_i, g_j) * stats[i].scale  # [g_i, g_j]
            Y = G_ij @ mats[j] @ A_ij.T  # (A_ij ⊗ G_ij) vec(X_j) for every column: [n_j, g_i, a_i]
            block = torch.einsum("kga,lga->kl", Xi, Y).to(f64)  # [n_i, n_j]
            Fc.index_put_((cols[i][:, None], cols[j][None, :]), block, accumulate=True)
            Fc.index_put_((cols[j][:, None], cols[i][None, :]), block.T, accumulate=True)
    return 0.5 * (Fc + Fc.T)


# --------------------------------------------------------------------------- coarse solve
class _EquilibratedPinv:
    """β = D Q_k Λ_k⁻¹ Q_kᵀ D·rhs for S = D F_c D = QΛQᵀ (see the module docstring).

    Attributes:
        rank: eigen-directions kept;  truncated: eigen-directions cut;  cond: max|Λ| / min|Λ|.
    """

    def __init__(self, Fc: torch.Tensor, rcond: float) -> None:
        n = Fc.shape[0]
        self.n = n
        if n == 0:
            self.rank, self.truncated, self.cond = 0, 0, float("nan")
            return
        d = torch.diagonal(Fc)
        self.s = torch.where(d > 0, d.clamp_min(torch.finfo(Fc.dtype).tiny).rsqrt(), torch.ones_like(d))
        S = self.s[:, None] * Fc * self.s[None, :]
        e, Q = torch.linalg.eigh(0.5 * (S + S.T))
        mag = e.abs()
        emax = float(mag.max())
        keep = mag > rcond * emax if emax > 0 and math.isfinite(emax) else torch.zeros_like(mag, dtype=torch.bool)
        self.Q, self.e = Q[:, keep], e[keep]
        self.rank = int(keep.sum())
        self.truncated = n - self.rank
        emin = float(mag.min())
        self.cond = emax / emin if emin > 0 else float("inf")

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """rhs ``[n, k]`` float64 -> β ``[n, k]`` float64."""
        if self.n == 0 or self.rank == 0:
            return torch.zeros_like(rhs)
        y = self.Q.T @ (self.s[:, None] * rhs)
        return self.s[:, None] * (self.Q @ (y / self.e[:, None]))


def solve_coarse(Fc: torch.Tensor, rhs: torch.Tensor, rcond: float) -> torch.Tensor:
    """Solve the coarse system F_c β = rhs with the equilibrated pseudo-inverse fallback.

    Args:
        Fc: ``[N, N]`` symmetric (float64).
        rhs: ``[N]`` or ``[N, k]``.
        rcond: relative eigenvalue cut-off of the equilibrated operator.

    Returns:
        β with the shape of ``rhs`` (float64).
    """
    squeeze = rhs.ndim == 1
    R = rhs.unsqueeze(1) if squeeze else rhs
    beta = _EquilibratedPinv(Fc.to(torch.float64), rcond).solve(R.to(torch.float64))
    return beta.squeeze(1) if squeeze else beta
