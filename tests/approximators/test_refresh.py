"""Refreshes: EMA of the factors and of the Fisher block (§3.1.2), sign normalisation,
non-finite statistics, and serialization of a LayerFit."""

from __future__ import annotations

import copy
import io

import approx_reference as ref
import pytest
import torch

from curvlib.approximators import (
    DeflationApproximator,
    ExactBlockApproximator,
    FitInfo,
    KFACApproximator,
    KFACCorrectedApproximator,
    KPSVDApproximator,
    LanczosApproximator,
    LayerFit,
    align_signs,
)
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import ConfigError, NumericalError, NumericalWarning
from curvlib.linalg import KroneckerSum, nearest_kronecker
from curvlib.testing.compare import assert_close

DT = torch.float64
TIGHT = dict(power_tol=1e-12, max_iters=20000)
ALL = {
    "kfac": (KFACApproximator, {}),
    "kpsvd": (KPSVDApproximator, TIGHT),
    "deflation": (DeflationApproximator, TIGHT),
    "lanczos": (LanczosApproximator, {"power_tol": 1e-12}),
    "kfac_corrected": (KFACCorrectedApproximator, TIGHT),
    "exact_block": (ExactBlockApproximator, {}),
}


def _batches(n=3):
    return [ref.linear_stats(9, 4, 3, c=2, seed=10 + s) for s in range(n)]


def test_kpsvd_factor_ema_follows_rho_over_three_refreshes():
    """"factors" mode: A = ρA_old + (1−ρ)A_new, ρ = min(1 − 1/k, γ); the batch factors are the
    dense nearest Kronecker product (same normalisation ‖A‖ = ‖B‖ = √σ, tr A > 0)."""
    gamma = 0.6
    approximator = KPSVDApproximator(dict(TIGHT, ema=gamma))
    fit, A_exp, B_exp = None, None, None
    for k, s in enumerate(_batches(), start=1):
        fit = approximator.fit(s, previous=fit)
        (A_new, B_new), = nearest_kronecker(ref.dense_block(s), s.a_dim, s.g_dim, 1, symmetrize=True).terms.terms
        rho = min(1 - 1 / k, gamma)
        A_exp = A_new if A_exp is None else rho * A_exp + (1 - rho) * A_new
        B_exp = B_new if B_exp is None else rho * B_exp + (1 - rho) * B_new
        assert fit.info.rho == pytest.approx(rho) and fit.refresh == k
        (A, B), = fit.terms
        assert_close(A, A_exp, msg=f"A at refresh {k}")
        assert_close(B, B_exp, msg=f"B at refresh {k}")


@pytest.mark.parametrize("kind,rank", [("kpsvd", 1), ("deflation", 2), ("lanczos", 2)])
def test_fisher_ema_fits_the_averaged_block(kind, rank):
    """"fisher" mode: the fit of refresh k is the nearest Kronecker sum of ρ·F̂_prev + (1−ρ)·F_batch."""
    cls, opts = ALL[kind]
    approximator = cls(dict(opts, ema=0.9, ema_mode="fisher"))
    fit = None
    for k, s in enumerate(_batches(), start=1):
        prev_dense = None if fit is None else ref.kron_sum(fit.terms)
        fit = approximator.fit(s, previous=fit)
        rho = min(1 - 1 / k, 0.9)
        target = ref.dense_block(s) if prev_dense is None else rho * prev_dense + (1 - rho) * ref.dense_block(s)
        want = nearest_kronecker(target, s.a_dim, s.g_dim, rank).terms.terms
        for j, ((A, B), (C, D)) in enumerate(zip(fit.terms, want)):
            assert_close(torch.kron(A, B), torch.kron(C, D), msg=f"refresh {k}, term {j}")


def test_factor_ema_does_not_cancel_on_a_sign_flip():
    """Two refreshes on the same statistics with γ = 1/2 reproduce the batch fit; a previous fit
    holding (−P, −Q) (the same Kronecker product) would cancel the average without sign alignment."""
    s = ref.linear_stats(9, 4, 3, c=2, seed=1)
    approximator = DeflationApproximator(dict(TIGHT, ema=0.5, warm_start=False))
    first = approximator.fit(s)
    (R, S), (P, Q) = first.terms
    assert float(torch.linalg.matrix_norm(P)) > 0
    flipped = LayerFit(block=KroneckerSum([(-R, -S), (-P, -Q)]), info=first.info, state=first.state)
    for previous in (first, flipped):
        second = approximator.fit(s, previous=previous)
        assert second.info.rho == pytest.approx(0.5)
        for (A, B), (A0, B0) in zip(second.terms, first.terms):
            assert_close(torch.kron(A, B), torch.kron(A0, B0))
            assert float(torch.linalg.matrix_norm(A)) > 0.5 * float(torch.linalg.matrix_norm(A0))


