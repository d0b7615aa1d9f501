"""``exact_block``: products, dense form and (F_ii + λI)⁻¹ in both branches against dense solves."""

from __future__ import annotations

import approx_reference as ref
import pytest
import torch

from curvlib.approximators import ExactBlock, ExactBlockApproximator
from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.linalg import unvec, vec
from curvlib.testing.compare import assert_close

DT = torch.float64

STATS = {
    "linear": lambda: ref.linear_stats(7, 4, 3, c=2, seed=0),
    "linear_wide": lambda: ref.linear_stats(3, 6, 5, c=1, seed=1),  # n = 3 < p = 30: singular F
    "conv": lambda: ref.conv_stats(2, 3, 2, 3, 2, c=2, seed=2),
}


@pytest.mark.parametrize("name", list(STATS))
def test_dense_and_products(name):
    s = STATS[name]()
    block = ExactBlock(s)
    M = ref.dense_block(s)
    assert_close(block.to_dense(), M)
    X = torch.randn(4, s.g_dim, s.a_dim, dtype=DT, generator=torch.Generator().manual_seed(3))
    want = unvec((M @ vec(X).T).T, s.g_dim, s.a_dim)
    assert_close(block.apply(X), want)
    assert_close(block.matvec(vec(X).T), M @ vec(X).T)
    assert_close(block.matvec(vec(X[0])), M @ vec(X[0]))
    assert_close(block.trace(), M.trace())
    assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(M))
    ev = torch.linalg.eigvalsh(M).flip(0)[: block.num_pairs]
    assert_close(block.nonzero_spectrum()[: ev.shape[0]], ev.clamp_min(0), atol=1e-12 * float(ev[0]))


@pytest.mark.parametrize("name", list(STATS))
@pytest.mark.parametrize("dense_max", [2048, 0], ids=["dense", "woodbury"])
def test_tikhonov_solve_equals_dense_solve(name, dense_max):
    s = STATS[name]()
    block = ExactBlock(s, dense_max=dense_max)
    M = ref.dense_block(s)
    lam = 1e-2 * float(M.diagonal().mean())
    X = torch.randn(2, 3, s.g_dim, s.a_dim, dtype=DT, generator=torch.Generator().manual_seed(4))
    rhs = vec(X).reshape(-1, s.a_dim * s.g_dim).T
    want = torch.linalg.solve(M + lam * torch.eye(M.shape[0], dtype=DT), rhs)
    got = block.tikhonov_solve(X, lam)
    assert got.shape == X.shape
    assert_close(vec(got).reshape(-1, s.a_dim * s.g_dim).T, want)
    # a second λ is not served from the first one's cached factorization
    want2 = torch.linalg.solve(M + 10 * lam * torch.eye(M.shape[0], dtype=DT), rhs)
    assert_close(vec(block.tikhonov_solve(X, 10 * lam)).reshape(-1, s.a_dim * s.g_dim).T, want2)


def test_bad_inputs():
    s = STATS["linear"]()
    block = ExactBlock(s)
    with pytest.raises(ShapeError, match=r"\[\.\.\., 3, 4\]"):
        block.apply(torch.zeros(4, 3, dtype=DT))
    with pytest.raises(DTypeDeviceError):
        block.apply(torch.zeros(3, 4, dtype=torch.float32))
    with pytest.raises(ConfigError, match="λ"):
        block.tikhonov_solve(torch.zeros(3, 4, dtype=DT), 0.0)
    with pytest.raises(ConfigError):
        ExactBlock(s, dense_max=-1)


def test_approximator_counts_refreshes():
    s = STATS["linear"]()
    approximator = ExactBlockApproximator({"dense_max": 0})
    f1 = approximator.fit(s)
    f2 = approximator.fit(s, previous=f1)
    assert (f1.refresh, f2.refresh) == (1, 2)
    assert f2.block.dense_max == 0
    with pytest.raises(TypeError, match="ExactBlock"):
        f1.terms
