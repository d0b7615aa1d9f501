"""The Gram space of the SVD-based approximators (``solver_space``, svd_based module docstring):
the same fits as the direct products, checked three ways in float64 —

* against the dense nearest Kronecker sums (Thm 3.14) of the block built by loops;
* against the direct path on refresh chains (EMA in both modes, warm starts): the same
  iteration, so the same iteration counts for the power SVD kinds;
* in float32, against a float64 fit of the same statistics.

Tolerances: TIGHT runs the solvers to a relative residual of 1e-12 on Gram matrices of full
rank (m ≤ d(d+1)/2 generic rows), two orders above the float64 rounding floor; two converged
fits then differ by ~1e-12·σ_1/gap, and ``RTOL`` = 1e-8 of the largest entry leaves a wide
margin while a wrong term (an error of order 1) fails at once.
"""

from __future__ import annotations

import warnings

import approx_reference as ref
import pytest
import torch
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
from curvlib.curvatures.statistics import LayerStatistics, Use
from curvlib.errors import NumericalError, NumericalWarning
from curvlib.linalg import nearest_kronecker
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import OneHotRows
from curvlib.linalg.zproducts import PositionZOperator
from curvlib.testing.compare import assert_close

DT = torch.float64
TIGHT = dict(power_tol=1e-12, max_iters=20000)
RTOL = 1e-8
KINDS = {"kpsvd": KPSVDApproximator, "deflation": DeflationApproximator, "lanczos": LanczosApproximator,
         "kfac_corrected": KFACCorrectedApproximator}
RANKED = {"deflation", "lanczos"}


def make(kind: str, space: str, **opts):
    if kind in RANKED:
        opts.setdefault("rank", 3)
    return KINDS[kind](dict(opts, solver_space=space))


def products(terms) -> list[torch.Tensor]:
    return [torch.kron(A, B) for A, B in terms]


def assert_same_fit(got, want, msg: str = "") -> None:
    """The same Kronecker sum term by term (factors are defined only up to A → cA, B → B/c)."""
    assert len(got) == len(want)
    scale = max(float(P.abs().max()) for P in products(want))
    for k, (P, Q) in enumerate(zip(products(got), products(want))):
        assert_close(P, Q, rtol=0.0, atol=RTOL * scale, msg=f"{msg} term {k}")


def stats(m=12, d_a=6, d_g=5, c=1, seed=0) -> LayerStatistics:
    return ref.linear_stats(m, d_a, d_g, c=c, seed=seed)


