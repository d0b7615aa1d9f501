"""torch flat order <-> curvlib order, and the weight / bias view, against dense float64
references computed in torch's layout by torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlib
from curvlib.curvatures.factors import kfac_factors
from curvlib.curvatures.interop import (
    in_torch_order,
    separate_weight_and_bias,
    torch_order,
    weight_bias_blocks,
    weight_bias_slices,
)
from curvlib.errors import ConfigError, ShapeError
from curvlib.linalg import DenseOperator
from curvlib.testing import assert_close
from curvlib.testing.models import tiny_mixed_model
from curvlib.testing.references import dense_ggn_params


@pytest.fixture(scope="module")
def mixed():
    case = tiny_mixed_model()
    F = curvlib.curvature("ggn", case.model, case.loss_fn, (case.X, case.y))
    return case, F


def test_the_curvature_in_torch_order_is_the_dense_ggn_of_torch_layout(mixed):
    case, F = mixed
    params = F.params()  # embedding weight tied with the head: once
    expected = dense_ggn_params(case.model, params, case.loss_fn, case.X, case.y)
    assert_close(in_torch_order(F).to_dense(), expected)


def test_torch_order_is_a_permutation_matching_flatten(mixed):
    case, F = mixed
    P = torch_order(F)
    x = torch.randn(F.p, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    flat = torch.cat([t.flatten() for t in F.vector_to_params(x)])
    assert torch.equal(P @ x, flat)
    assert torch.equal(P.T @ flat, x)
    assert_close(P.to_dense() @ P.to_dense().T, torch.eye(F.p, dtype=torch.float64))


def test_a_user_parameter_order(mixed):
    case, F = mixed
    params = list(reversed(F.params()))
    expected = dense_ggn_params(case.model, params, case.loss_fn, case.X, case.y)
    assert_close(in_torch_order(F, params).to_dense(), expected)
    with pytest.raises(ConfigError, match="does not cover"):
        torch_order(F, params[:-1] + [torch.zeros(1)])
    with pytest.raises(ConfigError, match="expected the operator's"):
        torch_order(F, params[:-1])
    with pytest.raises(ConfigError, match="not an operator over a model's parameters"):
        torch_order(DenseOperator(torch.eye(3)))


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    return model, nn.CrossEntropyLoss(), X, y


def test_weight_and_bias_blocks_are_the_dense_parameter_blocks():
    model, loss_fn, X, y = _mlp()
    F = curvlib.curvature("ggn", model, loss_fn, (X, y))
    L = F.layers[0]
    lin = model[0]
    blocks = weight_bias_blocks(F, L)
    # torch order for (weight, bias) alone; vec(W) in curvlib is column-major = W.T flattened
    dense_w = dense_ggn_params(model, [lin.weight], loss_fn, X, y)
    dense_b = dense_ggn_params(model, [lin.bias], loss_fn, X, y)
    perm = torch.arange(lin.weight.numel()).reshape(lin.weight.shape).T.reshape(-1)  # column-major order
    assert_close(blocks["weight"].to_dense(), dense_w[perm][:, perm])
    assert_close(blocks["bias"].to_dense(), dense_b)
    assert weight_bias_slices(L) == (slice(0, 12), slice(12, 16))


def test_separate_kfac_factors_are_the_blocks_of_a_kronecker_product():
    model, loss_fn, X, y = _mlp()
    F = curvlib.curvature("ggn", model, loss_fn, (X, y))
    L = F.layers[1]
    (A, G), = kfac_factors(F.statistics(1), "expand")
    parts = separate_weight_and_bias(L, A, G)
    K = torch.kron(A, G)  # (A ⊗ G) in the column-major vec of W̄ = [W, b]
    ws, bs = weight_bias_slices(L)
    assert_close(torch.kron(*parts["weight"]), K[ws, ws])
    assert_close(torch.kron(*parts["bias"]), K[bs, bs])
    with pytest.raises(ShapeError, match="expected A"):
        separate_weight_and_bias(L, A[:-1, :-1], G)


def test_a_layer_without_bias_has_no_split():
    model = nn.Sequential(nn.Linear(3, 2, bias=False)).double()
    F = curvlib.curvature("ggn", model, nn.MSELoss(), (torch.randn(4, 3, dtype=torch.float64),
                                                        torch.randn(4, 2, dtype=torch.float64)))
    with pytest.raises(ShapeError, match="no bias column"):
        weight_bias_slices(F.layers[0])


def test_total_is_the_curvature_of_the_summed_loss():
    model, _, X, y = _mlp()
    mean = curvlib.curvature("ggn", model, nn.CrossEntropyLoss(), (X, y))
    dense_sum = dense_ggn_params(model, mean.params(), nn.CrossEntropyLoss(reduction="sum"), X, y) * X.shape[0]
    P = torch_order(mean)
    assert_close((P @ mean.total() @ P.T).to_dense(), dense_sum)


def test_a_compiled_model_is_captured_through_the_module_it_wraps():
    model, loss_fn, X, y = _mlp()
    plain = curvlib.curvature("ggn", model, loss_fn, (X, y))
    compiled = curvlib.curvature("ggn", torch.compile(model, backend="eager"), loss_fn, (X, y))
    assert [L.name for L in compiled.layers] == [L.name for L in plain.layers]
    assert_close(compiled.to_dense(), plain.to_dense())
