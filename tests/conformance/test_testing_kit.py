"""The pieces of curvlib.testing themselves: references, strategies, comparison reports."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from torch import nn
from torch.func import functional_call

from curvlib.curvatures.statistics import LayerStatistics
from curvlib.testing import assert_close, assert_psd, assert_symmetric
from curvlib.testing import references as ref
from curvlib.testing.strategies import (
    build_conv_autoencoder,
    build_mlp,
    kronecker_factors,
    layer_statistics,
    networks,
    seeds,
)

F64 = torch.float64
few = settings(max_examples=5)


@few
@given(factors=kronecker_factors(max_dim=3, spd=False), factors2=kronecker_factors(max_dim=3, spd=False))
def test_rearrange_dense_maps_kronecker_products_to_outer_products(factors, factors2):
    """Z(R ⊗ S) = vec(R) vec(S)ᵀ (Thm 3.14), and Z is linear."""
    R, S = factors
    d_a, d_b = R.shape[0], S.shape[0]
    assert_close(ref.rearrange_dense(torch.kron(R, S), d_a, d_b), torch.outer(ref.vec(R), ref.vec(S)))
    R2, S2 = factors2
    if (R2.shape[0], S2.shape[0]) == (d_a, d_b):
        M = torch.kron(R, S) + 2 * torch.kron(R2, S2)
        expected = torch.outer(ref.vec(R), ref.vec(S)) + 2 * torch.outer(ref.vec(R2), ref.vec(S2))
        assert_close(ref.rearrange_dense(M, d_a, d_b), expected)


@few
@given(stats=layer_statistics(max_m=3, max_c=2, max_dim=3))
def test_dense_block_is_the_sum_of_kronecker_products_of_per_position_vectors(stats):
    """dense_block against a loop over (b, c) of per-pair gradients D_bc = Σ_u P_u(Σ_t g āᵀ),
    formed as matrices with torch.outer and vectorized column-major (the definition (3.28))."""
    p = stats.a_dim * stats.g_dim
    F = torch.zeros(p, p, dtype=F64)
    for b in range(stats.m):
        for c in range(stats.c):
            D = torch.zeros(stats.g_dim, stats.a_dim, dtype=F64)
            for u in stats.uses:
                a = u.a.dense()
                for t in range(u.T):
                    M = torch.outer(u.g[b, c, t], a[b, t])
                    D += M.T if u.transposed else M
            x = D.T.reshape(-1)  # vec stacks columns
            F += torch.outer(x, x)
    assert_close(ref.dense_block(stats), stats.scale * F)
    terms = ref.dense_kfac_factors(stats)
    if stats.m == stats.c == 1 and len(stats.uses) == 1 and stats.uses[0].T == 1:  # one pair: KFAC is exact
        (A, G), = terms
        assert_close(torch.kron(A, G), ref.dense_block(stats))


def test_band_mask_is_on_the_two_dimensional_grid():
    """‖t − t'‖∞ ≤ r on (row, column), not on the flattened index (DESIGN.md §10)."""
    mask = ref.position_pairs((2, 3), 1)
    assert mask[2, 3] == 0  # (0, 2) and (1, 0): adjacent flat indices, two columns apart
    assert mask[0, 3] == 1  # (0, 0) and (1, 0): vertical neighbours, three flat indices apart
    assert torch.equal(ref.position_pairs((2, 3), None), torch.ones(6, 6, dtype=F64))
    cube = ref.position_pairs((2, 2, 3), 1)  # 3-D: (0, 0, 0) and (1, 1, 1) are ∞-norm neighbours
    assert cube[0, 1 * 6 + 1 * 3 + 1] == 1 and cube[0, 2] == 0
    assert torch.equal(ref.position_pairs((), 0), torch.ones(1, 1, dtype=F64))


