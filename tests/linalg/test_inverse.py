"""Inverses of Kronecker-factored blocks against dense float64 solves.

Every reference is built here from torch.kron and torch.linalg on the dense
d_a·d_b × d_a·d_b matrix, with the column-major vec of DESIGN.md §1 written out
independently (vec(X) = Xᵀ.reshape(-1)).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.errors import ConfigError, NotPSDError, NumericalError, NumericalWarning, ShapeError
from curvlib.linalg.inverse import (
    _whitening,
    KroneckerEigen,
    TwoTermKroneckerInverse,
    eigh_safe,
    kron_solve,
    pi_split,
)
from curvlib.linalg.solvers import WoodburySolver, pcg, woodbury_solve
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import dims, kronecker_factors, matrices, psd_matrices, seeds, spd_matrices

lambdas = st.floats(min_value=1e-3, max_value=10.0, allow_nan=False, allow_subnormal=False)


def vec(X: torch.Tensor) -> torch.Tensor:
    """Column-major vec of X [..., r, c] -> [..., r·c] (Def. 3.2)."""
    return X.mT.reshape(*X.shape[:-2], -1)


def unvec(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`vec`: [..., rows·cols] -> [..., rows, cols]."""
    return x.reshape(*x.shape[:-1], cols, rows).mT


