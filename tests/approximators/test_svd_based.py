"""``kpsvd``, ``deflation``, ``lanczos``, ``kfac_corrected`` against dense nearest-Kronecker fits
(Thm 3.14) of the dense block, for Linear and conv layers.

Tolerances: the solvers run with power_tol = 1e-12 (relative residual), two orders above
the float64 rounding floor of the residual test (~1e-14 here), so a converged triplet is
off by ~1e-12·σ_1/gap — far inside the default eps-based tolerances of ``assert_close``
(rtol ≈ 2e-10), which the fits are compared with.
"""

from __future__ import annotations

import approx_reference as ref
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from curvlib.approximators import (
    DeflationApproximator,
    KFACCorrectedApproximator,
    KPSVDApproximator,
    LanczosApproximator,
    approximate,
    kfac_factors,
)
from curvlib.curvatures.api import curvature
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.linalg import nearest_kronecker
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import linear_statistics

DT = torch.float64
TIGHT = dict(power_tol=1e-12, max_iters=20000)


def _products(terms):
    """Each term's Kronecker product (factors are defined only up to A → cA, B → B/c)."""
    return [torch.kron(A, B) for A, B in terms]


def _check_fit(fit_terms, M, d_a, d_g, rank):
    nk = nearest_kronecker(M, d_a, d_g, rank=rank)
    for k, (got, want) in enumerate(zip(_products(fit_terms), _products(nk.terms.terms))):
        assert_close(got, want, msg=f"term {k}")


@pytest.fixture(scope="module")
def mlp_fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(12, 4, dtype=DT)
    y = torch.randint(0, 3, (12,))
    return curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=torch.Generator().manual_seed(0), mc_samples=2)


@pytest.mark.parametrize("kind,rank", [("kpsvd", 1), ("deflation", 2), ("lanczos", 2), ("deflation", 3)])
def test_matches_nearest_kronecker_of_dense_block(mlp_fisher, kind, rank):
    opts = dict(TIGHT) if kind == "kpsvd" else dict(TIGHT, rank=rank)
    approx = approximate(mlp_fisher, kind, **opts)
    for i, L in enumerate(mlp_fisher.layers):
        fit = approx[i]
        assert fit.info.converged, fit.info
        assert len(fit.terms) == rank
        _check_fit(fit.terms, mlp_fisher.block(i, i).to_dense(), L.a_dim, L.g_dim, rank)


def test_kpsvd_factors_symmetric_psd(mlp_fisher):
    """Prop. 3.2: the selected solution has symmetric PSD factors."""
    for fit in approximate(mlp_fisher, "kpsvd", **TIGHT):
        (A, B), = fit.terms
        assert_close(A, A.T)
        assert_close(B, B.T)
        for X in (A, B):
            ev = torch.linalg.eigvalsh(X)
            assert float(ev.min()) >= -1e-10 * float(ev.max())


def test_deflation_second_term_is_really_deflated(mlp_fisher):
    """The second term is orthogonal to the first (⟨R_1, R_2⟩⟨S_1, S_2⟩ = 0), not a copy of it."""
    fit = approximate(mlp_fisher, "deflation", **TIGHT)[1]
    (R1, S1), (R2, S2) = fit.terms
    inner = (R1 * R2).sum() * (S1 * S2).sum()
    assert abs(float(inner)) <= 1e-10 * float(torch.linalg.matrix_norm(torch.kron(R1, S1)) ** 2)
    assert fit.info.singular_values[1] < fit.info.singular_values[0]


def test_kfac_corrected_fits_the_kfac_residual(mlp_fisher):
    approx = approximate(mlp_fisher, "kfac_corrected", **TIGHT)
    for i, L in enumerate(mlp_fisher.layers):
        s = mlp_fisher.statistics(i)
        (A, G), (P, Q) = approx[i].terms
        # the KFAC pair is kfac's own, from loops
        A_ref = sum(torch.outer(s.a[b, 0], s.a[b, 0]) for b in range(s.m)) / s.m
        G_ref = s.scale * sum(torch.outer(s.g[b, j, 0], s.g[b, j, 0]) for b in range(s.m) for j in range(s.c))
        assert_close(A, A_ref)
        assert_close(G, G_ref)
        residual = mlp_fisher.block(i, i).to_dense() - torch.kron(A_ref, G_ref)
        _check_fit([(P, Q)], residual, L.a_dim, L.g_dim, 1)


