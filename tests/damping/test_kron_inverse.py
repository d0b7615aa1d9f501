"""``kron_inverse``: C ⊗ D ≈ (F_ii + λI)⁻¹ by alternating least squares, against a dense
float64 ALS written independently (partial traces of the dense M and M², scipy's Sylvester
solver), its stationarity, and the monotone decrease of ‖I − P M‖_F."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1] / "approximators"))
import approx_reference as ref  # noqa: E402

import curvlib  # noqa: E402
from curvlib.approximators import ExactBlock  # noqa: E402
from curvlib.damping import KronInverseDamping, damped_inverse  # noqa: E402
from curvlib.damping.kron_inverse import fit_kron_inverse, fit_kron_inverse_terms, kron_inverse_residual  # noqa: E402
from curvlib.errors import ConfigError  # noqa: E402
from curvlib.linalg import KroneckerSum, vec  # noqa: E402
from curvlib.testing.compare import assert_close  # noqa: E402

DT = torch.float64


def _objective(C, D, M):
    return float(torch.linalg.matrix_norm(torch.eye(M.shape[0], dtype=DT) - torch.kron(C, D) @ M) ** 2)


def dense_als(M: torch.Tensor, d_a: int, d_g: int, sweeps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric ALS on the dense M: with M4[a', g', a, g] = M[(g', a'), (g, a)] (column-major vec),
    tr((C⊗D)M) = Σ C_aa' D_gg' M4[a', g', a, g] and tr((C²⊗D²)M²) likewise; each half-step
    solves the Sylvester equation X Q + Q X = T + Tᵀ with scipy."""
    M4 = M.reshape(d_a, d_g, d_a, d_g)
    M24 = (M @ M).reshape(d_a, d_g, d_a, d_g)
    C = torch.eye(d_a, dtype=DT)
    for _ in range(sweeps):
        T = torch.einsum("ab,bhag->hg", C, M4)     # T[g', g] = Σ C_aa' M4[a', g', a, g]
        Q = torch.einsum("ab,bhag->hg", C @ C, M24)
        D = torch.from_numpy(scipy.linalg.solve_sylvester(Q.numpy(), Q.numpy(), (T + T.T).numpy()))
        T = torch.einsum("gh,ahbg->ab", D, M4)     # T[a', a] = Σ D_gg' M4[a', g', a, g]
        Q = torch.einsum("gh,ahbg->ab", D @ D, M24)
        C = torch.from_numpy(scipy.linalg.solve_sylvester(Q.numpy(), Q.numpy(), (T + T.T).numpy()))
        alpha = float(torch.linalg.matrix_norm(D) / torch.linalg.matrix_norm(C)) ** 0.5
        C, D = C * alpha, D / alpha
    return C, D


