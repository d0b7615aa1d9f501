"""``levenberg_marquardt``: Martens & Grosse's rule for λ, its helpers and its state."""

from __future__ import annotations

import math

import pytest
import torch
from damping_reference import dense_solve, eye, randn, spd

from curvlib.damping import LevenbergMarquardtDamping, quadratic_model_change, reduction_ratio
from curvlib.errors import ConfigError, DTypeDeviceError, NumericalWarning, ShapeError
from curvlib.linalg import KroneckerSum
from curvlib.testing.compare import assert_close


def expected_lambdas(lam0, ratios, omega, lo=0.25, hi=0.75, floor=0.0, ceiling=math.inf):
    """The rule written out: ρ < 1/4 → λ/ω, ρ > 3/4 → ωλ, then clamp."""
    out, lam = [], lam0
    for rho in ratios:
        if not math.isfinite(rho) or rho < lo:
            lam = lam / omega
        elif rho > hi:
            lam = lam * omega
        lam = min(max(lam, floor), ceiling)
        out.append(lam)
    return out


def test_lambda_follows_the_rule_over_a_sequence_of_ratios():
    ratios = [0.1, 0.9, 0.5, 0.25, 0.75, -2.0, 1.3, 0.76, 0.2499]
    damping = LevenbergMarquardtDamping(value=1e-2)
    assert damping.omega == pytest.approx(0.95, rel=1e-15)  # (19/20)^1
    got = [damping.update(r) for r in ratios]
    want = expected_lambdas(1e-2, ratios, 0.95)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-14)
    # spot checks written by hand: 0.1 → ×1/0.95, 0.9 → ×0.95, 0.5 → unchanged
    assert got[0] == pytest.approx(1e-2 / 0.95, rel=1e-14)
    assert got[1] == pytest.approx(1e-2, rel=1e-14)
    assert got[2] == got[1]
    assert damping.value == got[-1] and damping.num_updates == len(ratios)


def test_omega_from_the_update_interval():
    damping = LevenbergMarquardtDamping(value=1.0, interval=5)
    assert damping.omega == pytest.approx(0.7737809375, rel=1e-12)  # 0.95^5
    assert damping.update(0.0) == pytest.approx(1.0 / 0.7737809375, rel=1e-12)
    assert LevenbergMarquardtDamping(value=1.0, interval=5, omega=0.5).omega == 0.5


def test_lambda_is_clamped_at_floor_and_ceiling():
    damping = LevenbergMarquardtDamping(value=1.0, omega=0.5, floor=0.3, ceiling=3.0)
    assert [damping.update(0.9) for _ in range(3)] == [0.5, 0.3, 0.3]
    assert [damping.update(0.0) for _ in range(4)] == [0.6, 1.2, 2.4, 3.0]
    assert damping.update(-1.0) == 3.0


def test_non_finite_ratio_counts_as_a_failed_step():
    damping = LevenbergMarquardtDamping(value=1.0, omega=0.5)
    with pytest.warns(NumericalWarning, match="non-finite reduction ratio"):
        assert damping.update(float("nan")) == 2.0
    with pytest.warns(NumericalWarning):
        assert damping.update(torch.tensor(float("inf"))) == 4.0


def test_state_dict_round_trip_is_exact():
    damping = LevenbergMarquardtDamping(value=1e-3, interval=3)
    for r in (0.1, 0.1, 0.9, 0.0, 0.3):
        damping.update(r)
    state = damping.state_dict()
    other = LevenbergMarquardtDamping(value=1e-3, interval=3)
    other.load_state_dict(state)
    assert other.value == damping.value  # bit-exact
    assert other.num_updates == damping.num_updates == 5
    assert other.state_dict() == state
    assert other.update(0.9) == damping.update(0.9)
    for bad in (
        {"value": -1.0},
        {"value": float("nan")},
        {"value": 1e9},  # above the default ceiling 1e8
        {"num_updates": 2},
        {"kind": "tikhonov", "value": 1.0},
        {"value": 1.0, "extra": 0},
    ):
        with pytest.raises(ConfigError):
            other.load_state_dict(bad)


@pytest.mark.parametrize("inner", ["tikhonov", "heuristic"])
def test_invert_uses_the_current_lambda_of_the_inner_kind(inner):
    a, b = 3, 2
    A, B = spd(a, seed=1), spd(b, seed=2)
    block = KroneckerSum([(A, B)])
    damping = LevenbergMarquardtDamping(value=0.5, inner=inner, omega=0.5)
    damping.update(0.9)  # λ = 0.25
    lam = damping.value
    assert lam == 0.25
    inv = damping.invert(block)
    if inner == "tikhonov":
        M = torch.kron(A, B) + lam * eye(a * b)
    else:
        pi = math.sqrt((float(torch.trace(A)) / a) / (float(torch.trace(B)) / b))
        r = math.sqrt(lam)
        M = torch.kron(A + pi * r * eye(a), B + (r / pi) * eye(b))
    X = randn(b, a, seed=3)
    assert_close(inv.solve(X), dense_solve(M, X))
    assert inv.info.lam == lam


def test_inner_options_are_passed_and_validated():
    damping = LevenbergMarquardtDamping(value=0.1, inner="heuristic", inner_options={"floor": 0.2})
    assert damping.inner.options.floor == 0.2 and damping.inner.value == 0.1
    for bad in (
        {"value": 0.1, "inner_options": {"value": 1.0}},
        {"value": 0.1, "inner": "heuristic", "inner_options": {"pcg_tol": 1e-6}},
        {"value": 0.1, "inner": "exact"},
        {"value": 10.0, "ceiling": 1.0},
        {"value": 0.1, "floor": 1.0, "ceiling": 0.5},
        {"value": 0.1, "rho_low": 0.8, "rho_high": 0.2},
        {"value": 0.1, "omega": 1.0},
        {"value": 0.1, "interval": 0},
        {"value": 0.0},
        {"value": 0.1, "unknown": 1},
    ):
        with pytest.raises(ConfigError):
            LevenbergMarquardtDamping(bad)


def test_quadratic_model_change_and_reduction_ratio():
    p = 6
    C = spd(p, seed=1)
    g = randn(p, seed=2)
    delta = -torch.linalg.solve(C + 0.1 * eye(p), g)
    q = quadratic_model_change(g, delta, C @ delta)
    # written out: gᵀδ + ½ δᵀCδ
    want = float(g @ delta) + 0.5 * float(delta @ C @ delta)
    assert float(q) == pytest.approx(want, rel=1e-13)
    assert q.ndim == 0 and q.dtype == torch.float64
    assert float(q) < 0
    assert reduction_ratio(2.0, 1.5, -1.0) == pytest.approx(0.5)
    assert reduction_ratio(torch.tensor(2.0), torch.tensor(2.5), torch.tensor(-1.0)) == pytest.approx(-0.5)
    assert math.isnan(reduction_ratio(1.0, 0.5, 0.0))
    with pytest.raises(ShapeError):
        quadratic_model_change(g, delta[:-1], C @ delta)
    with pytest.raises(DTypeDeviceError):
        quadratic_model_change(g, delta.float(), C @ delta)
