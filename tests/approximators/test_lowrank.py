"""``kfac_lowrank`` (A⊗G + U diag(s) Uᵀ) and its eigen-solver against dense float64 references.

References are written from the definitions: F_ii from explicit per-pair Kronecker products
(approx_reference.dense_block), A and G from their sums, the residual's spectrum by
``torch.linalg.eigh``, the damped inverse by ``torch.linalg.solve``.  The solvers run with
tol = 1e-12, so a converged pair is off by ~1e-12·θ_1/gap — inside ``assert_close``'s
eps-based tolerances.
"""

from __future__ import annotations

import copy
import io

import approx_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.approximators import approximate, approximation_error
from curvlib.approximators.lowrank import KFACLowRankApproximator, KroneckerLowRank
from curvlib.curvatures.api import curvature
from curvlib.errors import ConfigError, NumericalWarning
from curvlib.linalg import top_eigenpairs, vec
from curvlib.testing.compare import assert_close

DT = torch.float64
TIGHT = {"tol": 1e-12, "max_iters": 400}


def _kfac_pair(stats):
    """A = (1/m) Σ_b Σ_t ā ā ᵀ, G = (scale/T) Σ_{b,c,t} g gᵀ — (3.19), (3.29) written out."""
    (use,) = stats.uses
    a, g = use.a.dense(), use.g
    m, c, T, d_g = g.shape
    A = torch.einsum("bti,btj->ij", a, a) / m
    G = stats.scale / T * torch.einsum("bcti,bctj->ij", g, g)
    return A, G


def _reference(stats, rank, past=None, rho=0.0):
    """A⊗G + the positive part of the top-`rank` eigenpairs of (1−ρ)F + ρ·past − A⊗G."""
    F = ref.dense_block(stats)
    A, G = _kfac_pair(stats)
    if past is not None:
        F = (1 - rho) * F + rho * past.to_dense()
        A, G = (1 - rho) * A + rho * past.A, (1 - rho) * G + rho * past.G
    K = torch.kron(A, G)
    e, Q = torch.linalg.eigh(F - K)
    e, Q = e.flip(0)[:rank], Q.flip(1)[:, :rank]
    return K + (Q * e.clamp_min(0)) @ Q.T, e


# --------------------------------------------------------------------------- the eigen-solver
@settings(max_examples=25, deadline=None)
@given(N=st.integers(12, 80), r=st.integers(1, 4), shift=st.floats(-2.0, 2.0), seed=st.integers(0, 10_000))
def test_top_eigenpairs_equal_dense_eigh(N, r, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, N, generator=gen, dtype=DT)
    M = (X + X.T) / 2 + shift * torch.eye(N, dtype=DT)
    e, Q = torch.linalg.eigh(M)
    e, Q = e.flip(0), Q.flip(1)
    gap = float(e[r - 1] - e[r]) if r < N else 1.0
    res = top_eigenpairs(lambda V: V @ M, N, r, dtype=DT, device="cpu", tol=1e-12, max_iters=2000)
    assert res.converged
    assert_close(res.theta, e[:r], atol=1e-9 * float(e.abs().max()), rtol=0)
    assert_close(res.U @ res.U.T, torch.eye(r, dtype=DT), atol=1e-12, rtol=0)
    if gap > 1e-3 * float(e.abs().max()):  # the invariant subspace is well defined
        assert_close(res.U.T @ res.U, Q[:, :r] @ Q[:, :r].T, atol=1e-8, rtol=0)


