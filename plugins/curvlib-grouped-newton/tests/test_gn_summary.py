"""ḡ, H̄ = UᵀHU and D̄ (seed 004 §4.1, §4.2, appendix A) against dense torch.func references."""

from __future__ import annotations

import warnings

import gn_reference as ref
from gn_reference import single_thread  # noqa: F401  (autouse fixture)
import pytest
import torch
from torch import nn

import curvlib
import curvlib_grouped_newton.plugin as gn_plugin
from curvlib.coarse import CoarseContext, Partition, exact_coarse_operator, two_level
from curvlib.errors import ConfigError
from curvlib.plugins import load_registry
from curvlib.testing import assert_close
from curvlib_grouped_newton import grouped_summary

F64 = torch.float64
# torch.func.hessian/jacfwd trigger torch-internal jit.script deprecation warnings
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def registry():
    """curvlib's built-ins plus this plugin, registered as its entry point would (installed or not)."""
    reg = load_registry(external=False)
    reg.register(gn_plugin, name="grouped_newton", distribution="curvlib-grouped-newton")
    return reg


def _problem(loss: str, seed: int = 0):
    if loss == "mse":
        model = ref.mlp((3, 4, 2), seed=seed)
        X, y = ref.data(12, 3, 2, seed=seed + 100)
        return model, nn.MSELoss(), X, y
    if loss == "bce":
        model = ref.mlp((3, 4, 3), seed=seed)
        X, y = ref.data(12, 3, 3, seed=seed + 100, kind="probabilities")
        return model, nn.BCEWithLogitsLoss(), X, y
    model = ref.mlp((4, 5, 3), seed=seed)
    X, y = ref.data(10, 4, 3, seed=seed + 100, kind="classes")
    return model, nn.CrossEntropyLoss(), X, y


@pytest.mark.parametrize("loss", ["mse", "bce", "ce"])
def test_summary_matches_dense_tensor_partition(loss):
    model, loss_fn, X, y = _problem(loss)
    _, g, H, T = ref.dense_derivatives(model, loss_fn, X, y, third=True)
    s = grouped_summary(model, loss_fn, (X, y))
    # the canonical partition: one group per tensor, labelled by the parameter's name
    names = [n for n, _ in model.named_parameters()]
    assert sorted(s.partition.names) == sorted(names)
    U = ref.direction_matrix(g, ref.group_slices(model, [[n] for n in s.partition.names]))  # u = ∇L
    assert_close(s.g_bar, U.T @ g, msg="ḡ = Uᵀ∇L")
    assert_close(s.H_bar, U.T @ H @ U, msg="H̄ = UᵀHU")
    D_ref = torch.stack([ref.third_along(T, U[:, k]) for k in range(U.shape[1])])
    assert_close(s.D_bar, D_ref, msg="D̄_s = ∇³L[u_s, u_s, u_s]")
    assert_close(s.loss, loss_fn(model(X), y).detach())


def test_third_order_vanishes_on_quadratic_groups():
    # MSE is quadratic in the last layer: ∇³L[u, u, u] = 0 along its weight and its bias
    model, loss_fn, X, y = _problem("mse")
    s = grouped_summary(model, loss_fn, (X, y))
    last = [k for k, n in enumerate(s.partition.names) if n.startswith("2.")]
    assert last and all(float(s.D_bar[k]) == 0.0 for k in last)
    assert all(float(s.D_bar[k]) != 0.0 for k in range(len(s.partition.names)) if k not in last)


