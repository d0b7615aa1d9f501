"""hypothesis strategies for curvlib's tests and for plugin authors.

Shapes are drawn first and data second; elements are bounded and never subnormal;
every tensor is float64 unless a ``dtype`` is given.  Data tensors are built from a
drawn integer seed through a ``torch.Generator`` (fast, and shrinks well).
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

__all__ = ["dims", "seeds", "matrices", "spd_matrices", "psd_matrices", "kronecker_factors", "linear_statistics", "conv_statistics"]

seeds = st.integers(min_value=0, max_value=2**31 - 1)


def dims(min_value: int = 1, max_value: int = 6) -> st.SearchStrategy[int]:
    return st.integers(min_value=min_value, max_value=max_value)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


@st.composite
def matrices(draw, rows: int | None = None, cols: int | None = None, *, max_dim: int = 6, dtype=torch.float64):
    """A dense matrix with entries ~ N(0, 1)."""
    r = rows if rows is not None else draw(dims(1, max_dim))
    c = cols if cols is not None else draw(dims(1, max_dim))
    return torch.randn(r, c, generator=_gen(draw(seeds)), dtype=dtype)


@st.composite
def spd_matrices(draw, n: int | None = None, *, max_dim: int = 6, min_eig: float = 0.1, dtype=torch.float64):
    """A symmetric positive definite matrix with eigenvalues ≥ ``min_eig`` (condition ≤ ~1e3)."""
    n = n if n is not None else draw(dims(1, max_dim))
    g = _gen(draw(seeds))
    X = torch.randn(n, n, generator=g, dtype=dtype)
    return X @ X.T / n + min_eig * torch.eye(n, dtype=dtype)


@st.composite
def psd_matrices(draw, n: int | None = None, *, max_dim: int = 6, max_rank: int | None = None, dtype=torch.float64):
    """A symmetric positive semi-definite matrix, possibly rank deficient."""
    n = n if n is not None else draw(dims(1, max_dim))
    k = draw(st.integers(min_value=1, max_value=max_rank or n))
    X = torch.randn(n, k, generator=_gen(draw(seeds)), dtype=dtype)
    return X @ X.T / k


@st.composite
def kronecker_factors(draw, *, max_dim: int = 5, spd: bool = True, dtype=torch.float64):
    """A pair ``(A [a, a], B [b, b])`` of SPD (or general square) factors."""
    a = draw(dims(1, max_dim))
    b = draw(dims(1, max_dim))
    if spd:
        return draw(spd_matrices(a, dtype=dtype)), draw(spd_matrices(b, dtype=dtype))
    return draw(matrices(a, a, dtype=dtype)), draw(matrices(b, b, dtype=dtype))


@st.composite
def linear_statistics(draw, *, max_m: int = 8, max_dim: int = 5, bias: bool = True, dtype=torch.float64):
    """Per-sample statistics of a Linear layer: ``(Â [m, d_a], Ĝ [m, d_g])``.

    With ``bias`` the last column of Â is 1 (ā = [a; 1]).
    """
    m = draw(dims(1, max_m))
    d_in = draw(dims(1, max_dim))
    d_g = draw(dims(1, max_dim))
    g = _gen(draw(seeds))
    A = torch.randn(m, d_in, generator=g, dtype=dtype)
    if bias:
        A = torch.cat([A, torch.ones(m, 1, dtype=dtype)], dim=1)
    G = torch.randn(m, d_g, generator=g, dtype=dtype)
    return A, G


@st.composite
def conv_statistics(draw, *, max_m: int = 3, max_hw: int = 4, max_dim: int = 4, dtype=torch.float64):
    """Per-sample, per-position statistics of a conv layer.

    Returns ``(Â [m, T, d_a], Ĝ [m, T, d_g], (H, W))`` with T = H·W positions in
    row-major order (t = row·W + col).
    """
    m = draw(dims(1, max_m))
    H = draw(dims(1, max_hw))
    W = draw(dims(1, max_hw))
    d_a = draw(dims(1, max_dim))
    d_g = draw(dims(1, max_dim))
    g = _gen(draw(seeds))
    A = torch.randn(m, H * W, d_a, generator=g, dtype=dtype)
    G = torch.randn(m, H * W, d_g, generator=g, dtype=dtype)
    return A, G, (H, W)
