"""Independent dense float64 references for the approximator tests.

Written from the definitions only (no curvlib code beyond LayerStatistics and the
position mask of :func:`curvlib.testing.references.position_pairs`): the block
F_ii = scale·Σ_b Σ_c Σ_{t,t'} ā_{b,t} ā_{b,t'}ᵀ ⊗ g_{b,c,t} g_{b,c,t'}ᵀ is built from
per-(pair, position) vectors vec(g āᵀ) = ā ⊗ g (torch.kron) with explicit loops.
"""

from __future__ import annotations

import torch

from curvlib.curvatures.statistics import LayerStatistics
from curvlib.testing.references import position_pairs  # 0/1 [T, T] band mask ‖t − t'‖∞ ≤ radius (3.35)

DT = torch.float64


def dense_block(stats: LayerStatistics, radius: int | None = None) -> torch.Tensor:
    """F_ii ``[p, p]`` of a one-use block (optionally restricted to the band ‖t − t'‖∞ ≤ radius, (3.35))."""
    (use,) = stats.uses
    a, g = use.a.dense(), use.g
    m, c, T, _ = g.shape
    mask = position_pairs(use.geometry.shape, radius)
    p = stats.a_dim * stats.g_dim
    F = torch.zeros(p, p, dtype=DT)
    for b in range(m):
        for j in range(c):
            X = torch.stack([torch.kron(a[b, t], g[b, j, t]) for t in range(T)])  # [T, p]
            F += X.T @ mask @ X
    return stats.scale * F


def kron_sum(terms) -> torch.Tensor:
    """Σ_k A_k ⊗ B_k with torch.kron."""
    return sum(torch.kron(A, B) for A, B in terms)


def linear_stats(m: int, d_a: int, d_g: int, c: int = 1, seed: int = 0, scale: float | None = None) -> LayerStatistics:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d_a - 1, generator=gen, dtype=DT)
    a = torch.cat([a, torch.ones(m, 1, dtype=DT)], dim=1)
    g = torch.randn(m, c, d_g, generator=gen, dtype=DT)
    return LayerStatistics(a=a, g=g, scale=1.0 / (m * c) if scale is None else scale)


def conv_stats(m: int, H: int, W: int, d_a: int, d_g: int, c: int = 1, kernel=(2, 2), seed: int = 0) -> LayerStatistics:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, H * W, d_a, generator=gen, dtype=DT)
    g = torch.randn(m, c, H * W, d_g, generator=gen, dtype=DT)
    return LayerStatistics(a=a, g=g, scale=1.0 / (m * c), spatial_shape=(H, W), kernel_size=kernel, has_bias=False)


def symmetric_projector(d: int) -> torch.Tensor:
    """``[d², d²]``: vec(X) ↦ vec((X + Xᵀ)/2), column-major vec (entry (i, j) at i + d·j)."""
    P = torch.zeros(d * d, d * d, dtype=DT)
    for i in range(d):
        for j in range(d):
            P[i + d * j, i + d * j] += 0.5
            P[i + d * j, j + d * i] += 0.5
    return P


def nearest_symmetric_kronecker_products(M: torch.Tensor, d_a: int, d_b: int, rank: int) -> list[torch.Tensor]:
    """The Kronecker products σ_k MAT(u_k) ⊗ MAT(v_k) of the best rank-``rank`` Kronecker sum
    with symmetric factors: the top triplets of P_a Z(M) P_b (dense SVD)."""
    from curvlib.linalg import rearrange  # the dense Z of Def. 3.3 (tested in tests/linalg)

    Z = symmetric_projector(d_a) @ rearrange(M, d_a, d_b) @ symmetric_projector(d_b)
    U, S, Vh = torch.linalg.svd(Z)
    out = []
    for k in range(rank):
        R = U[:, k].reshape(d_a, d_a).T  # MAT, column-major
        Sm = Vh[k].reshape(d_b, d_b).T
        out.append(S[k] * torch.kron(R, Sm))
    return out