def test_align_signs_flips_both_factors():
    A, B = torch.eye(2, dtype=DT), torch.ones(3, 3, dtype=DT)
    (A2, B2), = align_signs([(-A, -B)], [(A, B)])
    assert torch.equal(A2, A) and torch.equal(B2, B)
    (A3, B3), = align_signs([(A, B)], [(A, B)])
    assert torch.equal(A3, A) and torch.equal(B3, B)


def test_kfac_corrected_ema_modes_agree_on_kfac_pair():
    """Both modes average KFAC's own pair factor-wise (§3.1.2)."""
    fits = {}
    for mode in ("factors", "fisher"):
        approximator = KFACCorrectedApproximator(dict(TIGHT, ema=0.9, ema_mode=mode))
        fit = None
        for s in _batches(2):
            fit = approximator.fit(s, previous=fit)
        fits[mode] = fit
    kfac = None
    for s in _batches(2):
        kfac = KFACApproximator({"ema": 0.9}).fit(s, previous=kfac)
    for mode, fit in fits.items():
        assert_close(fit.terms[0][0], kfac.terms[0][0], msg=mode)
        assert_close(fit.terms[0][1], kfac.terms[0][1], msg=mode)


def test_factors_change_across_refreshes():
    """DESIGN.md §10 "curvature updated once": every refresh uses the new batch."""
    approximator = DeflationApproximator(dict(TIGHT, ema=0.95))
    fit = None
    seen = []
    for s in _batches():
        fit = approximator.fit(s, previous=fit)
        seen.append(ref.kron_sum(fit.terms))
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])


# --------------------------------------------------------------------------- non-finite statistics


def _poisoned(s: LayerStatistics) -> LayerStatistics:
    g = s.g.clone()
    g[0, 0, 0] = float("nan")
    return LayerStatistics(a=s.a, g=g, scale=s.scale)


@pytest.mark.parametrize("kind", list(ALL))
def test_nonfinite_statistics_keep_previous_fit(kind):
    cls, opts = ALL[kind]
    approximator = cls(opts)
    s = ref.linear_stats(6, 3, 2, seed=2)
    previous = approximator.fit(s)
    before = copy.deepcopy(previous.state_dict())
    with pytest.warns(NumericalWarning, match="non-finite statistics.*keeping the previous fit"):
        kept = approximator.fit(_poisoned(s), previous=previous)
    assert kept is previous
    _assert_same_fit(LayerFit.from_state_dict(before), previous)  # nothing corrupted
    with pytest.raises(NumericalError, match="non-finite"):
        approximator.fit(_poisoned(s))


# --------------------------------------------------------------------------- serialization


def _assert_same_fit(f1: LayerFit, f2: LayerFit) -> None:
    assert f1.info == f2.info
    assert set(f1.state) == set(f2.state)
    for key, value in f1.state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, f2.state[key])
        else:
            assert value == f2.state[key]
    if isinstance(f1.block, KroneckerSum):
        for (A, B), (C, D) in zip(f1.terms, f2.terms):
            assert torch.equal(A, C) and torch.equal(B, D)
    else:
        assert torch.equal(f1.block.stats.a, f2.block.stats.a) and torch.equal(f1.block.stats.g, f2.block.stats.g)
        assert f1.block.scale == f2.block.scale and f1.block.dense_max == f2.block.dense_max


@pytest.mark.parametrize("kind", ["kfac", "deflation", "lanczos", "exact_block"])
def test_layer_fit_round_trips(kind):
    cls, opts = ALL[kind]
    fit = cls(dict(opts, ema=0.9) if kind != "exact_block" else opts).fit(ref.linear_stats(6, 3, 2, seed=2))
    _assert_same_fit(fit, copy.deepcopy(fit))
    buf = io.BytesIO()
    torch.save(fit, buf)
    buf.seek(0)
    _assert_same_fit(fit, torch.load(buf, weights_only=False))
    buf = io.BytesIO()
    torch.save(fit.state_dict(), buf)
    buf.seek(0)
    _assert_same_fit(fit, LayerFit.from_state_dict(torch.load(buf)))  # weights_only=True default


def test_round_tripped_fit_continues_the_ema():
    approximator = DeflationApproximator(dict(TIGHT, ema=0.9))
    b = _batches(2)
    fit = approximator.fit(b[0])
    restored = LayerFit.from_state_dict(copy.deepcopy(fit.state_dict()))
    _assert_same_fit(approximator.fit(b[1], previous=fit), approximator.fit(b[1], previous=restored))


def test_previous_of_another_kind_is_rejected():
    s = ref.linear_stats(6, 3, 2, seed=2)
    with pytest.raises(ConfigError, match="kfac"):
        KPSVDApproximator().fit(s, previous=KFACApproximator().fit(s))


def test_fit_info_residual():
    assert FitInfo(method="x", residuals=(1e-3, 2e-2)).residual == 2e-2
    assert FitInfo(method="x").residual == 0.0