@pytest.mark.parametrize("depth", [3, 10, 13])
def test_top_eigenpairs_keep_an_orthonormal_basis_near_the_full_space(depth):
    """The KFAC residual of a small network's Linear layer (N = 95, F of rank 12): deep Krylov
    bases nearly exhaust the space, where nearly dependent blocks must be replaced, not
    normalised (with depth 10 they broke the basis's orthogonality once)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = torch.randn(6, 1, 4, 4, dtype=DT), torch.randint(0, 3, (6,))
    F = curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=torch.Generator().manual_seed(0), mc_samples=2)
    stats = F.statistics(1)
    A, G = _kfac_pair(stats)
    M = ref.dense_block(stats) - torch.kron(A, G)
    e = torch.linalg.eigvalsh(M).flip(0)
    res = top_eigenpairs(lambda V: V @ M, 95, 3, dtype=DT, device="cpu", tol=1e-12, max_iters=400, depth=depth)
    assert res.converged
    assert_close(res.U @ res.U.T, torch.eye(3, dtype=DT), atol=1e-12, rtol=0)
    assert_close(res.theta, e[:3], atol=1e-10 * float(e.abs().max()), rtol=0)


def test_top_eigenpairs_warm_start_needs_fewer_products():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 200, generator=gen, dtype=DT)
    M = X @ X.T / 200 - torch.eye(200, dtype=DT)
    cold = top_eigenpairs(lambda V: V @ M, 200, 3, dtype=DT, device="cpu", tol=1e-10, max_iters=500)
    warm = top_eigenpairs(lambda V: V @ M, 200, 3, dtype=DT, device="cpu", tol=1e-10, max_iters=500, v0=cold.U)
    assert cold.converged and warm.converged and warm.products < cold.products
    assert_close(warm.theta, cold.theta)


def test_top_eigenpairs_zero_operator_and_small_dimension():
    zero = top_eigenpairs(lambda V: torch.zeros_like(V), 50, 2, dtype=DT, device="cpu")
    assert zero.converged and float(zero.theta.abs().max()) == 0.0
    M = torch.diag(torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=DT))  # N ≤ b·depth: the dense path
    res = top_eigenpairs(lambda V: V @ M, 4, 2, dtype=DT, device="cpu")
    assert_close(res.theta, torch.tensor([3.0, 2.0], dtype=DT))
    with pytest.raises(ConfigError, match="r ≤ N"):
        top_eigenpairs(lambda V: V @ M, 4, 5, dtype=DT, device="cpu")


# --------------------------------------------------------------------------- the fit
@pytest.mark.parametrize("make", [
    lambda: ref.linear_stats(m=15, d_a=6, d_g=5, c=2, seed=1),
    lambda: ref.linear_stats(m=40, d_a=9, d_g=7, c=1, seed=2),
    lambda: ref.conv_stats(m=3, H=3, W=3, d_a=4, d_g=3, c=2, seed=3),
], ids=["linear_c2", "linear_iterative", "conv"])
@pytest.mark.parametrize("rank", [1, 3])
def test_fit_equals_dense_top_eigenpairs_of_the_kfac_residual(make, rank):
    stats = make()
    fit = KFACLowRankApproximator(dict(TIGHT, rank=rank)).fit(stats)
    want, theta = _reference(stats, rank)
    assert fit.info.converged
    assert_close(torch.tensor(fit.info.singular_values, dtype=DT), theta, atol=1e-9 * float(theta.abs().max()), rtol=0)
    assert_close(fit.block.to_dense(), want, atol=1e-9 * float(want.abs().max()), rtol=0)


def test_ema_fits_the_residual_of_the_averaged_block():
    s1, s2 = ref.linear_stats(m=20, d_a=6, d_g=5, seed=4), ref.linear_stats(m=20, d_a=6, d_g=5, seed=5)
    approx = KFACLowRankApproximator(dict(TIGHT, rank=2, ema=0.7))
    first = approx.fit(s1)
    second = approx.fit(s2, previous=first)
    assert second.info.rho == pytest.approx(0.5) and second.refresh == 2  # ρ = min(1 − 1/2, 0.7)
    want, _ = _reference(s2, 2, past=first.block, rho=0.5)
    assert_close(second.block.to_dense(), want, atol=1e-9 * float(want.abs().max()), rtol=0)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 5))
def test_error1_never_above_kfac(seed, rank):
    """‖R − P‖_F ≤ ‖R‖_F: P zeroes the top positive eigenvalues of the residual R = F − A⊗G."""
    stats = ref.linear_stats(m=12, d_a=5, d_g=4, seed=seed)
    F = ref.dense_block(stats)
    A, G = _kfac_pair(stats)
    fit = KFACLowRankApproximator(dict(TIGHT, rank=rank)).fit(stats)
    e_kfac = torch.linalg.matrix_norm(F - torch.kron(A, G))
    e_low = torch.linalg.matrix_norm(F - fit.block.to_dense())
    assert float(e_low) <= float(e_kfac) * (1 + 1e-12)
    assert float(torch.linalg.eigvalsh(fit.block.to_dense())[0]) >= -1e-12 * float(F.abs().max())  # PSD


# --------------------------------------------------------------------------- the block
def _random_block(seed, d_a=5, d_g=4, r=3, zero_s=False):
    gen = torch.Generator().manual_seed(seed)
    Xa, Xg = torch.randn(d_a, d_a, generator=gen, dtype=DT), torch.randn(d_g, d_g, generator=gen, dtype=DT)
    Q, _ = torch.linalg.qr(torch.randn(d_a * d_g, r, generator=gen, dtype=DT))
    U = Q.T.reshape(r, d_a, d_g).transpose(1, 2)  # MAT of each column (column-major vec)
    s = torch.rand(r, generator=gen, dtype=DT) * 3
    if zero_s:
        s[0] = 0.0
    return KroneckerLowRank(Xa @ Xa.T, Xg @ Xg.T, U, s)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), lam=st.floats(1e-4, 10.0), zero_s=st.booleans())
def test_woodbury_solve_equals_dense_solve(seed, lam, zero_s):
    block = _random_block(seed, zero_s=zero_s)
    D = block.to_dense()
    assert_close(vec(block.U).T.T @ vec(block.U).T, torch.eye(3, dtype=DT), atol=1e-13, rtol=0)
    X = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    got = vec(block.tikhonov_solve(X, lam))
    want = torch.linalg.solve(D + lam * torch.eye(20, dtype=DT), vec(X).T).T
    assert_close(got, want, atol=1e-10 * float(want.abs().max()), rtol=0)
    assert_close(vec(block.apply(X)), (D @ vec(X).T).T)
    assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(D))


def test_block_round_trips_exactly():
    block = _random_block(7)
    buf = io.BytesIO()
    fit = curvlib.approximators.LayerFit(block=block, info=curvlib.approximators.FitInfo(method="kfac_lowrank"))
    torch.save(fit.state_dict(), buf)
    buf.seek(0)
    back = curvlib.approximators.LayerFit.from_state_dict(torch.load(buf))  # weights_only=True
    for a, b in zip(block.tensors(), back.block.tensors()):
        assert torch.equal(a, b)
    X = torch.randn(4, 5, dtype=DT)
    block.tikhonov_solve(X, 0.1)  # a cached factorization does not travel, and does not change results
    clone = copy.deepcopy(block)
    assert clone._woodbury is None and torch.equal(clone.tikhonov_solve(X, 0.1), block.tikhonov_solve(X, 0.1))


# --------------------------------------------------------------------------- through the front ends
@pytest.fixture(scope="module")
def fisher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(8, 1, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (8,))
    return curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=torch.Generator().manual_seed(0), mc_samples=2)


def test_error1_below_kfac_on_a_network(fisher):
    low = approximation_error(fisher, approximate(fisher, "kfac_lowrank", rank=4, **TIGHT))
    kfac = approximation_error(fisher, approximate(fisher, "kfac"))
    for a, b in zip(low, kfac):
        assert a.error1 <= b.error1 + 1e-10
        assert a.error1 < b.error1  # these blocks have positive residual eigenvalues to take


def test_heuristic_damping_is_refused_before_any_data():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(curvlib.errors.CurvlibError, match="heuristic"):
        curvlib.build_preconditioner(model, nn.MSELoss(),
                                     {"approximator": "kfac_lowrank", "damping": {"kind": "heuristic", "value": 1e-3}})


def test_natural_gradient_step_equals_dense_damped_solve():
    """One NaturalGradient step with kfac_lowrank + tikhonov is −lr·(F̂ + λI)⁻¹∇L, F̂ the dense reference fit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    lam = 0.05
    cfg = {"curvature": "empirical_fisher", "approximator": {"kind": "kfac_lowrank", "rank": 2, **TIGHT},
           "damping": {"kind": "tikhonov", "value": lam}}
    opt = curvlib.NaturalGradient(model, nn.CrossEntropyLoss(), cfg, lr=1.0)
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(batch=(X, y))
    F = opt.preconditioner.curvature
    D = torch.block_diag(*[_reference(F.statistics(i).to(DT), 2)[0] for i in range(len(F.layers))])
    g = F.params_to_vector([p.grad for p in F.params()])
    want = torch.linalg.solve(D + lam * torch.eye(F.p, dtype=DT), g)
    step = F.params_to_vector([p0 - p.detach() for p0, p in zip(before, model.parameters())])
    assert_close(step, want, atol=1e-9 * float(want.abs().max()), rtol=0)


def test_nonfinite_statistics_keep_the_previous_fit():
    stats = ref.linear_stats(m=10, d_a=4, d_g=3)
    approx = KFACLowRankApproximator({"rank": 2})
    first = approx.fit(stats)
    bad = stats.replace(scale=float("nan"))
    with pytest.warns(NumericalWarning, match="keeping the previous fit"):
        assert approx.fit(bad, previous=first) is first
