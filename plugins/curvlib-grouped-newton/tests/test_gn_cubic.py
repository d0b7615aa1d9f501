"""The anisotropic cubic regularization (seed 004 §4.2, appendix D).

The references are independent of the solver: the global-optimality characterization of
Nesterov and Polyak (2006) for m(η) = −ḡᵀη + ½ηᵀH̄η + (λ/6)‖Dη‖³ — η is a global minimizer
iff (H̄ + (λ/2) r D²) η = ḡ with r = ‖Dη‖ and H̄ + (λ/2) r D² ⪰ 0 — checked densely, and
scipy's BFGS started from many points, which must never find a lower model value.
"""

from __future__ import annotations

from gn_reference import single_thread  # noqa: F401  (autouse fixture)
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from curvlib.errors import ConfigError, NotPSDError, ShapeError
from curvlib.testing import assert_close
from curvlib_grouped_newton import cubic_model, cubic_scales, solve_anisotropic_cubic

F64 = torch.float64
EPS = torch.finfo(F64).eps
PROFILE = settings(derandomize=True, database=None, deadline=None, max_examples=40)


def _instance(seed: int, S: int, *, shift: float = 0.0, spread: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(S, S, generator=gen, dtype=F64)
    H = 0.5 * (A + A.T) + shift * torch.eye(S, dtype=F64)
    g = torch.randn(S, generator=gen, dtype=F64)
    d = torch.exp(spread * torch.randn(S, generator=gen, dtype=F64))
    return H, g, d


def _check_global_minimizer(H, g, d, lam, eta, *, starts: int = 6, seed: int = 0):
    """Nesterov–Polyak optimality conditions + no better point found by BFGS."""
    c = 0.5 * lam
    r = float(torch.linalg.vector_norm(d * eta))
    M = H + c * r * torch.diag(d * d)
    scale = float(torch.linalg.matrix_norm(H, 2)) * float(eta.norm()) + float(g.norm()) + c * r * float((d * d * eta).norm())
    resid = float((M @ eta - g).norm())
    assert resid <= 1e3 * EPS * scale, f"stationarity (2): residual {resid:.3e} vs scale {scale:.3e}"
    Dinv = torch.diag(1 / d)
    low = float(torch.linalg.eigvalsh(Dinv @ M @ Dinv)[0])
    top = float(torch.linalg.eigvalsh(Dinv @ H @ Dinv).abs().max()) + c * r
    assert low >= -1e3 * EPS * top, f"H̃ + c r I is not PSD: smallest eigenvalue {low:.3e} (scale {top:.3e})"
    Hn, gn, dn = H.numpy(), g.numpy(), d.numpy()

    def m(x):
        return -gn @ x + 0.5 * x @ Hn @ x + lam / 6.0 * np.linalg.norm(dn * x) ** 3

    def dm(x):
        return -gn + Hn @ x + 0.5 * lam * np.linalg.norm(dn * x) * dn * dn * x

    best = float(cubic_model(eta, H, g, d, lam))
    gen = torch.Generator().manual_seed(seed)
    size = max(1.0, float(eta.norm()))
    for _ in range(starts):
        x0 = size * torch.randn(H.shape[0], generator=gen, dtype=F64).numpy()
        res = minimize(m, x0, jac=dm, method="BFGS", options={"gtol": 1e-12})
        assert res.fun >= best - 1e-9 * (1 + abs(best)), f"BFGS found m = {res.fun:.12e} < {best:.12e}"


def test_positive_definite_case():
    H, g, d = _instance(0, 5, shift=4.0)
    assert float(torch.linalg.eigvalsh(H)[0]) > 0
    sol = solve_anisotropic_cubic(H, g, d, 2.0)
    assert sol.case == "positive_definite"
    _check_global_minimizer(H, g, d, 2.0, sol.eta)
    # appendix D, (5): the root lies in [0, ‖H̃⁻¹g̃‖]
    Dinv = torch.diag(1 / d)
    assert 0 < sol.radius <= float(torch.linalg.solve(Dinv @ H @ Dinv, g / d).norm())


def test_nesterov_polyak_case():
    H, g, d = _instance(1, 6, shift=-1.5)
    assert float(torch.linalg.eigvalsh(H)[0]) < 0
    lam = 0.7
    sol = solve_anisotropic_cubic(H, g, d, lam)
    assert sol.case == "nesterov_polyak"
    Dinv = torch.diag(1 / d)
    lam1 = float(torch.linalg.eigvalsh(Dinv @ H @ Dinv)[0])
    assert sol.radius > -lam1 / (lam / 2)  # appendix D, (6): r ∈ (−2λ_min/λ_int, ∞)
    _check_global_minimizer(H, g, d, lam, sol.eta)


def test_hard_case():
    # H̃ = diag(−2, 1, 3) with g̃ ⟂ the eigenvector of −2 and small: no root of (6) above 2λ_1/λ
    d = torch.tensor([0.5, 2.0, 1.5], dtype=F64)
    Ht = torch.diag(torch.tensor([-2.0, 1.0, 3.0], dtype=F64))
    Q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=F64))
    Ht = Q @ Ht @ Q.T
    gt = 0.1 * (Q[:, 1] + Q[:, 2])
    H = torch.diag(d) @ Ht @ torch.diag(d)
    g = d * gt
    lam = 1.0
    sol = solve_anisotropic_cubic(H, g, d, lam)
    assert sol.case in ("hard_case", "nesterov_polyak")  # rounding may leave a tiny component on v_1
    assert math.isclose(sol.radius, 2.0 / (lam / 2), rel_tol=1e-8)
    _check_global_minimizer(H, g, d, lam, sol.eta)


