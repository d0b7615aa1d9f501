"""``tikhonov``: M = Σ_k A_k⊗B_k + λI (4.54), against dense float64 solves."""

from __future__ import annotations

import warnings

import pytest
import torch
from damping_reference import (
    FakeExactBlock,
    assert_solve_accuracy,
    dense_solve,
    eye,
    psd_part,
    randn,
    spd,
    symmetric_indefinite,
    vec,
)
from hypothesis import given
from hypothesis import strategies as st

from curvlib.damping import (
    DenseTikhonovInverse,
    EigenTikhonovInverse,
    PCGTikhonovInverse,
    TikhonovDamping,
)
from curvlib.errors import ConfigError, NumericalWarning, PerformanceWarning
from curvlib.linalg import KroneckerSum
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import dims, seeds, spd_matrices

lambdas = st.floats(min_value=1e-2, max_value=10.0, allow_nan=False, allow_subnormal=False)
PCG_TOL = 1e-12


def dense_sum(terms) -> torch.Tensor:
    return sum(torch.kron(A, B) for A, B in terms)


@given(a=dims(1, 5), b=dims(1, 5), data=st.data(), lam=lambdas, seed=seeds)
def test_one_term_is_exact_normal_damping(a, b, data, lam, seed):
    A, B = data.draw(spd_matrices(a)), data.draw(spd_matrices(b))
    inv = TikhonovDamping(value=lam).invert(KroneckerSum([(A, B)]))
    assert isinstance(inv, EigenTikhonovInverse)
    M = torch.kron(A, B) + lam * eye(a * b)
    X = randn(3, b, a, seed=seed)
    assert_close(inv.solve(X), dense_solve(M, X))
    x = randn(a * b, seed=seed + 1)
    assert_close(inv @ x, torch.linalg.solve(M, x))
    Xk = randn(a * b, 4, seed=seed + 2)
    assert_close(inv.matvec(Xk), torch.linalg.solve(M, Xk))
    assert_close(inv.to_dense(), torch.linalg.inv(M))
    assert inv.info.method == "eigen" and inv.info.lam == lam
    assert inv.shape == (a * b, a * b) and (inv.a_dim, inv.b_dim) == (a, b)


