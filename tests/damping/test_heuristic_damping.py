"""``heuristic``: the π-split (2.95)–(2.96) and §3.2.5, against dense float64 solves.

π is recomputed here from traces by hand and every damped matrix is formed densely with
torch.kron; the floor rule for an indefinite correction is rebuilt spectrally from a dense
eigendecomposition (damping_reference.clamped_two_term).
"""

from __future__ import annotations

import math

import pytest
import torch
from damping_reference import (
    F64,
    FakeExactBlock,
    clamped_two_term,
    dense_solve,
    eye,
    pi_by_hand,
    psd_part,
    randn,
    spd,
    whitened_pair,
)
from hypothesis import given
from hypothesis import strategies as st

from curvlib.damping import HeuristicDamping, PiSplitInverse, TwoTermHeuristicInverse
from curvlib.errors import ConfigError, NumericalWarning
from curvlib.linalg import KroneckerSum
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import dims, matrices, seeds, spd_matrices

lambdas = st.floats(min_value=1e-3, max_value=10.0, allow_nan=False, allow_subnormal=False)


def damped_leading(A, B, lam):
    """(A + π√λI, B + π⁻¹√λI, π) with π from (2.96), by hand."""
    pi = pi_by_hand(A, B)
    r = math.sqrt(lam)
    return A + pi * r * eye(A.shape[0]), B + (r / pi) * eye(B.shape[0]), pi


@given(a=dims(1, 5), b=dims(1, 5), data=st.data(), lam=lambdas, seed=seeds)
def test_one_term_is_the_pi_split(a, b, data, lam, seed):
    A, B = data.draw(spd_matrices(a)), data.draw(spd_matrices(b))
    inv = HeuristicDamping(value=lam).invert(KroneckerSum([(A, B)]))
    assert isinstance(inv, PiSplitInverse)
    Ad, Bd, pi = damped_leading(A, B, lam)
    assert inv.info.pi == pytest.approx(pi, rel=1e-12)
    assert_close(inv.damped_factors[0], Ad)
    assert_close(inv.damped_factors[1], Bd)
    M = torch.kron(Ad, Bd)
    # the expansion of (2.95): λ is the coefficient of I, plus the two cross terms of §4.4.2
    r = math.sqrt(lam)
    expanded = torch.kron(A, B) + pi * r * torch.kron(eye(a), B) + (r / pi) * torch.kron(A, eye(b)) + lam * eye(a * b)
    assert_close(M, expanded)
    X = randn(3, b, a, seed=seed)
    assert_close(inv.solve(X), dense_solve(M, X))
    assert_close(inv.to_dense(), torch.linalg.inv(M))
    assert inv.info.n_clamped == 0


@given(a=dims(1, 4), b=dims(1, 4), data=st.data(), lam=lambdas, seed=seeds)
def test_two_term_spd_correction_matches_dense(a, b, data, lam, seed):
    A, B = data.draw(spd_matrices(a)), data.draw(spd_matrices(b))
    C, D = data.draw(spd_matrices(a)), data.draw(spd_matrices(b))
    inv = HeuristicDamping(value=lam).invert(KroneckerSum([(A, B), (C, D)]))
    assert isinstance(inv, TwoTermHeuristicInverse)
    Ad, Bd, pi = damped_leading(A, B, lam)
    M = torch.kron(Ad, Bd) + torch.kron(C, D)
    X = randn(2, b, a, seed=seed)
    assert_close(inv.solve(X), dense_solve(M, X))
    assert inv.info.n_clamped == 0 and inv.info.pi == pytest.approx(pi, rel=1e-12)


def test_two_term_indefinite_correction_is_the_documented_clamp():
    a, b = 3, 4
    A, B = spd(a, seed=1), spd(b, seed=2)
    lam, floor = 0.05, 0.05
    Ad, Bd, _ = damped_leading(A, B, lam)
    # whitened by the DAMPED leading term: μ = 1 + s2 s1ᵀ has entries below the floor
    C, D = whitened_pair(Ad, Bd, [-3.0, 0.5, 2.0], [1.5, 0.2, -1.0, 0.7])
    M, n_ref = clamped_two_term(Ad, Bd, C, D, floor)
    assert n_ref > 0
    F = torch.kron(Ad, Bd) + torch.kron(C, D)
    assert float(torch.linalg.eigvalsh(F).min()) < 0  # the unclamped damped sum is indefinite
    inv = HeuristicDamping(value=lam, floor=floor).invert(KroneckerSum([(A, B), (C, D)]))
    assert inv.info.n_clamped == n_ref
    X = randn(5, b, a, seed=3)
    out = inv.solve(X)
    assert bool(torch.isfinite(out).all())
    assert_close(out, dense_solve(M, X))


