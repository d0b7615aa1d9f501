"""Curvature operators of real networks against dense float64 references from torch.func.

Every reference is built another way: per-sample gradients by vmap(grad), Jacobians by
vmap(jacrev), output Hessians and the parameter Hessian by torch.func.hessian, arranged in
curvlib's flat order by the mapping written out in ``curvature_reference``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import curvature_reference as ref
from curvlib.curvatures.api import curvature
from curvlib.curvatures.operator import NoStatisticsError
from curvlib.errors import DTypeDeviceError, PerformanceWarning, ShapeError
from curvlib.plugins import load_registry
from curvlib.testing import assert_close

DT = torch.float64


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def dense(op) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PerformanceWarning)
        return op.to_dense()


def build(kind, case, registry, **options):
    model, loss_fn, X, y, link = ref.make_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BatchNorm case warns about its excluded parameters
        op = curvature(kind, model, loss_fn, (X, y), registry=registry, **options)
    return op, model, loss_fn, X, y, link


def num_outputs(model, X) -> int:
    with torch.no_grad():
        return model(X[:1]).numel()


# -- the four kinds ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ref.CASES)
def test_empirical_fisher_equals_mean_of_per_sample_outer_products(case, registry):
    op, model, loss_fn, X, y, _ = build("empirical_fisher", case, registry)
    m = X.shape[0]
    k = ref.k_factor(loss_fn, num_outputs(model, X))
    G = ref.per_sample_grads(model, op, loss_fn, X, y)  # [m, p]
    expected = G.T @ G / (m * k)
    assert op.scale == 1.0 / m and op.num_columns == 1
    assert_close(dense(op), expected)


@pytest.mark.parametrize("case", ref.CASES)
def test_fisher_equals_outer_products_at_the_sampled_targets(case, registry):
    S = 2
    g = torch.Generator().manual_seed(123)
    model, loss_fn, X, y, _ = ref.make_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        op = curvature("fisher", model, loss_fn, (X, y), mc_samples=S, generator=g, registry=registry)
    m = X.shape[0]
    k = ref.k_factor(loss_fn, num_outputs(model, X))
    Yhat = op.sampled_targets
    assert Yhat.shape[:2] == (m, S)
    expected = 0
    for s in range(S):
        G = ref.per_sample_grads(model, op, loss_fn, X, Yhat[:, s])
        expected = expected + G.T @ G
    expected = expected / (m * S * k)
    assert op.scale == 1.0 / (m * S) and op.num_columns == S
    assert_close(dense(op), expected)


def test_fisher_is_reproducible_from_the_generator_seed(registry):
    model, loss_fn, X, y, _ = ref.make_case("mlp-ce-mean")
    ops = [
        curvature("fisher", model, loss_fn, (X, y), mc_samples=3, generator=torch.Generator().manual_seed(7), registry=registry)
        for _ in range(2)
    ]
    assert torch.equal(ops[0].sampled_targets, ops[1].sampled_targets)
    v = torch.randn(ops[0].p, dtype=DT)
    assert torch.equal(ops[0] @ v, ops[1] @ v)
    # the draws are categorical samples from softmax(f), taken with this generator
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        p = torch.softmax(model(X), dim=1)
    assert torch.equal(ops[0].sampled_targets, torch.multinomial(p, 3, replacement=True, generator=g))
    other = curvature("fisher", model, loss_fn, (X, y), mc_samples=3, generator=torch.Generator().manual_seed(8), registry=registry)
    assert not torch.equal(other.sampled_targets, ops[0].sampled_targets)


@pytest.mark.parametrize("case", ref.CASES)
def test_ggn_equals_JT_H_J(case, registry):
    op, model, loss_fn, X, y, link = build("ggn", case, registry)
    m = X.shape[0]
    if link is None:
        J = ref.per_sample_jacobians(model, op, X)  # [m, c, p]
        with torch.no_grad():
            out = model(X)
        H = ref.per_sample_output_hessians(loss_fn, out, y)
    else:  # BCELoss on sigmoid outputs: the GGN w.r.t. the logits z (model without its Sigmoid)
        logits_model = model[:-1]
        J = ref.per_sample_jacobians(logits_model, op, X)
        with torch.no_grad():
            z = logits_model(X)
        H = ref.per_sample_output_hessians(loss_fn, z, y, link=link)
    expected = torch.einsum("bcp,bcd,bdq->pq", J, H, J) / m
    assert op.scale == 1.0 / m
    assert_close(dense(op), expected)


@pytest.mark.parametrize("case", ["mlp-ce-mean", "cnn-ce-mean", "mlp-ce-sum"])
def test_ggn_is_the_exact_expectation_of_the_mc_fisher_for_cross_entropy(case, registry):
    """E_{ŷ ~ softmax(f)}[fisher] by enumerating every class, weighted by its probability."""
    op, model, loss_fn, X, y, _ = build("ggn", case, registry)
    m = X.shape[0]
    with torch.no_grad():
        P = torch.softmax(model(X), dim=1)  # [m, C]
    expected = 0
    for j in range(P.shape[1]):
        G = ref.per_sample_grads(model, op, loss_fn, X, torch.full((m,), j))
        expected = expected + (G * P[:, j : j + 1]).T @ G
    assert_close(dense(op), expected / m)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["mlp-ce-mean", "mlp-mse-mean", "mlp-bcelogits-mean", "mlp-bce-sum"])
def test_mc_fisher_converges_to_ggn(case, registry):
    S = 20000
    model, loss_fn, X, y, _ = ref.make_case(case, m=3)
    ggn = dense(curvature("ggn", model, loss_fn, (X, y), registry=registry))
    fisher = dense(curvature("fisher", model, loss_fn, (X, y), mc_samples=S, generator=torch.Generator().manual_seed(0), registry=registry))
    rel = (torch.linalg.matrix_norm(fisher - ggn) / torch.linalg.matrix_norm(ggn)).item()
    # the relative Frobenius error of an S-sample average shrinks like 1/√S (≈ 0.007 here)
    assert rel < 5 / S**0.5, rel


@pytest.mark.parametrize("case", ["mlp-ce-mean", "mlp-mse-sum", "mlp-bce-mean", "cnn-ce-mean", "convae-bcelogits-sum", "bn-ce-mean", "skip-mse-sum"])
def test_hessian_products_equal_torch_func_hessian(case, registry):
    op, model, loss_fn, X, y, _ = build("hessian", case, registry)
    expected = ref.dense_hessian(model, op, loss_fn, X, y)
    assert_close(dense(op), expected)
    v = torch.randn(op.p, 2, dtype=DT)
    assert_close(op @ v, expected @ v)
    assert_close(op.block(0, len(op.layers) - 1).to_dense(), expected[op.layers[0].slice, op.layers[-1].slice])
    with pytest.raises(NoStatisticsError, match="no per-layer statistics"):
        op.statistics(0)
    with pytest.raises(NoStatisticsError):
        op.JtJ()


# -- operator interface ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["mlp-mse-mean", "cnn-ce-mean", "convae-mse-mean", "skip-mse-sum"])
def test_blocks_products_and_exports(case, registry):
    op, model, loss_fn, X, y, _ = build("ggn", case, registry)
    D = dense(op)
    gen = torch.Generator().manual_seed(1)
    n_layers = len(op.layers)
    for i in range(n_layers):
        for j in range(n_layers):
            B = op.block(i, j)
            si, sj = op.layers[i].slice, op.layers[j].slice
            assert B.shape == (op.layers[i].p_i, op.layers[j].p_i)
            assert_close(B.to_dense(), D[si, sj])
            vj = torch.randn(B.shape[1], generator=gen, dtype=DT)
            assert_close(B.matvec(vj), D[si, sj] @ vj)
            assert_close(B @ vj[:, None], (D[si, sj] @ vj)[:, None])
    v = torch.randn(op.p, generator=gen, dtype=DT)
    V = torch.randn(op.p, 3, generator=gen, dtype=DT)
    assert_close(op @ v, D @ v)
    assert_close(op @ V, D @ V)
    assert_close(op.matmat(V), D @ V)
    A = op.to_scipy()
    assert A.shape == (op.p, op.p) and A.dtype == np.float64
    assert_close(torch.from_numpy(A.matvec(v.numpy())), op @ v)
    assert_close(torch.from_numpy(A.matmat(V.numpy())), op @ V)
    assert_close(torch.from_numpy(A @ v.numpy()), op @ v)
    # list input shaped like the parameters -> list output shaped like them
    vs = op.vector_to_params(v)
    assert [t.shape for t in vs] == [p.shape for p in op.params()]
    out = op @ vs
    assert isinstance(out, list) and [t.shape for t in out] == [p.shape for p in op.params()]
    assert_close(op.params_to_vector(out), op @ v)
    assert_close(op.params_to_vector(vs), v)
    with pytest.warns(PerformanceWarning, match=rf"{op.p} × {op.p}"):
        op.to_dense()


@pytest.mark.parametrize("case", ["mlp-ce-mean", "cnn-ce-mean", "convae-mse-mean"])
@pytest.mark.parametrize("kind", ["fisher", "ggn"])
def test_jacobian_pieces_match_the_dense_jacobian(case, kind, registry):
    op, model, loss_fn, X, y, _ = build(kind, case, registry, **({"mc_samples": 2} if kind == "fisher" else {}))
    m, c = X.shape[0], op.num_columns
    # reference J [p, n]: column (b, j) = per-sample gradient of the j-th back-propagated column
    if kind == "fisher":
        k = ref.k_factor(loss_fn, num_outputs(model, X))
        cols = [ref.per_sample_grads(model, op, loss_fn, X, op.sampled_targets[:, s]) / k**0.5 for s in range(c)]
        Jref = torch.stack(cols, dim=1).reshape(m * c, -1).T
    else:  # back-propagated columns √H: recover J from C = scale·J Jᵀ is not unique, so use Jᵀ-products instead
        Jref = None
    n = op.num_pairs
    assert n == m * c
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(op.p, 2, generator=gen, dtype=DT)
    w = torch.randn(n, 2, generator=gen, dtype=DT)
    Jd = op.J(torch.eye(n, dtype=DT))  # [p, n]
    if Jref is not None:
        assert_close(Jd, Jref)
    assert_close(op.scale * Jd @ Jd.T, dense(op))
    assert_close(op.J(w), Jd @ w)
    assert_close(op.Jt(u), Jd.T @ u)
    assert_close(op.J(w[:, 0]), Jd @ w[:, 0])
    assert_close(op.Jt(u[:, 0]), Jd.T @ u[:, 0])
    assert_close(op.JtJ(), Jd.T @ Jd)
    for i, L in enumerate(op.layers):
        Ji = Jd[L.slice]
        assert_close(op.J_i(i, w), Ji @ w)
        assert_close(op.Jt_i(i, u[L.slice]), Ji.T @ u[L.slice])
        assert_close(op.JtJ_i(i), Ji.T @ Ji)


@pytest.mark.parametrize("case", ["mlp-ce-mean", "cnn-ce-mean", "convae-mse-mean"])
def test_statistics_define_the_diagonal_blocks(case, registry):
    op, *_ = build("fisher", case, registry, mc_samples=2)
    for i, L in enumerate(op.layers):
        st = op.statistics(i)
        assert (st.a_dim, st.g_dim, st.m, st.c) == (L.a_dim, L.g_dim, op.num_samples, 2)
        assert st.has_bias == L.has_bias
        g, a = st.g, st.a  # [m, c, T, d_g], [m, T, d_a] (T = 1 without positions)
        DW = torch.einsum("bctg,bta->bcag", g, a).reshape(st.m * st.c, -1)  # vec(DW̄) rows
        assert_close(op.block(i, i).to_dense(), st.scale * DW.T @ DW)


@pytest.mark.parametrize("case", ["mlp-ce-sum", "cnn-ce-mean", "bn-ce-mean"])
def test_gradient_vector_is_the_loss_gradient(case, registry):
    op, model, loss_fn, X, y, _ = build("ggn", case, registry)
    model.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    params = dict(model.named_parameters())
    expected = ref.flatten(op, {n: params[n].grad.unsqueeze(0) for n in ref.trainable_names(op)})[0]
    assert_close(op.gradient_vector(), expected)
    assert_close(op.loss, loss.detach())


def test_products_check_dtype_device_and_shape(registry):
    op, *_ = build("ggn", "mlp-ce-mean", registry)
    with pytest.raises(DTypeDeviceError, match="float64"):
        op @ torch.zeros(op.p, dtype=torch.float32)
    with pytest.raises(ShapeError, match=rf"\[{op.p}\] or \[{op.p}, k\]"):
        op @ torch.zeros(op.p + 1, dtype=DT)
    with pytest.raises(ShapeError, match="shaped like the parameters"):
        op @ [torch.zeros(2, dtype=DT)]
    with pytest.raises(IndexError):
        op.block(0, len(op.layers))


def test_float32_model_keeps_its_dtype(registry):
    model, loss_fn, X, y, _ = ref.make_case("cnn-ce-mean")
    model = model.float()
    op = curvature("fisher", model, loss_fn, (X.float(), y), generator=torch.Generator().manual_seed(0), registry=registry)
    assert op.dtype == torch.float32 and op.device == X.device
    assert all(op.statistics(i).a.dtype == torch.float32 for i in range(len(op.layers)))
    v = torch.randn(op.p)
    assert (op @ v).dtype == torch.float32
    # the float32 ggn agrees with the float64 one to float32 accuracy
    ggn32 = curvature("ggn", model, loss_fn, (X.float(), y), registry=registry)
    ggn64 = curvature("ggn", model.double(), loss_fn, (X, y), registry=registry)
    assert_close(ggn32 @ v, (ggn64 @ v.double()).float(), dtype=torch.float32)