class DirectProducts:
    """Counts the products of the layers' direct Z-operators (a Gram-space fit makes none)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        for name in ("_matmat", "_rmatmat"):
            original = getattr(PositionZOperator, name)

            def counted(op, X, _original=original):
                self.calls += 1
                return _original(op, X)

            monkeypatch.setattr(PositionZOperator, name, counted)


# --------------------------------------------------------------------------- dense references


@pytest.mark.parametrize("kind", ["kpsvd", "deflation", "lanczos"])
@pytest.mark.parametrize("c", [1, 3])
def test_gram_fit_is_the_nearest_kronecker_sum(kind, c):
    s = stats(c=c, seed=c)
    fit = make(kind, "gram", **TIGHT).fit(s)
    assert fit.info.converged, fit.info
    rank = 1 if kind == "kpsvd" else 3
    nk = nearest_kronecker(ref.dense_block(s), s.a_dim, s.g_dim, rank=rank)
    assert_same_fit(fit.terms, nk.terms.terms, msg=kind)


def test_gram_kfac_corrected_fits_the_kfac_residual():
    s = stats(c=2, seed=4)
    (A, G), (P, Q) = make("kfac_corrected", "gram", **TIGHT).fit(s).terms
    A_ref, G_ref = kfac_factors(s)[0]
    assert_close(A, A_ref)
    assert_close(G, G_ref)
    nk = nearest_kronecker(ref.dense_block(s) - torch.kron(A_ref, G_ref), s.a_dim, s.g_dim, rank=1)
    assert_same_fit([(P, Q)], nk.terms.terms, msg="correction")
    assert float(P.trace()) > 0  # the sign convention of factors_from_singular


# --------------------------------------------------------------------------- the same fits as direct


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("ema_mode", ["factors", "fisher"])
def test_gram_refresh_chain_equals_direct(kind, ema_mode):
    """Three refreshes with EMA and warm starts: the same terms and, once warm-started from the
    same vectors (refreshes 2 and 3; a cold fit draws its random start in a different space),
    the same iteration counts for the power SVD kinds — the Gram space runs the same iteration
    (up to one step per triplet where rounding decides the stopping test)."""
    opts = dict(TIGHT, ema=0.9, ema_mode=ema_mode)
    fits = {}
    for space in ("direct", "gram"):
        approximator, previous, chain = make(kind, space, **opts), None, []
        for seed in range(3):
            previous = approximator.fit(stats(c=2, seed=20 + seed), previous=previous)
            chain.append(previous)
        fits[space] = chain
    for k, (d, g) in enumerate(zip(fits["direct"], fits["gram"])):
        assert d.info.converged and g.info.converged
        assert_same_fit(g.terms, d.terms, msg=f"{kind} refresh {k + 1}")
        if kind != "lanczos" and k > 0:
            assert abs(g.info.iterations - d.info.iterations) <= len(g.terms), (k, g.info, d.info)
        assert_close(torch.tensor(g.info.singular_values), torch.tensor(d.info.singular_values), rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unconstrained_factors_agree(kind):
    s = stats(c=2, seed=8)
    d = make(kind, "direct", symmetric_factors=False, **TIGHT).fit(s)
    g = make(kind, "gram", symmetric_factors=False, **TIGHT).fit(s)
    assert_same_fit(g.terms, d.terms, msg=kind)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_positions_one_hot_and_transposed_uses(kind):
    """Rows at positions (r = 0), one-hot rows (an embedding), a use entering W̄ transposed."""
    gen = torch.Generator().manual_seed(9)
    m, T = 3, 4
    idx = torch.randint(-1, 7, (m, T), generator=gen)
    one_hot = LayerStatistics(uses=[Use(OneHotRows(idx, 7, dtype=DT), torch.randn(m, 2, T, 3, generator=gen, dtype=DT),
                                        Geometry.sequence(T))], scale=0.3, has_bias=False)
    tokens = LayerStatistics(a=torch.randn(m, T, 5, generator=gen, dtype=DT),
                             g=torch.randn(m, 1, T, 4, generator=gen, dtype=DT), geometry=Geometry.sequence(T), scale=0.5)
    transposed = LayerStatistics(uses=[Use(torch.randn(m, T, 4, generator=gen, dtype=DT),
                                           torch.randn(m, 1, T, 5, generator=gen, dtype=DT), Geometry.sequence(T), True)],
                                 scale=0.5, has_bias=False)
    for name, s in (("one-hot", one_hot), ("tokens", tokens), ("transposed", transposed)):
        opts = dict(power_tol=1e-6, max_iters=5000)  # one-hot Gram matrices are singular (repeated tokens)
        d, g = make(kind, "direct", **opts).fit(s), make(kind, "gram", **opts).fit(s)
        M = ref.dense_block(s) if name != "transposed" else None
        scale = max(float(P.abs().max()) for P in products(d.terms))
        for k, (P, Q) in enumerate(zip(products(g.terms), products(d.terms))):
            assert_close(P, Q, rtol=0.0, atol=1e-4 * scale, msg=f"{kind} {name} term {k}")
        if M is not None:
            err_d = torch.linalg.matrix_norm(M - ref.kron_sum(d.terms))
            err_g = torch.linalg.matrix_norm(M - ref.kron_sum(g.terms))
            assert float(err_g) <= float(err_d) * (1 + 1e-6) + 1e-9 * float(torch.linalg.matrix_norm(M))


# --------------------------------------------------------------------------- which space


def test_gram_space_makes_no_direct_products(monkeypatch):
    counter = DirectProducts(monkeypatch)
    s = stats(m=64, d_a=40, d_g=30, seed=3)
    for kind in KINDS:
        counter.calls = 0
        make(kind, "gram").fit(s)
        assert counter.calls == 0, kind
        make(kind, "auto").fit(s)  # 64 rows, d ~ 35: the Gram matrices cost less than a product
        assert counter.calls == 0, kind
        make(kind, "direct").fit(s)
        assert counter.calls > 0, kind


def test_auto_goes_direct_when_the_gram_matrices_cost_more(monkeypatch):
    counter = DirectProducts(monkeypatch)
    make("kpsvd", "auto").fit(stats(m=400, d_a=4, d_g=3, seed=1))  # n² (d_a + d_g) ≫ 4·n(d_a² + d_g²)
    assert counter.calls > 0


def test_auto_goes_direct_for_float64_tolerances(monkeypatch):
    """Below 1e-7 the Gram space's square-root norms are not accurate enough (GRAM_MIN_TOL)."""
    counter = DirectProducts(monkeypatch)
    make("kpsvd", "auto", power_tol=1e-12).fit(stats(m=64, d_a=40, d_g=30, seed=3))
    assert counter.calls > 0


# --------------------------------------------------------------------------- float32, edge cases


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_float32_gram_fit_is_as_accurate_as_direct(kind):
    """Both float32 fits against the float64 fit of the same (float32-rounded) statistics."""
    s64 = stats(m=96, d_a=24, d_g=20, seed=5)
    s32 = LayerStatistics(a=s64.uses[0].a.dense().float(), g=s64.uses[0].g.float(), scale=s64.scale)
    truth = make(kind, "direct", **TIGHT).fit(s32.to(DT))
    M = ref.kron_sum(truth.terms)
    for space in ("direct", "gram"):
        fit = make(kind, space).fit(s32)
        assert fit.block.dtype == torch.float32
        err = torch.linalg.matrix_norm(ref.kron_sum([(A.double(), B.double()) for A, B in fit.terms]) - M)
        assert float(err) <= 2e-3 * float(torch.linalg.matrix_norm(M)), (kind, space, float(err))