@given(a=dims(1, 4), b=dims(1, 4), data=st.data(), lam=lambdas, seed=seeds, rank=st.integers(2, 3))
def test_several_spd_terms_pcg_and_exact_match_dense(a, b, data, lam, seed, rank):
    terms = [(data.draw(spd_matrices(a)), data.draw(spd_matrices(b))) for _ in range(rank)]
    M = dense_sum(terms) + lam * eye(a * b)
    X = randn(2, b, a, seed=seed)
    ref = dense_solve(M, X)

    inv = TikhonovDamping(value=lam, pcg_tol=PCG_TOL).invert(KroneckerSum(terms))
    assert isinstance(inv, PCGTikhonovInverse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        out = inv.solve(X)
    assert_solve_accuracy(out, ref, M, PCG_TOL)
    assert inv.info.converged and inv.info.fallback is None and inv.info.certified_definite
    assert inv.info.iterations <= 2 * a * b

    with pytest.warns(PerformanceWarning, match="dense"):
        exact = TikhonovDamping(value=lam, method="exact").invert(KroneckerSum(terms))
    assert isinstance(exact, DenseTikhonovInverse)
    assert_close(exact.solve(X), ref)
    assert_close(exact @ vec(X).T, vec(ref).T)


def test_indefinite_correction_within_lambda_is_solved_as_is():
    a, b = 3, 4
    A, B = spd(a, seed=1), spd(b, seed=2)
    C, D = symmetric_indefinite(a, seed=3), spd(b, seed=4)
    S = torch.kron(A, B) + torch.kron(C, D)
    lam_min = float(torch.linalg.eigvalsh(S).min())
    assert lam_min < 0 < float(torch.linalg.eigvalsh(torch.kron(C, D)).max())
    lam = -lam_min + 0.05  # the damped sum is SPD although the correction is indefinite
    M = S + lam * eye(a * b)
    X = randn(5, b, a, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        inv = TikhonovDamping(value=lam, pcg_tol=PCG_TOL).invert(KroneckerSum([(A, B), (C, D)]))
        out = inv.solve(X)
    assert_solve_accuracy(out, dense_solve(M, X), M, PCG_TOL)
    assert inv.info.fallback is None
    with pytest.warns(PerformanceWarning):
        exact = TikhonovDamping(value=lam, method="exact").invert(KroneckerSum([(A, B), (C, D)]))
    assert exact.info.fallback is None
    assert_close(exact.solve(X), dense_solve(M, X))


def indefinite_beyond_lambda(both_indefinite: bool):
    a, b = 3, 4
    A, B = spd(a, seed=11), spd(b, seed=12)
    # with both factors indefinite, the PSD part keeps C⁻⊗D⁻ as well as C⁺⊗D⁺
    C = 3.0 * symmetric_indefinite(a, seed=13)
    D = symmetric_indefinite(b, seed=14) if both_indefinite else spd(b, seed=14)
    lam = 1e-2
    S = torch.kron(A, B) + torch.kron(C, D)
    assert float(torch.linalg.eigvalsh(S).min()) < -10 * lam  # not PD even with λ
    # the documented fallback: every Kronecker term replaced by its PSD part (dense eigh here)
    M_psd = psd_part(torch.kron(A, B)) + psd_part(torch.kron(C, D)) + lam * eye(a * b)
    return [(A, B), (C, D)], lam, M_psd


@pytest.mark.parametrize("both_indefinite", [False, True])
def test_indefinite_correction_beyond_lambda_takes_psd_part_fallback_pcg(both_indefinite):
    terms, lam, M_psd = indefinite_beyond_lambda(both_indefinite)
    b, a = terms[0][1].shape[0], terms[0][0].shape[0]
    inv = TikhonovDamping(value=lam, pcg_tol=PCG_TOL).invert(KroneckerSum(terms))
    assert inv.info.certified_definite is False
    X = randn(4, b, a, seed=15)
    with pytest.warns(NumericalWarning, match="not positive definite"):
        out = inv.solve(X)
    assert bool(torch.isfinite(out).all())
    assert inv.info.fallback == "psd_part" and inv.fallback_taken
    assert_solve_accuracy(out, dense_solve(M_psd, X), M_psd, PCG_TOL)
    # the fallback is kept for later solves, without a new warning
    x = randn(a * b, seed=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        y = inv @ x
    assert_solve_accuracy(unvec_col(y, b, a), unvec_col(torch.linalg.solve(M_psd, x), b, a), M_psd, PCG_TOL)


def unvec_col(x, rows, cols):
    return x.reshape(cols, rows).T


@pytest.mark.parametrize("both_indefinite", [False, True])
def test_indefinite_correction_beyond_lambda_takes_psd_part_fallback_exact(both_indefinite):
    terms, lam, M_psd = indefinite_beyond_lambda(both_indefinite)
    b, a = terms[0][1].shape[0], terms[0][0].shape[0]
    with pytest.warns(NumericalWarning, match="not positive definite"), pytest.warns(PerformanceWarning):
        inv = TikhonovDamping(value=lam, method="exact").invert(KroneckerSum(terms))
    assert inv.info.fallback == "psd_part"
    X = randn(4, b, a, seed=15)
    out = inv.solve(X)
    assert bool(torch.isfinite(out).all())
    assert_close(out, dense_solve(M_psd, X))


def test_exact_method_refuses_large_blocks():
    A, B = spd(5, seed=1), spd(4, seed=2)
    damping = TikhonovDamping(value=1.0, method="exact", dense_max=19)
    with pytest.raises(ConfigError, match=r"p_i = d_a·d_g = 5·4 = 20 > dense_max = 19.*pcg"):
        damping.invert(KroneckerSum([(A, B), (A, B)]))


def test_pcg_iteration_cap_warns_and_stays_finite():
    terms = [(spd(4, seed=1), spd(5, seed=2)), (spd(4, seed=3), spd(5, seed=4))]
    inv = TikhonovDamping(value=1e-2, pcg_tol=1e-14, pcg_max_iters=1).invert(KroneckerSum(terms))
    X = randn(5, 4, seed=5)
    with pytest.warns(NumericalWarning, match="PCG stopped after 1 iterations"):
        out = inv.solve(X)
    assert bool(torch.isfinite(out).all())
    assert inv.info.iterations == 1 and inv.info.converged is False


def test_exact_block_is_delegated_to_its_tikhonov_solve():
    a, b = 3, 2
    J = randn(a * b, 4, seed=1)
    block = FakeExactBlock(J @ J.T / 4, a, b)
    lam = 0.3
    inv = TikhonovDamping(value=lam).invert(block)
    X = randn(2, b, a, seed=2)
    assert_close(inv.solve(X), dense_solve(block.F + lam * eye(a * b), X))
    assert block.calls == 1
    assert inv.info.method == "exact_block"


@pytest.mark.parametrize("rank", [1, 2])
def test_float32_is_preserved(rank):
    a, b = 4, 3
    terms64 = [(spd(a, seed=2 * k + 1), spd(b, seed=2 * k + 2)) for k in range(rank)]
    terms32 = [(A.float(), B.float()) for A, B in terms64]
    lam = 0.1
    inv = TikhonovDamping(value=lam).invert(KroneckerSum(terms32))
    X = randn(b, a, seed=9)
    out = inv.solve(X.float())
    assert out.dtype == torch.float32
    M = dense_sum(terms64) + lam * eye(a * b)
    # float32 PCG at its default tol √eps(float32), plus float32 rounding of the factors
    eps = torch.finfo(torch.float32).eps
    assert_solve_accuracy(out.double(), dense_solve(M, X), M, eps**0.5 + 100 * eps)


def test_rejects_bad_options():
    for bad in ({"value": 0.0}, {"value": -1.0}, {"value": float("nan")}, {}, {"value": 1.0, "lamda": 2.0}):
        with pytest.raises(ConfigError):
            TikhonovDamping(bad)
    with pytest.raises(ConfigError, match="pcg_tol"):
        TikhonovDamping(value=1.0, pcg_tol=2.0)
    with pytest.raises(ConfigError, match="method"):
        TikhonovDamping(value=1.0, method="cholesky")
    with pytest.raises(ConfigError, match="kind"):
        TikhonovDamping({"kind": "heuristic", "value": 1.0})
    assert TikhonovDamping({"kind": "tikhonov", "value": 2.0}).value == 2.0


def test_float32_factors_with_dead_units_stay_finite():
    # DESIGN.md §10: float32 eigh on CPU can fail on factors with many exactly-zero rows;
    # the factors are damped before decomposing (and eigh_safe retries in float64)
    a, b = 12, 5
    Z = randn(a, 3, seed=1)
    Z[::2] = 0.0  # half the units dead: zero rows and columns in A
    A = Z @ Z.T / 3
    B = spd(b, seed=2)
    lam = 1e-3
    inv = TikhonovDamping(value=lam).invert(KroneckerSum([(A.float(), B.float())]))
    X = randn(b, a, seed=3)
    out = inv.solve(X.float())
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    M = torch.kron(A, B) + lam * eye(a * b)
    # a direct solve: float32 rounding of the factors and of the eigenvectors, amplified by κ
    eps = torch.finfo(torch.float32).eps
    assert_solve_accuracy(out.double(), dense_solve(M, X), M, 100 * eps)