def test_exact_hard_case_branch():
    d = torch.ones(3, dtype=F64)
    H = torch.diag(torch.tensor([-2.0, 1.0, 3.0], dtype=F64))
    g = torch.tensor([0.0, 0.1, 0.1], dtype=F64)
    sol = solve_anisotropic_cubic(H, g, d, 1.0)
    assert sol.case == "hard_case"
    _check_global_minimizer(H, g, d, 1.0, sol.eta)
    assert float(sol.eta[0]) > 0  # the sign convention: largest entry of v_1 positive


def test_zero_strength_is_the_newton_system():
    H, g, d = _instance(4, 4, shift=3.0)
    sol = solve_anisotropic_cubic(H, g, d, 0.0)
    assert sol.case == "newton"
    assert_close(sol.eta, torch.from_numpy(np.linalg.solve(H.numpy(), g.numpy())))


def test_zero_gradient_gives_zero_step():
    H, _, d = _instance(5, 3)
    sol = solve_anisotropic_cubic(H, torch.zeros(3, dtype=F64), d, 1.0)
    assert sol.case == "zero" and bool((sol.eta == 0).all())


def test_groups_without_third_order_term_are_solved_exactly():
    # d_s = 0 on two groups whose block of H̄ is positive definite: the minimizer of m is
    # still unique, and it satisfies the optimality conditions with D singular
    H, g, d = _instance(6, 5, shift=-0.5)
    K = [1, 3]
    d[K] = 0.0
    H[K, K] += 3.0  # makes H̄_KK positive definite
    assert float(torch.linalg.eigvalsh(H[K][:, K])[0]) > 0 > float(torch.linalg.eigvalsh(H)[0])
    lam = 1.3
    sol = solve_anisotropic_cubic(H, g, d, lam)
    c, r = lam / 2, float(torch.linalg.vector_norm(d * sol.eta))
    M = H + c * r * torch.diag(d * d)
    assert_close(M @ sol.eta, g, rtol=0, atol=1e3 * EPS * (float(g.norm()) + float(M.norm() * sol.eta.norm())))
    assert float(torch.linalg.eigvalsh(M)[0]) >= -1e-10 * float(M.norm())
    Hn, gn, dn = H.numpy(), g.numpy(), d.numpy()
    best = float(cubic_model(sol.eta, H, g, d, lam))
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        x0 = 3 * torch.randn(5, generator=gen, dtype=F64).numpy()
        res = minimize(lambda x: -gn @ x + 0.5 * x @ Hn @ x + lam / 6 * np.linalg.norm(dn * x) ** 3,
                       x0, method="BFGS", options={"gtol": 1e-12})
        assert res.fun >= best - 1e-9 * (1 + abs(best))


def test_unbounded_model_raises():
    H = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(NotPSDError, match="unbounded below"):
        solve_anisotropic_cubic(H, torch.ones(2, dtype=F64), torch.tensor([1.0, 0.0], dtype=F64), 1.0)


def test_errors():
    H, g, d = _instance(7, 3)
    with pytest.raises(ShapeError):
        solve_anisotropic_cubic(H, g[:2], d, 1.0)
    with pytest.raises(ConfigError, match="λ_int"):
        solve_anisotropic_cubic(H, g, d, -1.0)
    with pytest.raises(ConfigError, match="d_s ≥ 0"):
        solve_anisotropic_cubic(H, g, -d, 1.0)


def test_cubic_scales_are_cube_roots():
    D = torch.tensor([-8.0, 27.0, 0.0, 1e-3], dtype=F64)
    assert_close(cubic_scales(D), torch.tensor([2.0, 3.0, 0.0, 0.1], dtype=F64))


@PROFILE
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(1, 6), shift=st.floats(-3.0, 3.0),
       log_lam=st.floats(-3.0, 3.0), spread=st.floats(0.0, 2.0))
def test_solution_is_the_global_minimizer(seed, S, shift, log_lam, spread):
    H, g, d = _instance(seed, S, shift=shift, spread=spread)
    lam = 10.0 ** log_lam
    sol = solve_anisotropic_cubic(H, g, d, lam)
    _check_global_minimizer(H, g, d, lam, sol.eta, starts=3, seed=seed)


@PROFILE
@given(seed=st.integers(0, 2**31 - 1), S=st.integers(1, 5), log_a=st.lists(st.floats(-2.0, 2.0), min_size=5, max_size=5))
def test_solution_is_covariant_under_group_rescaling(seed, S, log_a):
    # appendix E: u_s -> a_s u_s (a_s > 0) maps H̄ -> AH̄A, ḡ -> Aḡ, D̄ -> A³D̄, so d -> Ad and η -> A⁻¹η
    H, g, d = _instance(seed, S)
    a = torch.tensor([10.0 ** x for x in log_a[:S]], dtype=F64)
    A = torch.diag(a)
    sol = solve_anisotropic_cubic(H, g, d, 1.0)
    scaled = solve_anisotropic_cubic(A @ H @ A, a * g, cubic_scales(a**3 * d**3), 1.0)
    assert_close(a * scaled.eta, sol.eta, rtol=1e-8, atol=1e-8 * float(sol.eta.abs().max()))