def test_float32_gram_deflation_finds_a_small_second_term():
    """σ_2/σ_1 ≈ 2e-3 and nearly parallel columns g_b (a random v = Yβ would see only the
    leading direction): the rank test must not take the second term for rounding."""
    gen = torch.Generator().manual_seed(0)
    m, d_in, d_g = 256, 9, 100
    a = torch.cat([0.1 * torch.randn(m, d_in, generator=gen, dtype=DT), torch.ones(m, 1, dtype=DT)], 1)
    g = (torch.randn(d_g, generator=gen, dtype=DT) + 0.1 * torch.randn(m, d_g, generator=gen, dtype=DT))[:, None, :]
    sigma = DeflationApproximator(TIGHT).fit(LayerStatistics(a=a, g=g, scale=1 / m)).info.singular_values
    fit = make("deflation", "gram", rank=2, power_tol=1e-6, max_iters=5000).fit(
        LayerStatistics(a=a.float(), g=g.float(), scale=1 / m))
    assert fit.info.singular_values[1] == pytest.approx(sigma[1], rel=1e-3)


@pytest.mark.parametrize("kind", ["deflation", "lanczos", "kfac_corrected"])
def test_gram_kronecker_rank_one_block_gives_a_zero_extra_term(kind):
    """One sample, one column: F = ā āᵀ ⊗ g gᵀ, a one-dimensional coefficient space."""
    s = ref.linear_stats(1, 4, 3, c=1, seed=8)
    fit = make(kind, "gram", **TIGHT).fit(s)
    M = ref.dense_block(s)
    assert_close(ref.kron_sum(fit.terms), M)
    P, Q = fit.terms[1]
    assert float(torch.linalg.matrix_norm(torch.kron(P, Q))) <= 1e-10 * float(torch.linalg.matrix_norm(M))
    if "v0" in fit.state:  # kfac_corrected: no correction to solve for, no vectors (as on the direct path)
        assert bool(torch.isfinite(fit.state["v0"]).all())


def test_warm_start_vectors_are_the_right_factors():
    """state["v0"] holds vec(B_k)/‖B_k‖_F (± the right singular vectors), whichever space fitted
    it, and a refresh in one space continues a fit of the other."""
    s1, s2 = stats(c=2, seed=30), stats(c=2, seed=31)
    fit = make("deflation", "gram", rank=2, **TIGHT).fit(s1)
    V = fit.state["v0"]
    assert V.shape == (s1.g_dim**2, 2)
    for k, (_, B) in enumerate(fit.terms):
        assert_close(V[:, k], B.reshape(-1) / torch.linalg.matrix_norm(B))
    direct = make("deflation", "direct", rank=2, **TIGHT).fit(s1)
    for previous in (fit, direct):
        for space in ("direct", "gram"):
            warm = make("deflation", space, rank=2, **TIGHT).fit(s2, previous=previous)
            cold = make("deflation", space, rank=2, **TIGHT).fit(s2)
            assert warm.info.converged
            assert_same_fit(warm.terms, cold.terms, msg=space)


def test_overflowing_statistics_keep_the_previous_fit():
    """Finite statistics whose Gram matrices overflow float32: the solver's NumericalError makes
    the approximator keep the previous fit (with a warning), as on the direct path."""
    s = LayerStatistics(a=torch.randn(8, 5), g=torch.randn(8, 1, 4), scale=0.1)
    huge = LayerStatistics(a=torch.randn(8, 5), g=torch.full((8, 1, 4), 1e20), scale=0.1)
    approximator = make("kpsvd", "gram")
    previous = approximator.fit(s)
    with pytest.warns(NumericalWarning, match="keeping the previous fit"):
        kept = approximator.fit(huge, previous=previous)
    assert kept is previous
    with pytest.raises(NumericalError):
        approximator.fit(huge)


def test_end_to_end_auto_on_a_model_matches_direct():
    """``approximate`` on a small MLP in float32: the default (auto) and direct fits agree to
    the float32 solver tolerance."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 10))
    X, y = torch.randn(48, 20), torch.randint(0, 10, (48,))
    F = curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=torch.Generator().manual_seed(0))
    for kind in KINDS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", NumericalWarning)
            auto, direct = approximate(F, kind), approximate(F, kind, solver_space="direct")
        for a, d in zip(auto, direct):
            scale = max(float(P.abs().max()) for P in products(d.terms))
            for P, Q in zip(products(a.terms), products(d.terms)):
                assert_close(P, Q, rtol=0.0, atol=2e-3 * scale, msg=kind)