@given(a=dims(2, 4), b=dims(2, 4), data=st.data(), seed=seeds, scale=st.floats(0.5, 5.0))
def test_two_term_random_symmetric_correction(a, b, data, seed, scale):
    A, B = data.draw(spd_matrices(a)), data.draw(spd_matrices(b))
    C0, D0 = data.draw(matrices(a, a)), data.draw(matrices(b, b))
    C, D = scale * (C0 + C0.T) / 2, (D0 + D0.T) / 2
    lam, floor = 0.1, 0.05
    Ad, Bd, _ = damped_leading(A, B, lam)
    M, n_ref = clamped_two_term(Ad, Bd, C, D, floor)
    inv = HeuristicDamping(value=lam, floor=floor).invert(KroneckerSum([(A, B), (C, D)]))
    X = randn(b, a, seed=seed)
    # M's conditioning is at most ~1/floor times that of the damped leading term
    assert_close(inv.solve(X), dense_solve(M, X), rtol=1e-8)
    near = int(((inv.inverse.mu - floor).abs() < 1e-9).sum())  # may round either side of the floor
    assert abs(inv.info.n_clamped - n_ref) <= near


def test_sign_of_the_leading_term_is_normalized():
    A, B = spd(3, seed=1), spd(2, seed=2)
    X = randn(2, 3, seed=3)
    pos = HeuristicDamping(value=0.1).invert(KroneckerSum([(A, B)]))
    neg = HeuristicDamping(value=0.1).invert(KroneckerSum([(-A, -B)]))
    assert_close(neg.solve(X), pos.solve(X))
    assert neg.info.pi == pos.info.pi


def test_leading_factor_with_large_negative_eigenvalue_is_clamped():
    Q, _ = torch.linalg.qr(randn(3, 3, seed=4))
    A = (Q * torch.tensor([-3.0, 4.0, 5.0], dtype=F64)) @ Q.T  # tr A > 0 but not PSD
    B = spd(2, seed=5)
    C, D = 0.1 * spd(3, seed=6), 0.1 * spd(2, seed=7)
    lam, floor = 1e-2, 1e-2
    pi = pi_by_hand(A, B)
    r = math.sqrt(lam)
    with pytest.warns(NumericalWarning, match="not positive definite"):
        inv = HeuristicDamping(value=lam, floor=floor).invert(KroneckerSum([(A, B), (C, D)]))
    assert inv.info.fallback == "psd_leading_factors"
    # documented: the undamped leading factors' eigenvalues clamped at 0, then the shifts
    Ad = psd_part(A) + pi * r * eye(3)
    Bd = psd_part(B) + (r / pi) * eye(2)
    M, _ = clamped_two_term(Ad, Bd, C, D, floor)
    X = randn(2, 3, seed=8)
    assert_close(inv.solve(X), dense_solve(M, X))


def test_one_term_routes_psd_factors_to_cholesky_and_clamps_the_others():
    """Positive definite damped factors are inverted by Cholesky, as they are (an eigenvalue of
    the undamped factor in (−shift, 0) is kept); a damped factor that is not positive definite
    takes the eigenvalue rule (clamped at the shift, counted) — both give the documented M⁻¹."""
    Q, _ = torch.linalg.qr(randn(3, 3, seed=4))
    B = spd(2, seed=5)
    lam = 1e-2
    for evals, method, clamped in (([0.0, 4.0, 5.0], "cholesky", 0), ([-1e-3, 4.0, 5.0], "cholesky", 0),
                                   ([-3.0, 4.0, 5.0], "eigen", 1)):
        A = (Q * torch.tensor(evals, dtype=F64)) @ Q.T
        inv = HeuristicDamping(value=lam).invert(KroneckerSum([(A, B)]))
        assert (inv.info.method, inv.info.n_clamped) == (method, clamped)
        pi, r = pi_by_hand(A, B), math.sqrt(lam)
        assert pi * r > 1e-3  # the shift: −1e-3 + shift > 0, the damped factor is positive definite
        A_used = psd_part(A) if method == "eigen" else A
        M = torch.kron(A_used + pi * r * eye(3), B + (r / pi) * eye(2))
        X = randn(2, 2, 3, seed=8)
        assert_close(inv.solve(X), dense_solve(M, X))
        e = inv.eigen  # the eigenbasis of the factors as inverted: the same inverse
        eig_form = e.evec_b @ ((e.evec_b.T @ X @ e.evec_a) / torch.outer(e.eval_b, e.eval_a)) @ e.evec_a.T
        assert_close(eig_form, inv.solve(X))