@few
@given(case=networks(("mlp", "cnn", "conv_autoencoder"), max_m=3))
def test_per_sample_gradients_match_a_loop_of_autograd(case):
    """references.per_sample_grads (vmap of grad) against one autograd call per sample."""

    class _Op:  # the flat layout, written out: every Linear/Conv module, vec(W̄) one after the other
        def __init__(self, model):
            self.layers, start = [], 0
            for name, mod in model.named_modules():
                if isinstance(mod, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                    g_dim, n_in = ref.weight_to_matrix(mod, mod.weight.detach().unsqueeze(0)).shape[1:]
                    has_bias = mod.bias is not None
                    a_dim = n_in + int(has_bias)
                    self.layers.append(SimpleNamespace(name=name, module=mod, has_bias=has_bias, a_dim=a_dim,
                                                       g_dim=g_dim, slice=slice(start, start + a_dim * g_dim)))
                    start += a_dim * g_dim

    op = _Op(case.model)
    G = ref.per_sample_grads(case.model, op, case.loss_fn, case.X, case.y)
    params = dict(case.model.named_parameters())
    names = ref.trainable_names(op)
    for b in range(case.X.shape[0]):
        out = functional_call(case.model, params, (case.X[b : b + 1],))
        loss = case.loss_fn(out, case.y[b : b + 1])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        expected = ref.flatten(op, {n: gr.unsqueeze(0) for n, gr in zip(names, grads)})[0]
        assert_close(G[b], expected)
    gsum = ref.loss_gradient(case.model, op, case.loss_fn, case.X, case.y)
    loss = case.loss_fn(case.model(case.X), case.y)
    expected = ref.flatten(op, {n: gr.unsqueeze(0) for n, gr in zip(names, torch.autograd.grad(loss, [params[n] for n in names]))})[0]
    assert_close(gsum, expected)


def test_weight_matrix_mapping_round_trips():
    for mod in (nn.Linear(3, 2), nn.Conv2d(2, 3, (2, 3)), nn.ConvTranspose2d(2, 3, (3, 2))):
        W = ref.weight_to_matrix(mod, mod.weight.detach().unsqueeze(0))[0]
        assert torch.equal(ref.matrix_to_weight(mod, W), mod.weight.detach())
    ct = nn.ConvTranspose2d(2, 3, 1)  # [c_in, c_out, 1, 1]: W is weightᵀ
    assert torch.equal(ref.weight_to_matrix(ct, ct.weight.detach().unsqueeze(0))[0], ct.weight.detach()[:, :, 0, 0].T)


@few
@given(stats=layer_statistics(), seed=seeds)
def test_layer_statistics_follow_the_contract(stats, seed):
    assert isinstance(stats, LayerStatistics)
    assert stats.dtype == F64
    for u in stats.uses:
        a = u.a.dense()
        assert a.dtype == u.g.dtype == F64 and a.ndim == 3 and u.g.ndim == 4
        assert a.shape[1] == u.g.shape[2] == u.geometry.T
        if u.geometry.kind == "grid":
            assert u.geometry.kernel is not None
        if stats.has_bias and not u.transposed:
            assert bool((a[..., -1] == 1).all())
        if stats.has_bias and u.transposed:
            assert bool((u.g[..., -1] == 0).all())
    assert stats.scale == pytest.approx(1 / (stats.m * stats.c))


def test_network_builders_are_seeded_and_run():
    a, b = build_mlp([3, 4, 2], seed=5), build_mlp([3, 4, 2], seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(build_mlp([3, 4, 2], seed=6)[0].weight, a[0].weight)
    ae = build_conv_autoencoder(2, 6)
    assert ae(torch.rand(2, 1, 6, 6, dtype=F64)).shape == (2, 36)
    with pytest.raises(ValueError, match="two widths"):
        build_mlp([3])


def test_comparison_reports_say_what_was_expected():
    M = torch.tensor([[1.0, 2.0], [2.1, 1.0]], dtype=F64)
    with pytest.raises(AssertionError, match=r"expected a symmetric matrix.*max \|M − Mᵀ\| = 1\.000e-01"):
        assert_symmetric(M, msg="block")
    assert_symmetric(M, rtol=0.1)
    N = torch.tensor([[1.0, 0.0], [0.0, -0.5]], dtype=F64)
    with pytest.raises(AssertionError, match=r"positive semi-definite.*smallest eigenvalue -5\.0+e-01"):
        assert_psd(N)
    assert_psd(torch.eye(3, dtype=F64))
    with pytest.raises(AssertionError, match="max abs error"):
        assert_close(torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64), msg="x")


def test_conformance_mixins_are_importable_from_curvlib_testing():
    import curvlib.testing as kit
    from curvlib.testing import conformance

    for name in ("ApproximatorConformance", "DampingConformance", "CoarseSpaceConformance",
                 "CurvatureConformance", "LayerAdapterConformance"):
        assert getattr(kit, name) is getattr(conformance, name)
    with pytest.raises(AttributeError):
        kit.NoSuchThing  # noqa: B018

