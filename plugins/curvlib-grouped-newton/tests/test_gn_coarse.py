"""The ``grouped_direction`` coarse space: R₀ᵀ = diag(u_1, …, u_S) (seed 004 §4.1)."""

from __future__ import annotations

import warnings

import gn_reference as ref
from gn_reference import single_thread  # noqa: F401  (autouse fixture)
import pytest
import torch
from torch import nn

import curvlib
import curvlib_grouped_newton.plugin as gn_plugin
from curvlib.coarse import CoarseContext, CoarseSpace, Partition, two_level
from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.plugins import load_registry
from curvlib.testing import assert_close
from curvlib_grouped_newton import GroupedDirectionCoarseSpace, GroupedDirectionOptions

F64 = torch.float64


@pytest.fixture(scope="module")
def registry():
    reg = load_registry(external=False)
    reg.register(gn_plugin, name="grouped_newton", distribution="curvlib-grouped-newton")
    return reg


@pytest.fixture(scope="module")
def hessian(registry):
    model = ref.mlp((4, 6, 3), seed=31)
    X, y = ref.data(10, 4, 3, seed=32, kind="classes")
    return model, curvlib.curvature("hessian", model, nn.CrossEntropyLoss(), (X, y), registry=registry)


def test_registered_kind_and_options(registry):
    spec = registry.coarse_spaces.get("grouped_direction")
    assert spec.factory is GroupedDirectionCoarseSpace and spec.options is GroupedDirectionOptions
    assert spec.description
    space = registry.coarse_spaces.create({"kind": "grouped_direction", "direction": "gradient"})
    assert isinstance(space, CoarseSpace) and space.kind == "grouped_direction"
    assert space.options.direction == "gradient" and not space.depends_on_input
    assert registry.coarse_spaces.create("grouped_direction").depends_on_input
    with pytest.raises(ConfigError, match="direction"):
        registry.coarse_spaces.create({"kind": "grouped_direction", "direction": "momentum"})
    with pytest.raises(ConfigError, match="order"):
        registry.coarse_spaces.create({"kind": "grouped_direction", "order": 2})


def test_basis_is_the_direction_split_by_group(hessian):
    model, F = hessian
    gen = torch.Generator().manual_seed(33)
    u_tensors = [torch.randn(p.shape, generator=gen, dtype=F64) for p in F.params()]
    u = F.params_to_vector(u_tensors)
    part = Partition.parameter_tensors(F)
    basis = GroupedDirectionCoarseSpace().basis(CoarseContext(F, 0.0, None, part, u=u))
    S = len(F.params())
    assert basis.N == S and basis.sizes == [1] * S and basis.p == F.p
    eta = torch.randn(S, generator=gen, dtype=F64)
    # R₀ᵀη = Σ_s η_s u_s: tensor s of the prolongation is η_s times tensor s of u
    for s, (got, u_s) in enumerate(zip(F.vector_to_params(basis.prolong(eta)), u_tensors)):
        assert_close(got, eta[s] * u_s)
    # R₀x = (u_sᵀ x_s)_s
    x_tensors = [torch.randn(p.shape, generator=gen, dtype=F64) for p in F.params()]
    expected = torch.stack([(a * b).sum() for a, b in zip(u_tensors, x_tensors)])
    assert_close(basis.restrict(F.params_to_vector(x_tensors)), expected)
    # R₀R₀ᵀ = diag(‖u_s‖²)
    assert_close(basis.gram(), torch.diag(torch.stack([(t * t).sum() for t in u_tensors])))


def test_gradient_direction_uses_the_captured_gradient(hessian):
    model, F = hessian
    part = Partition.layers(F)
    space = GroupedDirectionCoarseSpace(direction="gradient")
    basis = space.basis(CoarseContext(F, 0.0, None, part))
    assert_close(basis.prolong(torch.ones(basis.N, dtype=F64)), F.gradient_vector())
    assert basis.N == len(F.layers)


def test_bad_inputs(hessian):
    model, F = hessian
    part = Partition.parameter_tensors(F)
    space = GroupedDirectionCoarseSpace()
    with pytest.raises(ConfigError, match="needs the vector u"):
        space.basis(CoarseContext(F, 0.0, None, part))
    with pytest.raises(ShapeError, match=f"u \\[{F.p}\\]"):
        space.basis(CoarseContext(F, 0.0, None, part, u=torch.zeros(F.p + 1, dtype=F64)))
    with pytest.raises(DTypeDeviceError):
        space.basis(CoarseContext(F, 0.0, None, part, u=torch.zeros(F.p, dtype=torch.float32)))


def test_zero_group_gives_a_dropped_column(hessian, registry):
    model, F = hessian
    part = Partition.parameter_tensors(F)
    g = F.gradient_vector().clone()
    part.put(g, 1, torch.zeros(part.sizes[1], dtype=F64))  # u vanishes on group 1
    pre = two_level(None, F, "grouped_direction", damping=1e-3, registry=registry, partition=part)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = pre @ g
    assert pre.info.dropped_columns == (1,)
    assert bool(torch.isfinite(z).all()) and float(part.take(z, 1).abs().max()) == 0.0


def test_kfac_two_level_bench_method_runs(registry):
    """The coarse kind makes ``curvlib bench --methods kfac+grouped_direction`` a valid method."""
    from curvlib.bench.methods import resolve_method
    from curvlib.bench.training_step import build_training_step

    method = resolve_method("kfac+grouped_direction", registry)
    assert (method.approximator, method.coarse_space) == ("kfac", "grouped_direction")
    model = ref.mlp((4, 6, 3), seed=34).float()
    X, y = ref.data(32, 4, 3, seed=35, kind="classes")
    hp = method.default_hyperparameters(lr=0.05)
    step = build_training_step(method, model, nn.CrossEntropyLoss(), hp,
                               generator=torch.Generator().manual_seed(0), registry=registry)
    losses = [float(step.step(X.float(), y)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
