"""power_svd and lanczos_svd against torch.linalg.svd of the dense matrix (float64).

Accuracy targets follow from the stopping rule ‖Zv − σu‖ ≤ tol·σ: singular values are
accurate to second order in the residual, so a relative error ≤ tol is a safe bound;
vector angles are bounded by residual / gap (Wedin), so with tol = 1e-10 and gaps of
order one, 1 − |cos θ| ≤ 1e-8 leaves a wide margin while a wrong vector (|cos θ| ≪ 1)
fails at once.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.linalg.zproducts import DenseZOperator
from curvlib.linalg.svd import SVDResult, lanczos_svd, power_svd
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import dims, seeds

SOLVERS = {"power": power_svd, "lanczos": lanczos_svd}


def run(solver: str, op, k: int, **kw) -> SVDResult:
    if solver == "power":
        kw.setdefault("max_iters", 2000)
    return SOLVERS[solver](op, k, **kw)


def gapped_operator(a_dim: int, b_dim: int, sigmas, *, noise: float, seed: int, dtype=torch.float64) -> DenseZOperator:
    """Z = Q_a diag(sigmas) Q_bᵀ + noise·N(0, 1): a low-rank signal with a clear gap."""
    g = torch.Generator().manual_seed(seed)
    n_a, n_b = a_dim**2, b_dim**2
    r = len(sigmas)
    Qa, _ = torch.linalg.qr(torch.randn(n_a, r, generator=g, dtype=torch.float64))
    Qb, _ = torch.linalg.qr(torch.randn(n_b, r, generator=g, dtype=torch.float64))
    s = torch.tensor(sigmas, dtype=torch.float64)
    Z = (Qa * s) @ Qb.T + noise * torch.randn(n_a, n_b, generator=g, dtype=torch.float64)
    return DenseZOperator(Z.to(dtype), a_dim, b_dim)


def random_operator(a_dim: int, b_dim: int, *, seed: int, dtype=torch.float64) -> DenseZOperator:
    g = torch.Generator().manual_seed(seed)
    return DenseZOperator(torch.randn(a_dim**2, b_dim**2, generator=g, dtype=dtype), a_dim, b_dim)


def assert_matches_dense(res: SVDResult, Z: torch.Tensor, k: int, *, sigma_rtol: float, cos_tol: float) -> None:
    U_ref, s_ref, Vh_ref = torch.linalg.svd(Z.to(torch.float64), full_matrices=False)
    assert res.sigma.shape == (k,) and res.U.shape == (Z.shape[0], k) and res.V.shape == (Z.shape[1], k)
    assert_close(res.sigma.double(), s_ref[:k], rtol=sigma_rtol, atol=0.0, msg="singular values")
    # singular vectors up to sign
    cos_u = (res.U.double() * U_ref[:, :k]).sum(0).abs()
    cos_v = (res.V.double() * Vh_ref[:k].T).sum(0).abs()
    ones = torch.ones(k, dtype=torch.float64)
    assert_close(cos_u, ones, rtol=0.0, atol=cos_tol, msg="|<u, u_ref>|")
    assert_close(cos_v, ones, rtol=0.0, atol=cos_tol, msg="|<v, v_ref>|")


# --------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("solver", ["power", "lanczos"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dims_", [(3, 4), (5, 3)])
def test_low_rank_plus_noise_matches_dense_svd(solver, k, dims_):
    op = gapped_operator(*dims_, [10.0, 5.0, 2.5, 1.2], noise=1e-3, seed=11 + k)
    res = run(solver, op, k, tol=1e-10)
    assert res.converged
    assert res.iterations > 0
    assert_matches_dense(res, op.Z, k, sigma_rtol=1e-10, cos_tol=1e-8)
    assert bool((res.residuals <= 1e-10).all())


@pytest.mark.parametrize("solver", ["power", "lanczos"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_random_rectangular_matches_dense_svd(solver, k):
    op = random_operator(5, 3, seed=7)  # [25, 9]
    res = run(solver, op, k, tol=1e-10)
    assert res.converged
    assert_matches_dense(res, op.Z, k, sigma_rtol=1e-10, cos_tol=1e-8)


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_default_tolerance_gives_sigma_to_tol(solver):
    op = gapped_operator(4, 4, [3.0, 2.0, 1.0], noise=1e-2, seed=5)
    res = run(solver, op, 2)
    assert res.converged
    s_ref = torch.linalg.svdvals(op.Z)[:2]
    assert_close(res.sigma, s_ref, rtol=1e-6, atol=0.0)
    assert bool((res.residuals <= 1e-6).all())


def test_residuals_are_relative_residuals_of_the_returned_triplets():
    op = random_operator(4, 3, seed=2)
    for solver in SOLVERS:
        res = run(solver, op, 2, tol=1e-4)
        Z = op.Z
        r1 = torch.linalg.vector_norm(Z @ res.V - res.U * res.sigma, dim=0)
        r2 = torch.linalg.vector_norm(Z.T @ res.U - res.V * res.sigma, dim=0)
        expected = torch.maximum(r1, r2) / res.sigma
        if solver == "power":
            # the second triplet's residual is measured on the deflated operator; the
            # first is on Z itself
            assert_close(res.residuals[:1], expected[:1], rtol=1e-6, atol=0.0)
        else:
            assert_close(res.residuals, expected, rtol=1e-6, atol=0.0)


@given(a=dims(1, 4), b=dims(1, 4), seed=seeds, data=st.data())
def test_lanczos_with_full_krylov_space_is_exact(a, b, seed, data):
    op = random_operator(a, b, seed=seed)
    n = min(a * a, b * b)
    k = data.draw(st.integers(1, n))
    res = lanczos_svd(op, k, krylov_dim=n, tol=1e-12)
    assert res.converged
    s_ref = torch.linalg.svdvals(op.Z)[:k]
    assert_close(res.sigma, s_ref, rtol=1e-9, atol=1e-12 * float(s_ref[0]))
    # whatever the multiplicities, the triplets satisfy the singular-value equations
    assert_close(op.Z @ res.V, res.U * res.sigma, rtol=0.0, atol=1e-9 * float(s_ref[0]))
    assert_close(op.Z.T @ res.U, res.V * res.sigma, rtol=0.0, atol=1e-9 * float(s_ref[0]))
    assert_close(res.U.T @ res.U, torch.eye(k, dtype=torch.float64), rtol=0.0, atol=1e-9)


# --------------------------------------------------------------------------- deflation


def test_power_deflation_really_deflates():
    op = gapped_operator(3, 4, [10.0, 5.0, 1.0], noise=1e-4, seed=3)
    res = power_svd(op, 2, tol=1e-10, max_iters=500)
    s_ref = torch.linalg.svdvals(op.Z)
    # the second triplet is σ_2, not σ_1 found again on an undeflated operator
    assert_close(res.sigma[1], s_ref[1], rtol=1e-9, atol=0.0)
    assert abs(float(res.sigma[1] - s_ref[0])) > 1.0
    assert abs(float(res.U[:, 0] @ res.U[:, 1])) < 1e-8
    assert abs(float(res.V[:, 0] @ res.V[:, 1])) < 1e-8


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_more_triplets_than_rank_give_zero_sigmas(solver):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, generator=g, dtype=torch.float64)
    y = torch.randn(16, generator=g, dtype=torch.float64)
    op = DenseZOperator(torch.outer(x, y), 3, 4)
    res = run(solver, op, 3)
    assert res.converged
    assert_close(res.sigma[0], x.norm() * y.norm())
    assert bool((res.sigma[1:].abs() <= 1e-12 * res.sigma[0]).all())
    for M in (res.U, res.V):
        assert bool(torch.isfinite(M).all())
        assert_close(torch.linalg.vector_norm(M, dim=0), torch.ones(3, dtype=torch.float64))


# --------------------------------------------------------------------------- relative tolerance


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_stopping_rule_is_relative_to_sigma(solver):
    # mean-reduced losses give σ ≈ 1e-7: an absolute 1e-6 test would stop at once
    base = random_operator(4, 3, seed=9)
    tiny = DenseZOperator(base.Z * 1e-7, 4, 3)
    res_base = run(solver, base, 2, tol=1e-8)
    res_tiny = run(solver, tiny, 2, tol=1e-8)
    assert res_tiny.converged
    assert res_tiny.iterations > 2
    assert abs(res_tiny.iterations - res_base.iterations) <= 1
    s_ref = torch.linalg.svdvals(tiny.Z)[:2]
    assert_close(res_tiny.sigma, s_ref, rtol=1e-8, atol=0.0)
    assert bool((res_tiny.residuals <= 1e-8).all())


# --------------------------------------------------------------------------- warm starts


@pytest.mark.parametrize("solver", ["power", "lanczos"])
@pytest.mark.parametrize("k", [1, 2])
def test_warm_start_from_exact_solution_converges_at_once(solver, k):
    op = random_operator(4, 3, seed=21)
    _, _, Vh = torch.linalg.svd(op.Z, full_matrices=False)
    res = run(solver, op, k, v0=Vh[:k].T.contiguous(), tol=1e-8)
    assert res.converged
    # one step per wanted triplet: power iterates once per triplet, Lanczos breaks down
    # on the invariant subspace spanned by the k vectors
    assert res.iterations <= max(2, k)
    assert_close(res.sigma, torch.linalg.svdvals(op.Z)[:k], rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_warm_start_from_perturbed_solution_saves_iterations(solver):
    op = random_operator(6, 5, seed=22)  # [36, 25], no particular gap
    _, _, Vh = torch.linalg.svd(op.Z, full_matrices=False)
    g = torch.Generator().manual_seed(0)
    v0 = Vh[:2].T + 1e-3 * torch.randn(25, 2, generator=g, dtype=torch.float64)
    cold = run(solver, op, 2, tol=1e-8)
    warm = run(solver, op, 2, tol=1e-8, v0=v0)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    assert_close(warm.sigma, cold.sigma, rtol=1e-8, atol=0.0)


def test_one_dimensional_warm_start_and_null_space_start():
    op = random_operator(3, 3, seed=1)
    v_ref = torch.linalg.svd(op.Z)[2][0]
    for solver in SOLVERS:
        res = run(solver, op, 1, v0=v_ref.clone(), tol=1e-10)
        assert res.iterations <= 2 and res.converged
    # a start in the null space of a rank-1 operator cannot be iterated: a random start
    # is used instead
    y = torch.zeros(9, dtype=torch.float64)
    y[0] = 1.0
    Z = torch.outer(torch.ones(9, dtype=torch.float64), y)
    null_start = torch.zeros(9, dtype=torch.float64)
    null_start[1] = 1.0
    for solver in SOLVERS:
        res = run(solver, DenseZOperator(Z, 3, 3), 1, v0=null_start)
        assert_close(res.sigma, torch.tensor([3.0], dtype=torch.float64))


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("solver", ["power", "lanczos"])
@pytest.mark.parametrize("k", [1, 2])
def test_zero_operator(solver, k):
    op = DenseZOperator(torch.zeros(9, 16, dtype=torch.float64), 3, 4)
    res = run(solver, op, k)
    assert res.converged
    assert bool((res.sigma == 0).all())
    for t in (res.U, res.V, res.residuals):
        assert bool(torch.isfinite(t).all())
    assert_close(torch.linalg.vector_norm(res.U, dim=0), torch.ones(k, dtype=torch.float64))
    assert_close(torch.linalg.vector_norm(res.V, dim=0), torch.ones(k, dtype=torch.float64))


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_float32_in_float32_out(solver):
    op64 = gapped_operator(4, 3, [4.0, 2.0, 1.0], noise=1e-2, seed=8)
    op32 = DenseZOperator(op64.Z.float(), 4, 3)
    res = run(solver, op32, 2)
    assert res.sigma.dtype == res.U.dtype == res.V.dtype == res.residuals.dtype == torch.float32
    assert res.converged
    assert_close(res.sigma, torch.linalg.svdvals(op64.Z)[:2].float(), dtype=torch.float32)


def test_iteration_cap_is_respected_and_reported():
    # σ_1 ≈ σ_2: the power method cannot separate them in 3 iterations
    op = gapped_operator(3, 3, [1.0, 0.999, 0.5], noise=0.0, seed=6)
    res = power_svd(op, 1, tol=1e-12, max_iters=3)
    assert res.iterations == 3
    assert not res.converged
    res2 = power_svd(op, 2, tol=1e-12, max_iters=3)
    assert res2.iterations == 6 and not res2.converged
    lan = lanczos_svd(random_operator(6, 6, seed=3), 2, krylov_dim=3, max_restarts=1, tol=1e-12)
    assert lan.iterations <= 3 + 2  # first cycle K steps, then K − keep per restart
    assert not lan.converged


def test_deterministic_by_default_and_generator_respected():
    op = random_operator(3, 4, seed=5)
    for solver in SOLVERS:
        a = run(solver, op, 2, tol=1e-4)
        b = run(solver, op, 2, tol=1e-4)
        assert torch.equal(a.U, b.U) and torch.equal(a.sigma, b.sigma)
        c = run(solver, op, 2, tol=1e-4, generator=torch.Generator().manual_seed(123))
        assert_close(c.sigma, a.sigma, rtol=1e-4, atol=0.0)


class _PlainOperator:
    """Any object with matvec/rmatvec/shape/dtype/device is accepted (not a ZOperator)."""

    def __init__(self, M: torch.Tensor) -> None:
        self.M, self.shape, self.dtype, self.device = M, tuple(M.shape), M.dtype, M.device

    def matvec(self, v):
        return self.M @ v

    def rmatvec(self, u):
        return self.M.T @ u


@pytest.mark.parametrize("solver", ["power", "lanczos"])
@pytest.mark.parametrize("shape", [(7, 5), (5, 7)])
def test_plain_operator_of_any_shape(solver, shape):
    M = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    res = run(solver, _PlainOperator(M), 2, tol=1e-10)
    assert res.U.shape == (shape[0], 2) and res.V.shape == (shape[1], 2)
    assert_matches_dense(res, M, 2, sigma_rtol=1e-10, cos_tol=1e-8)


def test_invalid_arguments():
    op = random_operator(2, 3, seed=0)  # [4, 9]
    for solver in SOLVERS.values():
        with pytest.raises(ConfigError, match="k must be"):
            solver(op, 5)
        with pytest.raises(ConfigError, match="tol"):
            solver(op, 1, tol=-1.0)
        with pytest.raises(ShapeError, match=r"v0 must be \[9\]"):
            solver(op, 1, v0=torch.ones(4, dtype=torch.float64))
        with pytest.raises(DTypeDeviceError, match="v0"):
            solver(op, 1, v0=torch.ones(9, dtype=torch.float32))
    with pytest.raises(ConfigError, match="krylov_dim"):
        lanczos_svd(random_operator(3, 3, seed=0), 3, krylov_dim=3)
    with pytest.raises(ConfigError, match="max_iters"):
        power_svd(op, 1, max_iters=0)


def test_power_svd_float32_finds_a_small_second_triplet_of_a_wide_low_rank_operator():
    """A random start sees a small σ₂ only as σ₂·√(rank/n_b); the zero test must not
    mistake that for a vanished deflated operator (σ₂/σ₁ = 1.6e-3, n_b = 10⁴, float32)."""
    g = torch.Generator().manual_seed(3)
    n_a, n_b = 25, 10_000
    Ua = torch.linalg.qr(torch.randn(n_a, 2, generator=g, dtype=torch.float64))[0]
    Vb = torch.linalg.qr(torch.randn(n_b, 2, generator=g, dtype=torch.float64))[0]
    sig = torch.tensor([112.0, 0.18], dtype=torch.float64)
    Z = (Ua * sig) @ Vb.T
    res = power_svd(DenseZOperator(Z.float(), 5, 100), k=2, tol=1e-5, max_iters=200)
    assert abs(res.sigma[1].item() - 0.18) <= 1e-3 * 112.0, res.sigma
    assert abs(float(res.U[:, 1].double() @ Ua[:, 1])) > 0.99


def test_power_svd_exactly_zero_operator_gives_finite_zero_triplets():
    Z = torch.zeros(9, 4, dtype=torch.float64)
    for k in (1, 2):
        res = power_svd(DenseZOperator(Z, 3, 2), k=k)
        assert torch.equal(res.sigma, torch.zeros(k, dtype=torch.float64))
        assert torch.isfinite(res.U).all() and torch.isfinite(res.V).all()
