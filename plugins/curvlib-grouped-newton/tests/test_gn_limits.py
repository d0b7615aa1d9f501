"""Appendix C: the trivial partition gives Cauchy's steepest-descent step and the discrete
partition Newton's step (without the cubic term, and in the limit λ_int → 0)."""

from __future__ import annotations

import gn_reference as ref
from gn_reference import single_thread  # noqa: F401  (autouse fixture)
import pytest
import torch
from torch import nn

from curvlib.testing import assert_close
from curvlib_grouped_newton import GroupedNewton

F64 = torch.float64
# torch.func.hessian/jacfwd trigger torch-internal jit.script deprecation warnings
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def _one_step(model, loss_fn, X, y, **options):
    """θ after one GroupedNewton step from ``model`` (u = ∇L at step 0), torch order."""
    opt = GroupedNewton(model, loss_fn, lr=1.0, period=1, positive_part=False, **options)
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    opt.step(batch=(X, y))
    return ref.flatten(model), opt


def _logistic_regression(seed: int):
    model = ref.mlp((4, 1), seed=seed)  # p = 5, strictly convex in θ
    X, y = ref.data(40, 4, 1, seed=seed + 1, kind="probabilities")
    return model, nn.BCEWithLogitsLoss(), X, y


def test_trivial_partition_is_cauchy_steepest_descent():
    model = ref.mlp((4, 5, 3), seed=11)
    X, y = ref.data(16, 4, 3, seed=12, kind="classes")
    loss_fn = nn.CrossEntropyLoss()
    theta, g, H, _ = ref.dense_derivatives(model, loss_fn, X, y)
    curv = g @ H @ g
    assert curv > 0  # Cauchy's step is defined
    expected = theta - (g @ g) / curv * g
    new, opt = _one_step(model, loss_fn, X, y, groups="trivial", cubic=0.0)
    assert len(opt.partition) == 1
    assert_close(new, expected)


@pytest.mark.parametrize("problem", ["logistic", "tanh_net"])
def test_discrete_partition_is_newton(problem):
    if problem == "logistic":
        model, loss_fn, X, y = _logistic_regression(3)
    else:  # a generic invertible (indefinite) Hessian: the identity Uη = H⁻¹g still holds
        model = ref.mlp((3, 4, 2), seed=4)
        X, y = ref.data(12, 3, 2, seed=5)
        loss_fn = nn.MSELoss()
    theta, g, H, _ = ref.dense_derivatives(model, loss_fn, X, y)
    assert bool((g != 0).all())  # appendix C needs every coordinate of the gradient nonzero
    if problem == "logistic":
        assert float(torch.linalg.eigvalsh(H)[0]) > 0
    expected = theta - torch.linalg.solve(H, g)
    new, opt = _one_step(model, loss_fn, X, y, groups="singletons", cubic=0.0)
    assert len(opt.partition) == theta.numel()
    assert_close(new, expected, rtol=1e-8)  # κ(H)·eps: two different solves of the same system


def test_discrete_partition_tends_to_newton_as_the_cubic_term_vanishes():
    errors = []
    for lam in (1e-2, 1e-3, 1e-4):
        model, loss_fn, X, y = _logistic_regression(7)
        theta, g, H, _ = ref.dense_derivatives(model, loss_fn, X, y)
        newton = theta - torch.linalg.solve(H, g)
        new, opt = _one_step(model, loss_fn, X, y, groups="singletons", cubic=lam)
        assert opt.last_rates.solution.case == "positive_definite"
        errors.append(float((new - newton).norm() / (theta - newton).norm()))
    # the minimizer of m moves by O(λ_int) from Newton's: each decade of λ_int gains one of error
    assert errors[0] > errors[1] > errors[2] > 0
    for a, b in zip(errors, errors[1:]):
        assert 5.0 < a / b < 20.0, errors
