"""``kpsvd_tensor`` against the higher-order power method on the dense rearranged tensor of F_ii,
its KPSVD limit, and the exact per-mode Tikhonov inverse."""

from __future__ import annotations

import copy
import io
import math
import warnings

import approx_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlib.approximators import KPSVDApproximator, LayerFit
from curvlib.approximators.tensor import KPSVDTensorApproximator, MultiKronecker, MultiKroneckerSum, balanced_split
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import ConfigError, NumericalWarning, ShapeError
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


# --------------------------------------------------------------------------- rank r, automatic modes


def _dense_psd(M: torch.Tensor) -> torch.Tensor:
    e, Q = torch.linalg.eigh(M)
    return (Q * e.clamp_min(0)) @ Q.T


@pytest.mark.parametrize("case", ["conv_auto_modes", "linear_factored"])
def test_rank_two_is_dense_hopm_of_the_residual(case):
    make, a_modes, g_modes, modes = CASES[case]
    stats = make()
    options = {"a_modes": a_modes, "g_modes": g_modes, "tol": 0.0, "max_iters": 400}
    one = KPSVDTensorApproximator(options).fit(stats)  # the same first term, and its sweeps
    fit = KPSVDTensorApproximator({**options, "rank": 2}).fit(stats)
    F = ref.dense_block(stats)
    T1 = dense_hopm(F, modes, sweeps=one.info.iterations)
    T2 = dense_hopm(F - T1, modes, sweeps=fit.info.iterations - one.info.iterations)
    first, second = fit.block.terms
    assert_close(first.to_dense(), T1, rtol=1e-9)
    assert_close(second.to_dense(), T2, rtol=1e-9, atol=1e-9 * float(T2.abs().max()))
    assert_close(fit.block.to_dense(), T1 + T2, rtol=1e-9)
    σ1, σ2 = fit.info.singular_values
    assert σ1 >= σ2 > 0
    err1 = float(torch.linalg.matrix_norm(F - T1)) ** 2
    err2 = float(torch.linalg.matrix_norm(F - fit.block.to_dense())) ** 2
    assert err2 == pytest.approx(err1 - σ2**2, rel=1e-6)  # a fixed point removes σ₂² from the residual
    assert_close(fit.block.frobenius_norm(), torch.linalg.matrix_norm(fit.block.to_dense()))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(1e-2, 10.0))
def test_rank_r_products_and_tikhonov_solve_equal_dense_ones(seed, lam):
    stats = _conv_no_bias(seed % 50, m=3)
    fit = KPSVDTensorApproximator({"rank": 3, "tol": 1e-12, "max_iters": 300}).fit(stats)
    D = fit.block.to_dense()
    p = D.shape[0]
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(2, fit.block.b_dim, fit.block.a_dim, generator=gen, dtype=DT)
    assert_close(vec(fit.block.apply(X)), (D @ vec(X).T).T)
    M = D + lam * torch.eye(p, dtype=DT)
    if float(torch.linalg.eigvalsh(M)[0]) > 1e-8 * lam:  # definite: PCG solves M itself
        want = torch.linalg.solve(M, vec(X).T).T
    else:  # the documented fallback: every term's PSD part
        want = torch.linalg.solve(sum(_dense_psd(t.to_dense()) for t in fit.block.terms) + lam * torch.eye(p, dtype=DT),
                                  vec(X).T).T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        got = vec(fit.block.tikhonov_solve(X, lam))
    assert_close(got, want, atol=1e-6 * float(want.abs().max()), rtol=0)


def test_an_indefinite_sum_falls_back_to_the_psd_parts_with_a_warning_and_keeps_it():
    gen = torch.Generator().manual_seed(0)
    spd = [(lambda X: X @ X.T + torch.eye(d, dtype=DT))(torch.randn(d, d, generator=gen, dtype=DT)) for d in (2, 3)]
    neg = [-torch.eye(2, dtype=DT), 5 * torch.eye(3, dtype=DT)]  # the product has eigenvalues −5
    block = MultiKroneckerSum([MultiKronecker(spd, (2,), (3,)), MultiKronecker(neg, (2,), (3,))])
    X = torch.randn(3, 2, generator=gen, dtype=DT)
    with pytest.warns(NumericalWarning, match="PSD part"):
        Y = block.tikhonov_solve(X, 1e-2)
    want = torch.linalg.solve(spd[0].kron(spd[1]) + 1e-2 * torch.eye(6, dtype=DT), vec(X[None]).T).T  # psd(neg) = 0
    assert_close(vec(Y[None]), want, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)  # kept for λ: no second warning
        block.tikhonov_solve(X, 1e-2)


def test_rank_r_round_trip_warm_start_ema_and_mismatches():
    stats = _conv_no_bias(7)
    approx = KPSVDTensorApproximator({"rank": 2, "tol": 1e-12, "ema": 0.5})
    first = approx.fit(stats)
    assert isinstance(first.block, MultiKroneckerSum) and len(first.block.terms) == 2
    second = approx.fit(_conv_no_bias(8), previous=first)
    alone = KPSVDTensorApproximator({"rank": 2, "tol": 1e-12}).fit(_conv_no_bias(8), previous=first)
    for t, t0, t1 in zip(second.block.terms, first.block.terms, alone.block.terms):  # ρ = min(1 − 1/2, 0.5)
        for F, F0, F1 in zip(t.factors, t0.factors, t1.factors):
            assert_close(F, 0.5 * F0 + 0.5 * F1)
    buf = io.BytesIO()
    torch.save(second.state_dict(), buf)
    buf.seek(0)
    back = LayerFit.from_state_dict(torch.load(buf))
    assert_close(back.block.to_dense(), second.block.to_dense(), rtol=0, atol=0)
    assert copy.deepcopy(second.block).terms[0]._eigen is None
    with pytest.raises(ShapeError, match="2 term\\(s\\), this one .* and 1"):
        KPSVDTensorApproximator({"rank": 1}).fit(stats, previous=first)


@pytest.mark.parametrize("d, want", [(1, (1,)), (13, (13,)), (12, (3, 4)), (784, (28, 28)), (1000, (25, 40))])
def test_balanced_split(d, want):
    assert balanced_split(d) == want


def test_auto_modes_split_every_side_without_a_bias_column():
    no_bias = ref.linear_stats(m=6, d_a=6, d_g=12, seed=9)
    no_bias = LayerStatistics(uses=no_bias.uses, scale=no_bias.scale, has_bias=False)
    fit = KPSVDTensorApproximator({"a_modes": "auto", "g_modes": "auto"}).fit(no_bias)
    assert (fit.block.a_modes, fit.block.g_modes) == ((2, 3), (3, 4))
    with_bias = LayerStatistics(uses=no_bias.uses, scale=no_bias.scale, has_bias=True)
    fit = KPSVDTensorApproximator({"a_modes": "auto", "g_modes": "auto"}).fit(with_bias)
    assert (fit.block.a_modes, fit.block.g_modes) == ((6,), (3, 4))  # [x; 1] has no product structure
    conv = KPSVDTensorApproximator({"a_modes": "auto"}).fit(_conv_no_bias(1))
    assert conv.block.a_modes == (2, 2, 2)  # the kernel split, as with None
