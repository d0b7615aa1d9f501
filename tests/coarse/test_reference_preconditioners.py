"""Exact and block-diagonal natural gradient (4.50), (4.52) against dense float64 solves."""

from __future__ import annotations

import pytest
import torch

import coarse_reference as ref
from curvlib.precond.references import BlockNaturalGradient, ExactNaturalGradient, block_natural_gradient, exact_natural_gradient
from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.testing import assert_close

DT = ref.DT


@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher"])
@pytest.mark.parametrize("lam", [1e-3, 0.3])
def test_exact_natural_gradient_is_a_dense_solve(arch, kind, lam):
    F, *_ = ref.make_curvature(arch, kind)
    ng = exact_natural_gradient(F, damping=lam)
    assert isinstance(ng, ExactNaturalGradient) and ng.n == F.num_pairs
    Fb = ref.damped_dense(F, lam)
    U = torch.randn(F.p, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
    expected = torch.linalg.solve(Fb, U)  # (F + λI)⁻¹ U (4.49)
    assert_close(ng @ U, expected)
    assert_close(ng @ U[:, 0], expected[:, 0])
    assert_close(ng.matmat(U), expected)
    out = ng @ F.vector_to_params(U[:, 1])
    assert_close(F.params_to_vector(out), expected[:, 1])


@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_block_natural_gradient_is_a_dense_per_layer_solve(arch, kind):
    lam = 0.02
    F, *_ = ref.make_curvature(arch, kind)
    bng = block_natural_gradient(F, damping=lam)
    assert isinstance(bng, BlockNaturalGradient)
    assert list(bng.slices) == [L.slice for L in F.layers]
    Fb = ref.damped_dense(F, lam)
    U = torch.randn(F.p, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    expected = torch.cat([torch.linalg.solve(Fb[L.slice, L.slice], U[L.slice]) for L in F.layers])  # (4.52)
    assert_close(bng @ U, expected)
    assert_close(bng @ U[:, 0], expected[:, 0])


def test_natural_gradient_errors():
    from curvlib.curvatures.api import curvature

    model, loss, X, y = ref.make_problem("mlp")
    H = curvature("hessian", model, loss, (X, y))
    with pytest.raises(ConfigError, match="Jacobian"):
        exact_natural_gradient(H, 1e-3)
    with pytest.raises(ConfigError, match="Jacobian"):
        block_natural_gradient(H, 1e-3)
    F, *_ = ref.make_curvature("mlp", "ggn")
    for lam in (0, -1.0, float("inf"), None):
        with pytest.raises(ConfigError, match="damping"):
            exact_natural_gradient(F, lam)
    ng = exact_natural_gradient(F, 0.1)
    with pytest.raises(ShapeError):
        ng @ torch.zeros(F.p + 2, dtype=DT)
    with pytest.raises(DTypeDeviceError):
        ng @ torch.zeros(F.p, dtype=torch.float32)