CASES = {
    "linear": lambda: ref.linear_stats(m=12, d_a=5, d_g=4, c=2, seed=1),
    "conv": lambda: ref.conv_stats(m=3, H=3, W=2, d_a=4, d_g=3, c=2, seed=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fit_equals_dense_als_and_is_stationary(case):
    stats = CASES[case]()
    F = ref.dense_block(stats)
    lam = 0.1 * float(torch.linalg.eigvalsh(F)[-1])
    M = F + lam * torch.eye(F.shape[0], dtype=DT)
    C, D, report = fit_kron_inverse(stats, lam, max_iters=60, tol=0.0)
    Cr, Dr = dense_als(M, stats.a_dim, stats.g_dim, sweeps=report["iterations"])
    assert_close(torch.kron(C, D), torch.kron(Cr, Dr), rtol=1e-8)
    assert report["objective"] == pytest.approx(_objective(C, D, M), rel=1e-9)
    # the residual of any C ⊗ D (here KFAC's π-split inverse) equals the dense one
    A, G = torch.eye(stats.a_dim, dtype=DT) * 2.0, torch.diag(torch.arange(1.0, stats.g_dim + 1, dtype=DT))
    Ci, Di = torch.linalg.inv(A + 0.3 * torch.eye(stats.a_dim, dtype=DT)), torch.linalg.inv(G + 0.1 * torch.eye(stats.g_dim, dtype=DT))
    assert kron_inverse_residual(stats, lam, Ci, Di) == pytest.approx((_objective(Ci, Di, M) / M.shape[0]) ** 0.5, rel=1e-9)
    # stationary over symmetric perturbations of either factor (a converged sweep)
    C, D, report = fit_kron_inverse(stats, lam, max_iters=5000, tol=1e-15)
    gen = torch.Generator().manual_seed(0)
    for side in ("C", "D"):
        E = torch.randn(*(C.shape if side == "C" else D.shape), generator=gen, dtype=DT)
        E = 1e-5 * (E + E.T)
        plus = _objective(C + E, D, M) if side == "C" else _objective(C, D + E, M)
        minus = _objective(C - E, D, M) if side == "C" else _objective(C, D - E, M)
        assert abs(plus - minus) / 2 <= 1e-7 * report["objective"], side


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(2, 20), rel_lam=st.floats(1e-3, 1.0))
def test_residual_below_the_best_multiple_of_the_identity(seed, m, rel_lam):
    """ALS starts at C = I and every half-step minimises over one factor, so the fit leaves
    ‖I − P M‖²_F below min_c ‖I − c M‖²_F = p − tr(M)²/tr(M²), and each sweep lowers it."""
    stats = ref.linear_stats(m=m, d_a=4, d_g=3, seed=seed)
    F = ref.dense_block(stats)
    lam = rel_lam * float(torch.linalg.eigvalsh(F)[-1])
    M = F + lam * torch.eye(12, dtype=DT)
    f_id = float(12 - torch.trace(M) ** 2 / torch.trace(M @ M))
    previous = f_id * (1 + 1e-9) + 1e-12
    for sweeps in (1, 2, 4, 8):
        _, _, report = fit_kron_inverse(stats, lam, max_iters=sweeps, tol=0.0)
        assert report["objective"] <= previous
        previous = report["objective"] * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("case", sorted(CASES))
def test_rank_k_terms_lower_the_residual_and_each_is_stationary(case):
    """Greedy rank k: the reported objective is the dense ‖I − Σ_r (C_r⊗D_r) M‖², it falls with k,
    and the last term is stationary given the ones before it (finite differences)."""
    stats = CASES[case]()
    F = ref.dense_block(stats)
    lam = 0.1 * float(torch.linalg.eigvalsh(F)[-1])
    eye = torch.eye(F.shape[0], dtype=DT)
    M = F + lam * eye
    previous = float(F.shape[0])
    for rank in (1, 2, 3):
        terms, report = fit_kron_inverse_terms(stats, lam, rank=rank, max_iters=2000, tol=1e-15)
        P = sum(torch.kron(C, D) for C, D in terms)
        dense = float(torch.linalg.matrix_norm(eye - P @ M) ** 2)
        assert report["objective"] == pytest.approx(dense, rel=1e-9)
        assert dense < previous
        previous = dense
    C, D = terms[-1]
    before = sum(torch.kron(c, d) for c, d in terms[:-1])
    E = torch.randn(*C.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    E = 1e-5 * (E + E.T)

    def f(Cx):
        return float(torch.linalg.matrix_norm(eye - (before + torch.kron(Cx, D)) @ M) ** 2)

    assert abs(f(C + E) - f(C - E)) / 2 <= 1e-7 * previous
    inv = KronInverseDamping(value=lam, rank=3, max_iters=2000, tol=1e-15).invert(ExactBlock(stats))
    assert_close(inv.to_dense(), P, rtol=1e-8)


@pytest.mark.parametrize("case", sorted(CASES))
def test_joint_rank_k_is_stationary_in_every_factor_and_below_greedy(case):
    """fit="joint": block coordinate descent from the greedy sum. Its objective is the dense
    ‖I − Σ_r (C_r⊗D_r) M‖², at most the greedy one's, never rising with more passes, and at
    convergence every factor of every term is stationary given all the others (finite
    differences of the dense objective) — the greedy sum's earlier terms are not."""
    stats = CASES[case]()
    F = ref.dense_block(stats)
    lam = 0.1 * float(torch.linalg.eigvalsh(F)[-1])
    eye = torch.eye(F.shape[0], dtype=DT)
    M = F + lam * eye

    def dense(terms):
        return float(torch.linalg.matrix_norm(eye - sum(torch.kron(C, D) for C, D in terms) @ M) ** 2)

    def slope(terms, r, side, E):
        def f(X):
            t = list(terms)
            t[r] = (X, t[r][1]) if side == 0 else (t[r][0], X)
            return dense(t)
        X = terms[r][side]
        return abs(f(X + E) - f(X - E)) / 2

    greedy, g_report = fit_kron_inverse_terms(stats, lam, rank=3, max_iters=2000, tol=1e-15)
    previous = g_report["objective"] * (1 + 1e-12)
    for passes in (1, 2, 4):
        _, report = fit_kron_inverse_terms(stats, lam, rank=3, max_iters=2000, tol=1e-15, fit="joint",
                                           max_passes=passes)
        assert report["objective"] <= previous and report["passes"] <= passes
        previous = report["objective"] * (1 + 1e-12)
    joint, report = fit_kron_inverse_terms(stats, lam, rank=3, max_iters=5000, tol=1e-15, fit="joint")
    assert report["converged"] and report["objective"] == pytest.approx(dense(joint), rel=1e-9)
    assert report["objective"] < g_report["objective"]
    gen = torch.Generator().manual_seed(2)
    worst_greedy = 0.0
    for r in range(3):
        for side in (0, 1):
            E = torch.randn(*joint[r][side].shape, generator=gen, dtype=DT)
            E = 1e-5 * (E + E.T)
            assert slope(joint, r, side, E) <= 1e-7 * report["objective"], (r, side)
            worst_greedy = max(worst_greedy, slope(greedy, r, side, E) / g_report["objective"])
    assert worst_greedy > 1e-6  # the greedy sum is not stationary for the joint objective
    inv = KronInverseDamping(value=lam, rank=3, fit="joint", max_iters=5000, tol=1e-15).invert(ExactBlock(stats))
    assert_close(inv.to_dense(), sum(torch.kron(C, D) for C, D in joint), rtol=1e-8)
    with pytest.raises(ConfigError, match="greedy"):
        fit_kron_inverse_terms(stats, lam, rank=2, fit="best")


def test_damping_applies_d_x_c_and_is_refused_for_kronecker_blocks():
    stats = CASES["linear"]()
    block = ExactBlock(stats)
    inv = KronInverseDamping(value=0.05, tol=1e-12, max_iters=500).invert(block)
    C, D, _ = fit_kron_inverse(stats, 0.05, max_iters=500, tol=1e-12)
    X = torch.randn(3, 4, 5, dtype=DT)
    assert_close(inv.solve(X), D @ X @ C)
    assert_close(vec(inv.solve(X)), (torch.kron(C, D) @ vec(X).T).T)
    assert inv.info.method == "als" and inv.info.converged and 0 < inv.info.relative_residual < 1
    with pytest.raises(ConfigError):
        damped_inverse(KroneckerSum([(torch.eye(5, dtype=DT), torch.eye(4, dtype=DT))]), KronInverseDamping(value=0.1))


def test_build_pairs_it_with_exact_block_and_refuses_the_rest():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    curvlib.build_preconditioner(model, nn.MSELoss(), {"approximator": "exact_block",
                                                       "damping": {"kind": "kron_inverse", "value": 1e-2}})
    with pytest.raises(ConfigError, match="SampledBlock"):
        curvlib.build_preconditioner(model, nn.MSELoss(), {"approximator": "kfac",
                                                           "damping": {"kind": "kron_inverse", "value": 1e-2}})


def test_natural_gradient_trains_with_it():
    """A positive definite P gives descent directions: 15 steps lower the loss, none falls back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    X, y = torch.randn(64, 6, dtype=DT), torch.randint(0, 3, (64,))
    loss_fn = nn.CrossEntropyLoss()
    opt = curvlib.NaturalGradient(model, loss_fn, {"approximator": "exact_block",
                                                   "damping": {"kind": "kron_inverse", "value": 1e-2}},
                                  lr=0.3, kl_clip=1e-2, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        losses.append(float(loss.detach()))
        grads = [p.grad.clone() for p in model.parameters()]
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(batch=(X, y))
        descent = sum(float((g * (b - p.detach())).sum()) for g, b, p in zip(grads, before, model.parameters()))
        assert descent > 0  # ⟨∇L, −Δθ⟩ > 0
    assert float(loss_fn(model(X), y).detach()) < 0.9 * losses[0]