def test_summary_with_user_groups_and_direction():
    model, loss_fn, X, y = _problem("bce", seed=3)
    _, _, H, T = ref.dense_derivatives(model, loss_fn, X, y, third=True)
    gen = torch.Generator().manual_seed(7)
    named = list(model.named_parameters())
    u_list = [torch.randn(p.shape, generator=gen, dtype=F64) for _, p in named]
    u = torch.cat([t.reshape(-1) for t in u_list])  # torch order
    g_ref = ref.dense_derivatives(model, loss_fn, X, y)[1]
    p0w, p0b, p2w, p2b = (p for _, p in named)
    # non-contiguous groups: the two weights together, the two biases together (appendix G style)
    s = grouped_summary(model, loss_fn, (X, y), direction=u_list, groups=[[p0w, p2w], [p0b, p2b]])
    U = ref.direction_matrix(u, ref.group_slices(model, [["0.weight", "2.weight"], ["0.bias", "2.bias"]]))
    assert s.partition.names == ["0.weight+2.weight", "0.bias+2.bias"]
    assert_close(s.g_bar, U.T @ g_ref)
    assert_close(s.H_bar, U.T @ H @ U)
    assert_close(s.D_bar, torch.stack([ref.third_along(T, U[:, k]) for k in range(2)]))


def test_summary_of_a_sum_reduced_loss():
    model, _, X, y = _problem("mse", seed=5)
    loss_fn = nn.MSELoss(reduction="sum")
    _, g, H, _ = ref.dense_derivatives(model, loss_fn, X, y)
    s = grouped_summary(model, loss_fn, (X, y), third_order=False)
    U = ref.direction_matrix(g, ref.group_slices(model, [[n] for n in s.partition.names]))
    assert s.D_bar is None
    assert_close(s.H_bar, U.T @ H @ U, msg="H̄ of the summed loss")


def test_summary_hessian_is_the_coarse_operator_with_zero_first_level(registry):
    """Seed 004 §4: H̄ = R₀HR₀ᵀ, the coarse operator of the `hessian` curvature on the
    `grouped_direction` basis, with no first level and no damping."""
    model, loss_fn, X, y = _problem("ce", seed=1)
    _, g, H, _ = ref.dense_derivatives(model, loss_fn, X, y)
    F = curvlib.curvature("hessian", model, loss_fn, (X, y), registry=registry)
    part = Partition.parameter_tensors(F)
    space = registry.coarse_spaces.create("grouped_direction")
    basis = space.basis(CoarseContext(F, 0.0, None, part, u=F.gradient_vector()))
    Hc = exact_coarse_operator(F, basis, 0.0)
    U = ref.direction_matrix(g, ref.group_slices(model, [[n] for n in part.names]))
    assert_close(Hc, U.T @ H @ U, msg="R₀HR₀ᵀ vs dense UᵀHU")
    s = grouped_summary(model, loss_fn, (X, y), curvature=F)
    assert_close(s.H_bar, Hc, msg="fused appendix-A recursion vs curvlib's coarse operator")


def test_two_level_with_zero_first_level_is_the_damped_grouped_newton_step(registry):
    # curvlib.two_level(None, H, "grouped_direction", λ) g = U (UᵀHU + λUᵀU)⁻¹ Uᵀ g
    model, loss_fn, X, y = _problem("bce", seed=2)
    _, g, H, _ = ref.dense_derivatives(model, loss_fn, X, y)
    F = curvlib.curvature("hessian", model, loss_fn, (X, y), registry=registry)
    part = Partition.parameter_tensors(F)
    lam = 1e-2
    pre = two_level(None, F, "grouped_direction", damping=lam, registry=registry, partition=part)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a well-posed coarse problem: no truncation warning
        step = pre @ F.vector_to_params(F.gradient_vector())
    step_torch = torch.cat([t.reshape(-1) for t in step])  # back to torch order
    U = ref.direction_matrix(g, ref.group_slices(model, [[n] for n in part.names]))
    expected = U @ torch.linalg.solve(U.T @ H @ U + lam * U.T @ U, U.T @ g)
    assert_close(step_torch, expected)


def test_excluded_parameters_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    X, y = ref.data(8, 3, 2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="1.weight"):
            grouped_summary(model, nn.MSELoss(), (X, y))
