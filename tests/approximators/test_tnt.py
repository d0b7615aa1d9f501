"""``tnt`` (C_a ⊗ C_g / tr F) against mode covariances written from the per-sample gradients,
and its relation to KFAC."""

from __future__ import annotations

import approx_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvlib.approximators import approximate, approximation_error, kfac_factors
from curvlib.approximators.tnt import TNTApproximator
from curvlib.curvatures.api import curvature
from curvlib.curvatures.statistics import LayerStatistics, Use
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import as_rows
from curvlib.testing.compare import assert_close

DT = torch.float64


def _dense_tnt(stats):
    """D_n = Σ_t g_{n,t} ā_{b,t}ᵀ by loops; C_a = scale Σ D_nᵀD_n, C_g = scale Σ D_n D_nᵀ; F̂ = C_a⊗C_g / tr F."""
    D = []
    for use in stats.uses:
        a, g = use.a.dense(), use.g
        m, c, T, _ = g.shape
        per = torch.stack([torch.stack([sum(torch.outer(g[b, j, t], a[b, t]) for t in range(T)) for j in range(c)])
                           for b in range(m)]).reshape(m * c, *g.shape[-1:], a.shape[-1])
        D.append(per.transpose(1, 2) if use.transposed else per)
    D = sum(D)
    C_a = stats.scale * sum(Dn.T @ Dn for Dn in D)
    C_g = stats.scale * sum(Dn @ Dn.T for Dn in D)
    t = stats.scale * sum((Dn * Dn).sum() for Dn in D)
    return torch.kron(C_a, C_g) / t, t


def _tied_stats(seed):
    """A weight used once as W (d_g = 3, d_a = 4) and once transposed."""
    gen = torch.Generator().manual_seed(seed)
    u1 = Use(as_rows(torch.randn(5, 1, 4, generator=gen, dtype=DT)), torch.randn(5, 1, 1, 3, generator=gen, dtype=DT),
             Geometry.none())
    u2 = Use(as_rows(torch.randn(5, 1, 3, generator=gen, dtype=DT)), torch.randn(5, 1, 1, 4, generator=gen, dtype=DT),
             Geometry.none(), transposed=True)
    return LayerStatistics(uses=[u1, u2], scale=0.2, has_bias=False)


@pytest.mark.parametrize("make", [
    lambda: ref.linear_stats(m=9, d_a=5, d_g=4, c=2, seed=1),
    lambda: ref.conv_stats(m=3, H=3, W=2, d_a=4, d_g=3, c=2, seed=2),
    lambda: _tied_stats(3),
], ids=["linear", "conv", "tied"])
def test_fit_equals_dense_mode_covariances(make):
    stats = make()
    fit = TNTApproximator().fit(stats)
    want, t = _dense_tnt(stats)
    assert_close(fit.block.to_dense(), want)
    F = ref.dense_block(stats) if len(stats.uses) == 1 else None
    if F is not None:  # the trace is kept
        assert_close(torch.trace(fit.block.to_dense()), torch.trace(F))
        assert_close(t, torch.trace(F))


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 12), d_a=st.integers(1, 6), d_g=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_equals_kfac_when_every_sample_has_the_same_norms(m, d_a, d_g, seed):
    """D_n = g_n ā_nᵀ with ‖ā_n‖ = α, ‖g_n‖ = β for every n: C_a⊗C_g/t = A⊗G (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(m, d_a, generator=gen, dtype=DT)
    g = torch.randn(m, 1, d_g, generator=gen, dtype=DT)
    a = 1.7 * a / a.norm(dim=-1, keepdim=True)
    g = 0.3 * g / g.norm(dim=-1, keepdim=True)
    stats = LayerStatistics(a, g, 1.0 / m, has_bias=False)
    (A, G), = kfac_factors(stats)
    assert_close(TNTApproximator().fit(stats).block.to_dense(), torch.kron(A, G))


def test_differs_from_kfac_in_general_and_keeps_the_trace_on_a_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X, y = torch.randn(8, 1, 4, 4, dtype=DT), torch.randint(0, 3, (8,))
    F = curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=torch.Generator().manual_seed(0), mc_samples=2)
    tnt, kfac = approximate(F, "tnt"), approximate(F, "kfac")
    for i in range(len(F.layers)):
        assert_close(torch.trace(tnt[i].block.to_dense()), torch.trace(F.block(i, i).to_dense()))
        assert not torch.allclose(tnt[i].block.to_dense(), kfac[i].block.to_dense())
    assert all(e.error1 < 1.0 for e in approximation_error(F, tnt))


def test_ema_averages_both_factors():
    s1, s2 = ref.linear_stats(m=6, d_a=4, d_g=3, seed=4), ref.linear_stats(m=6, d_a=4, d_g=3, seed=5)
    approx = TNTApproximator({"ema": 0.9})
    first, second = approx.fit(s1), None
    second = approx.fit(s2, previous=first)
    (A1, G1), = first.terms
    (A2, G2), = TNTApproximator().fit(s2).terms
    (A, G), = second.terms
    assert second.info.rho == pytest.approx(0.5)
    assert_close(A, 0.5 * A1 + 0.5 * A2)
    assert_close(G, 0.5 * G1 + 0.5 * G2)


def test_zero_gradients_give_a_zero_block():
    stats = LayerStatistics(torch.randn(4, 3, dtype=DT), torch.zeros(4, 1, 2, dtype=DT), 0.25)
    assert float(TNTApproximator().fit(stats).block.to_dense().abs().max()) == 0.0
