"""``kpsvd_tensor`` against the higher-order power method on the dense rearranged tensor of F_ii,
its KPSVD limit, and the exact per-mode Tikhonov inverse."""

from __future__ import annotations

import copy
import io
import math

import approx_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlib.approximators import KPSVDApproximator, LayerFit
from curvlib.approximators.tensor import KPSVDTensorApproximator, MultiKronecker
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import ConfigError
from curvlib.linalg import vec
from curvlib.testing.compare import assert_close

DT = torch.float64


def dense_hopm(F: torch.Tensor, modes: tuple[int, ...], sweeps: int) -> torch.Tensor:
    """The best rank-1 fit ⊗_j A_j of F by HOPM on the order-K tensor of its rearranged
    [d_j, d_j] slices: F[(i_1…i_K), (i'_1…i'_K)] → 𝒯[(i_1, i'_1), …, (i_K, i'_K)]."""
    K = len(modes)
    T = F.reshape(*modes, *modes)
    T = T.permute(*[x for j in range(K) for x in (j, K + j)]).reshape(*[d * d for d in modes])
    v = [torch.eye(d, dtype=DT).reshape(-1) for d in modes]
    for _ in range(sweeps):
        for j in range(K):
            W = T
            for k in reversed(range(K)):  # contract every other mode with its vector
                if k != j:
                    W = torch.tensordot(W, v[k], dims=([k], [0]))
            v[j] = W / math.prod(float(v[k] @ v[k]) for k in range(K) if k != j)
    out = v[0].reshape(modes[0], modes[0])
    for j in range(1, K):
        out = torch.kron(out, v[j].reshape(modes[j], modes[j]))
    return out


def _conv_no_bias(seed, c_in=2, kernel=(2, 2), d_g=3, m=4, c=2, H=3, W=2):
    gen = torch.Generator().manual_seed(seed)
    d_a = c_in * math.prod(kernel)
    a = torch.randn(m, H * W, d_a, generator=gen, dtype=DT)
    g = torch.randn(m, c, H * W, d_g, generator=gen, dtype=DT)
    return LayerStatistics(a=a, g=g, scale=1.0 / (m * c), spatial_shape=(H, W), kernel_size=kernel, has_bias=False)


CASES = {
    "conv_auto_modes": (lambda: _conv_no_bias(1), None, None, (2, 2, 2, 3)),
    "linear_factored": (lambda: ref.linear_stats(m=10, d_a=6, d_g=4, c=2, seed=2), (2, 3), (2, 2), (2, 3, 2, 2)),
    "linear_three_a_modes": (lambda: ref.linear_stats(m=6, d_a=8, d_g=3, seed=3), (2, 2, 2), None, (2, 2, 2, 3)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_equals_dense_hopm(case):
    make, a_modes, g_modes, modes = CASES[case]
    stats = make()
    fit = KPSVDTensorApproximator({"a_modes": a_modes, "g_modes": g_modes, "tol": 0.0, "max_iters": 400}).fit(stats)
    assert fit.block.a_modes + fit.block.g_modes == modes
    want = dense_hopm(ref.dense_block(stats), modes, sweeps=fit.info.iterations)
    assert_close(fit.block.to_dense(), want, rtol=1e-9)
    σ = fit.info.singular_values[0]  # ‖⊗A‖_F = σ, and ⟨F, ⊗A⟩ = σ² at a fixed point
    assert_close(fit.block.frobenius_norm(), torch.tensor(σ, dtype=DT))
    assert float((ref.dense_block(stats) * fit.block.to_dense()).sum()) == pytest.approx(σ**2, rel=1e-9)


def test_one_mode_per_side_is_kpsvd():
    stats = ref.conv_stats(m=3, H=2, W=2, d_a=4, d_g=3, c=2, seed=4)  # has_bias=False, but a_modes given as one mode
    fit = KPSVDTensorApproximator({"a_modes": (4,), "tol": 0.0, "max_iters": 2000}).fit(stats)
    kpsvd = KPSVDApproximator({"power_tol": 1e-13, "max_iters": 2000, "band_radius": None}).fit(stats)
    assert_close(fit.block.to_dense(), kpsvd.block.to_dense(), rtol=1e-8)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_factors_are_psd_and_the_fit_never_worse_than_the_identity_start(seed):
    stats = _conv_no_bias(seed, m=3)
    F = ref.dense_block(stats)
    fit = KPSVDTensorApproximator({"tol": 1e-10}).fit(stats)
    for A in fit.block.factors:
        assert float(torch.linalg.eigvalsh(A)[0]) >= -1e-10 * float(torch.linalg.matrix_norm(A))
    best_identity = float(torch.trace(F)) ** 2 / F.shape[0]  # ‖F − cI‖² = ‖F‖² − tr(F)²/p at the best c
    assert float(torch.linalg.matrix_norm(F - fit.block.to_dense())) ** 2 <= \
        float(torch.linalg.matrix_norm(F)) ** 2 - best_identity + 1e-12


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(1e-3, 10.0))
def test_block_products_and_exact_tikhonov_inverse(seed, lam):
    gen = torch.Generator().manual_seed(seed)
    factors = []
    for d in (2, 3, 2):
        X = torch.randn(d, d, generator=gen, dtype=DT)
        factors.append(X @ X.T)
    block = MultiKronecker(factors, (2, 3), (2,))
    D = block.to_dense()
    X = torch.randn(3, 2, 6, generator=gen, dtype=DT)
    assert_close(vec(block.apply(X)), (D @ vec(X).T).T)
    want = torch.linalg.solve(D + lam * torch.eye(12, dtype=DT), vec(X).T).T
    assert_close(vec(block.tikhonov_solve(X, lam)), want, atol=1e-10 * float(want.abs().max()), rtol=0)
    assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(D))


def test_round_trip_bad_modes_and_warm_start():
    stats = _conv_no_bias(5)
    approx = KPSVDTensorApproximator({"tol": 1e-12})
    first = approx.fit(stats)
    warm = approx.fit(stats, previous=first)
    assert warm.info.iterations < first.info.iterations
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    back = LayerFit.from_state_dict(torch.load(buf))
    assert all(torch.equal(a, b) for a, b in zip(first.block.factors, back.block.factors))
    assert copy.deepcopy(first.block)._eigen is None
    with pytest.raises(ConfigError, match="a_modes = \\(3, 3\\) has the product 9"):
        KPSVDTensorApproximator({"a_modes": (3, 3)}).fit(stats)