def test_correction_sign_is_deterministic():
    """Two cold fits from different random starts return the same correction factors (not just ±)."""
    s = ref.linear_stats(7, 4, 3, c=2, seed=3)
    f1 = KFACCorrectedApproximator(dict(TIGHT, seed=1, warm_start=False)).fit(s)
    f2 = KFACCorrectedApproximator(dict(TIGHT, seed=2, warm_start=False)).fit(s)
    for (X1, Y1), (X2, Y2) in zip(f1.terms, f2.terms):
        assert_close(X1, X2)
        assert_close(Y1, Y2)
    P = f1.terms[1][0]
    assert float(P.trace()) > 0  # the documented convention (tr P not ≈ 0 here)


@given(linear_statistics(max_m=6, max_dim=4), st.sampled_from(["deflation", "lanczos"]))
def test_frobenius_error_non_increasing_from_rank_1_to_2(data, kind):
    A, G = data
    s = LayerStatistics(a=A, g=G[:, None, :], scale=1.0 / A.shape[0])
    M = ref.dense_block(s)
    opts = dict(power_tol=1e-12, rank=1)
    if kind == "deflation":
        opts["max_iters"] = 5000
        cls = DeflationApproximator
    else:
        cls = LanczosApproximator
    e1 = torch.linalg.matrix_norm(M - ref.kron_sum(cls(opts).fit(s).terms))
    e2 = torch.linalg.matrix_norm(M - ref.kron_sum(cls(dict(opts, rank=2)).fit(s).terms))
    assert float(e2) <= float(e1) * (1 + 1e-9) + 1e-12 * float(torch.linalg.matrix_norm(M))


def test_warm_start_uses_fewer_iterations():
    s = ref.linear_stats(20, 6, 5, c=2, seed=7)
    approximator = DeflationApproximator(dict(power_tol=1e-10, max_iters=5000))
    cold = approximator.fit(s)
    warm = approximator.fit(s, previous=cold)
    assert cold.info.converged and warm.info.converged
    assert warm.info.iterations < cold.info.iterations, (warm.info, cold.info)
    no_warm = DeflationApproximator(dict(power_tol=1e-10, max_iters=5000, warm_start=False)).fit(s, previous=cold)
    assert no_warm.info.iterations == cold.info.iterations


# --------------------------------------------------------------------------- convolutions


@pytest.fixture(scope="module")
def conv_fisher():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1),
        nn.Flatten(),
        nn.Linear(200, 3),
    ).to(DT)
    X = torch.randn(3, 2, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (3,))
    return curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=torch.Generator().manual_seed(1), mc_samples=2)


def _check_symmetric_fit(fit_terms, M, d_a, d_g, rank):
    want = ref.nearest_symmetric_kronecker_products(M, d_a, d_g, rank)
    for k, (got, w) in enumerate(zip(_products(fit_terms), want)):
        assert_close(got, w, msg=f"term {k}")


@pytest.mark.parametrize("kind,rank", [("kpsvd", 1), ("deflation", 2), ("lanczos", 2), ("kfac_corrected", 2)])
@pytest.mark.parametrize("layer", [0, 1], ids=["Conv2d", "ConvTranspose2d"])
def test_conv_exact_band_equals_dense_block(conv_fisher, kind, rank, layer):
    """band_radius=None: the fit of the exact block (3.28), with symmetric factors (default)."""
    opts = dict(TIGHT, band_radius=None)
    fit = approximate(conv_fisher, kind, layers=[layer], **opts)[layer]
    L = conv_fisher.layers[layer]
    M = conv_fisher.block(layer, layer).to_dense()
    assert_close(M, ref.dense_block(conv_fisher.statistics(layer)), msg="reference block")
    if kind == "kfac_corrected":
        (A, G), = kfac_factors(conv_fisher.statistics(layer))
        _check_symmetric_fit(fit.terms[1:], M - torch.kron(A, G), L.a_dim, L.g_dim, 1)
    else:
        _check_symmetric_fit(fit.terms, M, L.a_dim, L.g_dim, rank)
    for A, B in fit.terms:
        assert_close(A, A.T)
        assert_close(B, B.T)