def test_refuses_long_sums_and_exact_blocks():
    A, B = spd(2, seed=1), spd(2, seed=2)
    with pytest.raises(ConfigError, match="3 terms.*tikhonov"):
        HeuristicDamping(value=0.1).invert(KroneckerSum([(A, B)] * 3))
    block = FakeExactBlock(torch.kron(A, B), 2, 2)
    with pytest.raises(ConfigError, match="needs Kronecker factors.*'tikhonov'"):
        HeuristicDamping(value=0.1).invert(block)


def test_rejects_bad_options():
    for bad in ({"value": 0.0}, {"value": 1.0, "floor": 0.0}, {"value": 1.0, "floor": -1}, {"value": 1.0, "pi": 2}):
        with pytest.raises(ConfigError):
            HeuristicDamping(bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_explicit_inverses_equal_the_eigenbasis_solution(dtype):
    """The two-GEMM application B_d⁻¹ X A_d⁻¹ equals Q_b[(Q_bᵀ X Q_a) ⊘ (e_b e_aᵀ)]Q_aᵀ to rounding,
    on ill-conditioned factors with a dead direction (a zero eigenvalue)."""
    g = torch.Generator().manual_seed(5)
    Wa, Wb = torch.randn(40, 7, generator=g, dtype=F64), torch.randn(40, 5, generator=g, dtype=F64)
    Wa[:, 0] = 0  # a dead input: an exactly zero eigenvalue of A
    Wa = Wa * torch.logspace(0, -2, 7, dtype=F64)  # a PSD A with a spread spectrum
    A, B = (Wa.T @ Wa / 40).to(dtype), (Wb.T @ Wb / 40).to(dtype)
    A, B = 0.5 * (A + A.T), 0.5 * (B + B.T)
    inv = HeuristicDamping(value=1e-3).invert(KroneckerSum([(A, B)]))
    e = inv.eigen
    X = torch.randn(4, 5, 7, generator=g, dtype=F64).to(dtype)
    eigenbasis = e.evec_b @ ((e.evec_b.T @ X @ e.evec_a) / (e.eval_b[:, None] * e.eval_a[None, :])) @ e.evec_a.T
    eps = torch.finfo(dtype).eps
    kappa = float((e.eval_a.max() * e.eval_b.max()) / (e.eval_a.min() * e.eval_b.min()))
    assert_close(inv.solve(X), eigenbasis, rtol=50 * eps * kappa, atol=50 * eps * kappa * float(eigenbasis.abs().max()))


def test_a_pi_split_inverse_travels_without_its_damped_factors():
    """distributed_inversion="broadcast": the owner sends the two inverses only; the receiver
    rebuilds the damped factors from the block every rank holds — the same tensors, the same products."""
    import io

    from curvlib.damping import HeuristicDamping
    from curvlib.linalg import KroneckerSum

    g = torch.Generator().manual_seed(3)
    A0, B0 = torch.randn(48, 48, generator=g, dtype=torch.float64), torch.randn(32, 32, generator=g, dtype=torch.float64)
    block = KroneckerSum([(A0 @ A0.T, B0 @ B0.T)])
    inv = HeuristicDamping(value=1e-2).invert(block)
    sent = inv.for_transfer()
    full, light = io.BytesIO(), io.BytesIO()
    torch.save(inv, full)
    torch.save(sent, light)
    assert light.tell() < 0.55 * full.tell()  # two of the four matrices
    assert inv.damped_factors is not None  # the original keeps them
    got = torch.load(io.BytesIO(light.getvalue()), weights_only=False)
    got.after_transfer(block)
    for M, N in zip(got.damped_factors, inv.damped_factors):
        assert torch.equal(M, N)
    X = torch.randn(3, 32, 48, generator=g, dtype=torch.float64)
    assert torch.equal(got.solve(X), inv.solve(X))
    assert torch.equal(got.condition_numbers(), inv.condition_numbers())