def dense_solve(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """MAT(M⁻¹ vec(X)) for X [..., d_b, d_a]."""
    d_b, d_a = X.shape[-2:]
    y = torch.linalg.solve(M, vec(X).unsqueeze(-1)).squeeze(-1)
    return unvec(y, d_b, d_a)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sym_sqrt(M: torch.Tensor, power: float) -> torch.Tensor:
    e, Q = torch.linalg.eigh(M)
    return (Q * e.pow(power)) @ Q.T


# --------------------------------------------------------------------------- vec convention


def test_vec_helper_matches_kronecker_identity():
    # (A⊗B) vec(X) = vec(B X Aᵀ) (Thm 3.13): the test's own vec is the thesis's
    A, B, X = randn(3, 3, seed=0), randn(2, 2, seed=1), randn(2, 3, seed=2)
    assert_close(torch.kron(A, B) @ vec(X), vec(B @ X @ A.T))


# --------------------------------------------------------------------------- kron_solve


@given(factors=kronecker_factors(max_dim=5), seed=seeds, batch=st.integers(0, 2))
def test_kron_solve_matches_dense(factors, seed, batch):
    A, B = factors
    d_a, d_b = A.shape[0], B.shape[0]
    # a non-symmetric perturbation: Thm 3.6 holds for any invertible factors
    A = A + 0.05 * randn(d_a, d_a, seed=seed)
    B = B + 0.05 * randn(d_b, d_b, seed=seed + 1)
    X = randn(*([2] * batch), d_b, d_a, seed=seed + 2)
    assert_close(kron_solve(A, B, X), dense_solve(torch.kron(A, B), X))


def test_kron_solve_errors():
    A, B = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    with pytest.raises(ShapeError, match=r"\[\.\.\., 2, 3\]"):
        kron_solve(A, B, torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(NumericalError, match="singular"):
        kron_solve(torch.zeros(3, 3, dtype=torch.float64), B, torch.zeros(2, 3, dtype=torch.float64))


# --------------------------------------------------------------------------- Tikhonov (normal damping)


@given(a=dims(1, 5), b=dims(1, 5), data=st.data(), lam=lambdas, seed=seeds)
def test_tikhonov_solve_matches_dense(a, b, data, lam, seed):
    A = data.draw(psd_matrices(a))  # possibly rank deficient
    B = data.draw(psd_matrices(b))
    X = randn(3, b, a, seed=seed)
    eig = KroneckerEigen.from_factors(A, B)
    dense = torch.kron(A, B) + lam * torch.eye(a * b, dtype=torch.float64)
    assert_close(eig.tikhonov_solve(X, lam), dense_solve(dense, X))


def test_tikhonov_clamps_negative_joint_eigenvalues():
    # A "PSD" factor with a rounding-level negative eigenvalue: solve with its PSD part.
    # A signed permutation keeps the eigenvalues exact in floating point.
    Q = torch.tensor([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    A = (Q * torch.tensor([-1e-13, 1.0, 2.0], dtype=torch.float64)) @ Q.T
    A_psd = (Q * torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)) @ Q.T
    B = torch.eye(2, dtype=torch.float64)
    X = randn(2, 3, seed=1)
    lam = 1e-14  # so that the clamp, not λ, decides whether the result is bounded
    out = KroneckerEigen.from_factors(A, B).tikhonov_solve(X, lam)
    ref = dense_solve(torch.kron(A_psd, B) + lam * torch.eye(6, dtype=torch.float64), X)
    assert_close(out, ref, rtol=1e-8)
    with pytest.raises(ConfigError, match="λ"):
        KroneckerEigen.from_factors(A, B).tikhonov_solve(X, 0.0)


# --------------------------------------------------------------------------- π-split


@given(factors=kronecker_factors(max_dim=5), lam=lambdas, seed=seeds)
def test_pi_split_matches_equation_2_96_and_dense_inverse(factors, lam, seed):
    A, B = factors
    d_a, d_b = A.shape[0], B.shape[0]
    A_d, B_d, pi = pi_split(A, B, lam)
    pi_by_hand = ((torch.trace(A) / d_a) / (torch.trace(B) / d_b)).sqrt().item()
    assert pi == pytest.approx(pi_by_hand, rel=1e-12)
    eye_a, eye_b = torch.eye(d_a, dtype=torch.float64), torch.eye(d_b, dtype=torch.float64)
    A_ref = A + pi_by_hand * lam**0.5 * eye_a
    B_ref = B + lam**0.5 / pi_by_hand * eye_b
    assert_close(A_d, A_ref)
    assert_close(B_d, B_ref)
    # (2.95): the damped block is (A + π√λ I) ⊗ (B + π⁻¹√λ I)
    X = randn(d_b, d_a, seed=seed)
    assert_close(kron_solve(A_d, B_d, X), dense_solve(torch.kron(A_ref, B_ref), X))
    # the two damping terms have the same mean-trace ratio as the factors
    ratio_damped = (pi * lam**0.5) / (lam**0.5 / pi)
    assert ratio_damped == pytest.approx((torch.trace(A) / d_a / (torch.trace(B) / d_b)).item(), rel=1e-10)


def test_pi_split_falls_back_to_one_on_bad_trace():
    A = torch.zeros(3, 3, dtype=torch.float64)
    B = torch.eye(2, dtype=torch.float64)
    with pytest.warns(NumericalWarning, match="π = 1"):
        A_d, B_d, pi = pi_split(A, B, 0.25)
    assert pi == 1.0
    assert_close(A_d, 0.5 * torch.eye(3, dtype=torch.float64))
    assert_close(B_d, 1.5 * torch.eye(2, dtype=torch.float64))
    with pytest.raises(ConfigError):
        pi_split(B, B, -1.0)


# --------------------------------------------------------------------------- A⊗B + C⊗D


@given(a=dims(1, 4), b=dims(1, 4), data=st.data(), seed=seeds)
def test_two_term_inverse_spd_matches_dense(a, b, data, seed):
    A, C = data.draw(spd_matrices(a)), data.draw(spd_matrices(a))
    B, D = data.draw(spd_matrices(b)), data.draw(spd_matrices(b))
    inv = TwoTermKroneckerInverse(A, B, C, D)
    assert inv.n_clamped == 0  # s1, s2 > 0, so every μ = 1 + s2 s1ᵀ > 1
    X = randn(2, b, a, seed=seed)
    dense = torch.kron(A, B) + torch.kron(C, D)
    assert_close(inv.solve(X), dense_solve(dense, X))
    assert_close(inv.to_dense_matrix(), dense)


def clamped_reference(A, B, C, D, floor):
    """The documented matrix M, built through a dense eigendecomposition of the whitened sum.

    M = (A^{1/2}⊗B^{1/2}) g(I + Ĉ⊗D̂) (A^{1/2}⊗B^{1/2}) with g(μ) = max(μ, floor) applied
    spectrally, Ĉ = A^{-1/2}CA^{-1/2}, D̂ = B^{-1/2}DB^{-1/2}.  The spectral function does
    not depend on the eigenbasis chosen, so this route shares nothing with the class.
    """
    Ch = sym_sqrt(A, -0.5) @ C @ sym_sqrt(A, -0.5)
    Dh = sym_sqrt(B, -0.5) @ D @ sym_sqrt(B, -0.5)
    n = A.shape[0] * B.shape[0]
    W = torch.eye(n, dtype=torch.float64) + torch.kron(Ch, Dh)
    mu, E = torch.linalg.eigh(0.5 * (W + W.T))
    S = torch.kron(sym_sqrt(A, 0.5), sym_sqrt(B, 0.5))
    M = S @ ((E * mu.clamp_min(floor)) @ E.T) @ S
    return M, int((mu < floor).sum())


def indefinite_pair(A, B, s1, s2):
    """C, D with A^{-1/2}CA^{-1/2} having eigenvalues s1 (likewise D, s2), random eigenbases."""
    Q1, _ = torch.linalg.qr(randn(len(s1), len(s1), seed=10))
    Q2, _ = torch.linalg.qr(randn(len(s2), len(s2), seed=11))
    Ch = (Q1 * torch.tensor(s1, dtype=torch.float64)) @ Q1.T
    Dh = (Q2 * torch.tensor(s2, dtype=torch.float64)) @ Q2.T
    return sym_sqrt(A, 0.5) @ Ch @ sym_sqrt(A, 0.5), sym_sqrt(B, 0.5) @ Dh @ sym_sqrt(B, 0.5)


def test_two_term_inverse_indefinite_is_the_documented_clamp():
    A = spd(3, seed=1)
    B = spd(4, seed=2)
    # μ = 1 + s2_j s1_i: (−3)(1.5) + 1 < 0, (−3)(0.2) + 1 > 0, (0.5)(−1) + 1 > 0 ...
    C, D = indefinite_pair(A, B, [-3.0, 0.5, 2.0], [1.5, 0.2, -1.0, 0.7])
    floor = 1e-2
    inv = TwoTermKroneckerInverse(A, B, C, D, floor=floor)
    M, n_clamped_ref = clamped_reference(A, B, C, D, floor)
    assert n_clamped_ref > 0
    assert inv.n_clamped == n_clamped_ref
    X = randn(5, 4, 3, seed=3)
    assert_close(inv.solve(X), dense_solve(M, X))
    assert_close(inv.to_dense_matrix(), M)
    # M is SPD and agrees with A⊗B + C⊗D on the unclamped joint eigendirections
    assert float(torch.linalg.eigvalsh(M).min()) > 0
    F = torch.kron(A, B) + torch.kron(C, D)
    assert float(torch.linalg.eigvalsh(F).min()) < 0
    K = torch.kron(inv.K1, inv.K2)  # columns: the joint eigendirections, vec order
    keep = vec(inv.mu) >= floor
    assert_close((M - F) @ K[:, keep], torch.zeros_like(K[:, keep]), atol=1e-10 * float(F.abs().max()))


def spd(n: int, seed: int) -> torch.Tensor:
    X = randn(n, n, seed=seed)
    return X @ X.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


@given(a=dims(1, 4), b=dims(1, 4), data=st.data(), seed=seeds, scale=st.floats(0.1, 5.0))
def test_two_term_inverse_random_symmetric_correction(a, b, data, seed, scale):
    A, B = data.draw(spd_matrices(a)), data.draw(spd_matrices(b))
    C0, D0 = data.draw(matrices(a, a)), data.draw(matrices(b, b))
    C, D = scale * (C0 + C0.T) / 2, (D0 + D0.T) / 2
    floor = 0.05
    inv = TwoTermKroneckerInverse(A, B, C, D, floor=floor)
    M, n_clamped_ref = clamped_reference(A, B, C, D, floor)
    X = randn(b, a, seed=seed)
    # M's conditioning is at most ~1/floor times that of A⊗B
    assert_close(inv.solve(X), dense_solve(M, X), rtol=1e-8)
    # a μ within rounding of the floor may fall either side in the two routes
    assert abs(inv.n_clamped - n_clamped_ref) <= int(((vec(inv.mu) - floor).abs() < 1e-9).sum())


class _CountingEigh:
    def __init__(self) -> None:
        self.calls, self.eigh = 0, torch.linalg.eigh

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.eigh(*args, **kwargs)


@pytest.mark.parametrize("route", ["cholesky", "eigen"])
def test_two_term_inverse_whitening_routes_agree_with_dense(route, monkeypatch):
    """The leading factors are whitened by Cholesky (W = L⁻¹), or — when the factorisation
    fails (forced here) — by A^{-1/2}; both give the documented operator, and the Cholesky
    route decomposes only the two whitened corrections."""
    A, B = spd(5, seed=21), spd(4, seed=22)
    C, D = indefinite_pair(A, B, [-3.0, 0.5, 2.0, 0.1, -0.4], [1.5, 0.2, -1.0, 0.7])
    if route == "eigen":
        failed = lambda M: (torch.linalg.cholesky(M), torch.ones((), dtype=torch.int32))  # noqa: E731
        monkeypatch.setattr(torch.linalg, "cholesky_ex", failed)
    counter = _CountingEigh()
    monkeypatch.setattr(torch.linalg, "eigh", counter)
    inv = TwoTermKroneckerInverse(A, B, C, D, floor=1e-2)
    assert counter.calls == (2 if route == "cholesky" else 4)
    M, n_clamped = clamped_reference(A, B, C, D, 1e-2)
    assert inv.n_clamped == n_clamped > 0
    X = randn(3, 4, 5, seed=4)
    assert_close(inv.solve(X), dense_solve(M, X))
    assert_close(inv.to_dense_matrix(), M)
    for K, S in ((inv.K1, A), (inv.K2, B)):  # Kᵀ A K = I
        assert_close(K.T @ S @ K, torch.eye(S.shape[0], dtype=S.dtype), atol=1e-12)


def _spread(n: int, low: float, dtype: torch.dtype) -> torch.Tensor:
    """A symmetric matrix with eigenvalues logspace(0, log10 low) in a random basis."""
    Q, _ = torch.linalg.qr(randn(n, n, seed=7))
    return ((Q * torch.logspace(0, torch.log10(torch.tensor(low)).item(), n, dtype=torch.float64)) @ Q.T).to(dtype)


def test_whitening_keeps_the_exact_positive_definiteness_rule(monkeypatch):
    """The Cholesky route is taken only where two bounds certify λ_min > eps·λ_max; past the
    bounds the eigenvalues decide, as before the Cholesky route: κ = 1e6 in float32 (above
    1/(n·eps), below 1/eps) is accepted through an eigendecomposition, κ = 1e9 refused."""
    counter = _CountingEigh()
    monkeypatch.setattr(torch.linalg, "eigh", counter)
    W = _whitening(_spread(50, 1e-6, torch.float32), "A", "test")
    assert counter.calls == 1 and W.shape == (50, 50)
    with pytest.raises(NotPSDError, match="A must be symmetric positive definite"):
        _whitening(_spread(50, 1e-9, torch.float32), "A", "test")
    counter.calls = 0
    _whitening(_spread(50, 1e-3, torch.float32), "A", "test")  # certified: no eigendecomposition
    assert counter.calls == 0


def test_two_term_inverse_errors():
    I3, I2 = torch.eye(3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    not_pd = torch.diag(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    with pytest.raises(NotPSDError, match="A must be symmetric positive definite"):
        TwoTermKroneckerInverse(not_pd, I2, I3, I2)
    with pytest.raises(NotPSDError, match="B must be"):
        TwoTermKroneckerInverse(I3, -I2, I3, I2)
    with pytest.raises(ConfigError, match="floor"):
        TwoTermKroneckerInverse(I3, I2, I3, I2, floor=0.0)
    with pytest.raises(ShapeError):
        TwoTermKroneckerInverse(I3, I2, I2, I3)


# --------------------------------------------------------------------------- PCG


def kronecker_sum_problem(d_a=6, d_b=5, lam=1e-3, seed=0):
    """An ill-conditioned Σ A_k⊗B_k + λI dominated by its first term."""
    g = torch.Generator().manual_seed(seed)

    def spread(n):
        Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return (Q * torch.logspace(-3, 2, n, dtype=torch.float64)) @ Q.T

    A1, B1 = spread(d_a), spread(d_b)
    A2, B2 = 0.01 * spd(d_a, seed + 1), 0.01 * spd(d_b, seed + 2)
    S = torch.kron(A1, B1) + torch.kron(A2, B2) + lam * torch.eye(d_a * d_b, dtype=torch.float64)
    return A1, B1, S


def test_pcg_matches_dense_with_and_without_preconditioner():
    d_a, d_b, lam = 6, 5, 1e-3
    A1, B1, S = kronecker_sum_problem(d_a, d_b, lam)
    eig = KroneckerEigen.from_factors(A1, B1)

    def precond(R):  # R [d_a·d_b, k] -> (A1⊗B1 + λI)⁻¹ R
        return vec(eig.tikhonov_solve(unvec(R.T, d_b, d_a), lam)).T

    b = randn(d_a * d_b, 3, seed=4)
    ref = torch.linalg.solve(S, b)
    x_plain, info_plain = pcg(lambda X: S @ X, b, tol=1e-10, max_iters=2000)
    x_pre, info_pre = pcg(lambda X: S @ X, b, precond=precond, tol=1e-10)
    assert info_plain.converged and info_pre.converged
    # the relative residual 1e-10 bounds the error by cond(S)·1e-10
    cond = float(torch.linalg.cond(S))
    assert_close(x_plain, ref, rtol=0, atol=10 * cond * 1e-10 * float(ref.abs().max()))
    assert_close(x_pre, ref, rtol=0, atol=10 * cond * 1e-10 * float(ref.abs().max()))
    assert info_pre.iterations < info_plain.iterations
    assert info_pre.relative_residual.shape == (3,)
    true_res = torch.linalg.vector_norm(b - S @ x_pre, dim=0) / torch.linalg.vector_norm(b, dim=0)
    assert bool((true_res <= 1e-9).all())


@given(n=dims(1, 8), data=st.data(), seed=seeds)
def test_pcg_spd_systems(n, data, seed):
    S = data.draw(spd_matrices(n))
    b = randn(n, seed=seed)
    x, info = pcg(lambda X: S @ X, b, tol=1e-12)
    assert x.shape == (n,) and info.relative_residual.shape == ()
    assert info.converged
    assert_close(x, torch.linalg.solve(S, b), rtol=1e-7, atol=1e-7 * float(torch.linalg.solve(S, b).abs().max()))


def test_pcg_zero_column_initial_guess_and_cap():
    S = spd(6, seed=3)
    b = randn(6, 2, seed=1)
    b[:, 1] = 0
    x, info = pcg(lambda X: S @ X, b, x0=torch.ones_like(b), tol=1e-12)
    assert info.converged
    assert bool((x[:, 1] == 0).all())
    assert_close(x[:, 0], torch.linalg.solve(S, b[:, 0]), rtol=1e-8)
    # exact solution as x0: nothing to do
    x_exact = torch.linalg.solve(S, b)
    _, info0 = pcg(lambda X: S @ X, b, x0=x_exact, tol=1e-8)
    assert info0.iterations == 0 and info0.converged
    _, info_cap = pcg(lambda X: S @ X, randn(6, seed=2), tol=1e-14, max_iters=2)
    assert info_cap.iterations == 2 and not info_cap.converged


def test_pcg_rejects_indefinite_operator():
    S = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    with pytest.raises(NotPSDError, match="positive definite"):
        pcg(lambda X: S @ X, torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------- Woodbury


@given(n=dims(1, 5), extra=dims(1, 6), k=st.integers(0, 3), lam=lambdas, seed=seeds)
def test_woodbury_matches_dense(n, extra, k, lam, seed):
    p = n + extra  # p > n: the case Woodbury is for
    J = randn(p, n, seed=seed)
    m = float(n)
    u = randn(p, seed=seed + 1) if k == 0 else randn(p, k, seed=seed + 1)
    dense = lam * torch.eye(p, dtype=torch.float64) + J @ J.T / m
    ref = torch.linalg.solve(dense, u)
    solver = WoodburySolver(J.T @ J, lam, m, lambda w: J @ w, lambda v: J.T @ v)
    assert_close(solver.solve(u), ref)
    assert_close(WoodburySolver.from_matrix(J, lam, m).solve(u), ref)
    assert_close(woodbury_solve(u, J.T @ J, lam, m, lambda w: J @ w, lambda v: J.T @ v), ref)


def test_woodbury_eigh_fallback(monkeypatch):
    J = randn(9, 4, seed=0)
    lam, m = 0.1, 4.0
    failing = lambda M: (torch.zeros_like(M), torch.ones((), dtype=torch.int32))  # noqa: E731
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    with pytest.warns(NumericalWarning, match="Cholesky"):
        solver = WoodburySolver.from_matrix(J, lam, m)
    u = randn(9, 2, seed=1)
    ref = torch.linalg.solve(lam * torch.eye(9, dtype=torch.float64) + J @ J.T / m, u)
    assert_close(solver.solve(u), ref)


def test_woodbury_errors():
    J = randn(5, 2, seed=0)
    with pytest.raises(ConfigError, match="λ"):
        WoodburySolver.from_matrix(J, 0.0, 2.0)
    with pytest.raises(ConfigError, match="m must be"):
        WoodburySolver.from_matrix(J, 1.0, 0.0)


# --------------------------------------------------------------------------- eigh_safe


def test_eigh_safe_matches_eigh_and_symmetrizes():
    M = randn(2, 4, 4, seed=0)
    e, Q = eigh_safe(M)
    S = 0.5 * (M + M.mT)
    assert_close(e, torch.linalg.eigvalsh(S))
    assert_close(Q @ torch.diag_embed(e) @ Q.mT, S)


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_eigh_safe_float32_retry(monkeypatch, failure):
    real_eigh = torch.linalg.eigh

    def flaky_eigh(M, *args, **kwargs):
        if M.dtype == torch.float32:
            if failure == "raise":
                raise torch.linalg.LinAlgError("linalg.eigh: the algorithm failed to converge")
            e, Q = real_eigh(M, *args, **kwargs)
            return torch.full_like(e, float("nan")), Q
        return real_eigh(M, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    # a factor with many exactly-zero rows (dead ReLUs), the case that fails in practice
    X = randn(6, 6, seed=1)
    X[:4] = 0
    M = (X @ X.T).float()
    with pytest.warns(NumericalWarning, match="retrying in float64"):
        e, Q = eigh_safe(M)
    assert e.dtype == Q.dtype == torch.float32
    assert_close(e, torch.linalg.eigvalsh(M.double()).float(), dtype=torch.float32, atol=1e-5 * float(M.abs().max()))
    assert_close(Q @ torch.diag(e) @ Q.T, M, dtype=torch.float32)


def test_eigh_safe_errors(monkeypatch):
    M = torch.eye(3, dtype=torch.float64)
    M[0, 1] = float("nan")
    with pytest.raises(NumericalError, match="non-finite"):
        eigh_safe(M)
    with pytest.raises(ShapeError):
        eigh_safe(torch.zeros(3, 2))

    def broken(M, *args, **kwargs):
        raise torch.linalg.LinAlgError("failed")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(NumericalError, match="float64"):
        eigh_safe(torch.eye(3, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        with pytest.raises(NumericalError, match="float64 retry"):
            eigh_safe(torch.eye(3, dtype=torch.float32))


def test_module_preserves_float32():
    A, B = spd(3, seed=0).float(), spd(2, seed=1).float()
    X = torch.ones(2, 3)
    assert kron_solve(A, B, X).dtype == torch.float32
    assert KroneckerEigen.from_factors(A, B).tikhonov_solve(X, 0.1).dtype == torch.float32
    assert TwoTermKroneckerInverse(A, B, A, B).solve(X).dtype == torch.float32
    assert pi_split(A, B, 0.1)[0].dtype == torch.float32
    assert WoodburySolver.from_matrix(torch.ones(5, 2), 0.1, 2.0).solve(torch.ones(5)).dtype == torch.float32