@pytest.mark.parametrize("kind", ["deflation", "lanczos"])
@pytest.mark.parametrize("layer", [0, 1], ids=["Conv2d", "ConvTranspose2d"])
def test_conv_unconstrained_equals_nearest_kronecker(conv_fisher, kind, layer):
    """symmetric_factors=False: the unconstrained best fit (3.25), antisymmetric pairs allowed."""
    fit = approximate(conv_fisher, kind, layers=[layer], band_radius=None, symmetric_factors=False, rank=3, **TIGHT)[layer]
    L = conv_fisher.layers[layer]
    _check_fit(fit.terms, conv_fisher.block(layer, layer).to_dense(), L.a_dim, L.g_dim, 3)


@pytest.mark.parametrize("layer", [0, 1], ids=["Conv2d", "ConvTranspose2d"])
def test_conv_default_band_is_kernel_size(conv_fisher, layer):
    """Default band r = kernel size on 2-D positions (3.35), §3.4.3 — here smaller than the grid."""
    s = conv_fisher.statistics(layer)
    r = max(s.geometry.kernel)
    assert r < max(s.geometry.shape) - 1  # a real band, not every pair
    fit = approximate(conv_fisher, "deflation", layers=[layer], **TIGHT)[layer]
    _check_symmetric_fit(fit.terms, ref.dense_block(s, radius=r), s.a_dim, s.g_dim, 2)
    fit_any = approximate(conv_fisher, "deflation", layers=[layer], symmetric_factors=False, **TIGHT)[layer]
    _check_fit(fit_any.terms, ref.dense_block(s, radius=r), s.a_dim, s.g_dim, 2)


def test_antisymmetric_pairs_exist_in_conv_blocks(conv_fisher):
    """Why ``symmetric_factors`` exists: a leading triplet of a conv block's Z is an antisymmetric pair."""
    s = conv_fisher.statistics(0)
    fit = approximate(conv_fisher, "deflation", layers=[0], symmetric_factors=False, **TIGHT)[0]
    (R, S) = fit.terms[1]
    assert_close(R, -R.T)
    assert_close(S, -S.T)
    assert float(torch.linalg.matrix_norm(R)) > 0


def test_kpsvd_single_layer_class_api():
    s = ref.conv_stats(2, 3, 4, 3, 2, c=2, kernel=(2, 2), seed=5)
    fit = KPSVDApproximator(dict(TIGHT, band_radius=1)).fit(s)
    _check_symmetric_fit(fit.terms, ref.dense_block(s, radius=1), 3, 2, 1)


def test_float32_deflation_finds_a_small_second_term():
    """σ_2/σ_1 ≈ 2e-3 with d_g² = 10⁴: in float32 a random vector sees only ~σ_2/100 of the
    deflated operator, which must not be mistaken for rounding (the second term stays)."""
    gen = torch.Generator().manual_seed(0)
    m, d_in, d_g = 256, 9, 100
    a = torch.cat([0.1 * torch.randn(m, d_in, generator=gen, dtype=DT), torch.ones(m, 1, dtype=DT)], 1)
    g = (torch.randn(d_g, generator=gen, dtype=DT) + 0.1 * torch.randn(m, d_g, generator=gen, dtype=DT))[:, None, :]
    s64 = LayerStatistics(a=a, g=g, scale=1 / m)
    s32 = LayerStatistics(a=a.float(), g=g.float(), scale=1 / m)
    sigma = DeflationApproximator(TIGHT).fit(s64).info.singular_values
    assert sigma[1] / sigma[0] < 5e-3
    fit = DeflationApproximator(dict(power_tol=1e-6, max_iters=5000)).fit(s32)
    assert fit.block.dtype == torch.float32
    assert fit.info.singular_values[1] == pytest.approx(sigma[1], rel=1e-3)


@pytest.mark.parametrize("kind", ["deflation", "lanczos", "kfac_corrected"])
def test_kronecker_rank_one_block_gives_zero_extra_term(kind):
    """One sample, one column: F = ā āᵀ ⊗ g gᵀ has Kronecker rank 1 — the second term is 0, not NaN."""
    s = ref.linear_stats(1, 4, 3, c=1, seed=8)
    cls = {"deflation": DeflationApproximator, "lanczos": LanczosApproximator, "kfac_corrected": KFACCorrectedApproximator}[kind]
    fit = cls(TIGHT).fit(s)
    M = ref.dense_block(s)
    assert_close(ref.kron_sum(fit.terms), M)
    P, Q = fit.terms[1]
    assert float(torch.linalg.matrix_norm(torch.kron(P, Q))) <= 1e-10 * float(torch.linalg.matrix_norm(M))
