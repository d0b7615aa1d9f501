"""Learning rates from a summary: inactive groups, groups without third-order information."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curvlib.errors import ConfigError, NumericalWarning
from curvlib.testing import assert_close
from curvlib_grouped_newton import solve_summary
from gn_reference import single_thread  # noqa: F401  (autouse fixture)

F64 = torch.float64


def _t(*rows):
    return torch.tensor(rows, dtype=F64)


def test_inactive_groups_get_zero_and_leave_the_solve():
    H = _t([2.0, 0.0, 0.5], [0.0, 0.0, 0.0], [0.5, 0.0, 1.0])  # group 1: u_1 = 0, a zero row and column
    g = _t(1.0, 0.0, -1.0)
    active = torch.tensor([True, False, True])
    rates = solve_summary(g, H, None, active, 0.0)
    expected = np.linalg.solve(np.array([[2.0, 0.5], [0.5, 1.0]]), np.array([1.0, -1.0]))
    assert_close(rates.eta, torch.tensor([expected[0], 0.0, expected[1]], dtype=F64))


def test_zero_direction_gives_zero_rates():
    rates = solve_summary(torch.zeros(2, dtype=F64), torch.zeros(2, 2, dtype=F64), torch.zeros(2, dtype=F64),
                          torch.tensor([False, False]), 1.0)
    assert bool((rates.eta == 0).all()) and rates.solution.case == "zero"


def test_unbounded_model_falls_back_to_the_largest_scale():
    # D̄ = (8, 0): d = (2, 0); H̄_KK = −1 < 0, so the exact reduction is unbounded below
    H, g, D = _t([1.0, 0.3], [0.3, -1.0]), _t(0.5, 0.2), _t(8.0, 0.0)
    with pytest.warns(NumericalWarning, match="unbounded below.*scale d = 1·max d"):
        rates = solve_summary(g, H, D, torch.tensor([True, True]), 2.0)
    assert rates.fallback and torch.equal(rates.scales, _t(2.0, 2.0))
    # the Nesterov–Polyak conditions with d = (2, 2), c = λ/2 = 1
    d, eta = rates.scales, rates.eta
    M = H + float(torch.linalg.vector_norm(d * eta)) * torch.diag(d * d)
    assert_close(M @ eta, g)
    assert float(torch.linalg.eigvalsh(M)[0]) >= -1e-12


def test_no_third_order_information_at_all_uses_the_newton_system():
    H, g = _t([1.0, 0.3], [0.3, -1.0]), _t(0.5, 0.2)
    with pytest.warns(NumericalWarning, match="unregularized step"):
        rates = solve_summary(g, H, torch.zeros(2, dtype=F64), torch.tensor([True, True]), 2.0)
    assert_close(rates.eta, torch.from_numpy(np.linalg.solve(H.numpy(), g.numpy())))


def test_cubic_term_needs_the_third_order_diagonal():
    with pytest.raises(ConfigError, match="D̄"):
        solve_summary(_t(1.0), _t([1.0]), None, torch.tensor([True]), 1.0)
