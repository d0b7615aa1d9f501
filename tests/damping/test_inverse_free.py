"""``inverse_free``: Newton–Schulz inverse roots of the π-split's factors, dense and structured,
against dense inverses from torch.linalg, and without any decomposition."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvlib
from curvlib.damping import InverseFreeDamping, damped_inverse
from curvlib.damping.inverse_free import inverse_root
from curvlib.errors import ConfigError, NotPSDError
from curvlib.linalg import KroneckerSum, vec
from curvlib.testing.compare import assert_close

DT = torch.float64


def _spd(d, seed, cond=1e3):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DT))
    e = torch.logspace(0, -math.log10(cond), d, dtype=DT)
    return (Q * e) @ Q.T


def _pi_split(A, G, lam):
    """(2.95)–(2.96) written out."""
    pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
    return A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=DT), G + math.sqrt(lam) / pi * torch.eye(G.shape[0], dtype=DT)


def _block_inverse(M, b):
    out = torch.zeros_like(M)
    for i in range(0, M.shape[0], b):
        out[i:i + b, i:i + b] = torch.linalg.inv(M[i:i + b, i:i + b])
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d_a=st.integers(1, 7), d_g=st.integers(1, 6), lam=st.floats(1e-4, 1.0),
       block_size=st.sampled_from([None, 1, 2, 3]))
def test_inverse_equals_the_dense_structured_pi_split_inverse(seed, d_a, d_g, lam, block_size):
    A, G = _spd(d_a, seed), _spd(d_g, seed + 1)
    Ad, Gd = _pi_split(A, G, lam)
    b = block_size or max(d_a, d_g)
    want = torch.kron(_block_inverse(Ad, b), _block_inverse(Gd, b))
    inv = InverseFreeDamping(value=lam, block_size=block_size, tol=1e-13, max_iters=200).invert(KroneckerSum([(A, G)]))
    assert inv.info.converged
    assert_close(inv.to_dense(), want, rtol=1e-8, atol=1e-9 * float(want.abs().max()))
    X = torch.randn(2, d_g, d_a, generator=torch.Generator().manual_seed(seed), dtype=DT)
    assert_close(vec(inv.solve(X)), (want @ vec(X).T).T, rtol=1e-8, atol=1e-9 * float(want.abs().max()))


def test_dense_limit_is_the_heuristic_damping():
    A, G = _spd(6, 1), _spd(4, 2)
    block = KroneckerSum([(A, G)])
    mine = InverseFreeDamping(value=1e-2, tol=1e-14, max_iters=200).invert(block)
    ref = curvlib.damping.HeuristicDamping(value=1e-2).invert(block)
    assert_close(mine.to_dense(), ref.to_dense(), rtol=1e-9)


def test_no_decomposition_or_inverse_is_called(monkeypatch):
    A, G = _spd(5, 3), _spd(3, 4)

    def forbidden(*args, **kwargs):
        raise AssertionError("a decomposition or inverse was called")

    for name in ("eigh", "eigvalsh", "cholesky", "cholesky_ex", "inv", "inv_ex", "solve", "solve_ex", "svd", "qr", "lu"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    monkeypatch.setattr(torch, "cholesky_solve", forbidden)
    inv = InverseFreeDamping(value=1e-2, block_size=2).invert(KroneckerSum([(A, G)]))
    assert inv.info.method == "newton_schulz" and inv.info.iterations >= 1


def test_quadratic_convergence_and_refusals():
    M = _spd(8, 5, cond=1e4)
    _, steps_loose, _ = inverse_root(M, tol=1e-4)
    _, steps_tight, res = inverse_root(M, tol=1e-12)
    assert res <= 1e-12 and steps_tight - steps_loose <= 3  # quadratic: a few steps for 8 more digits
    with pytest.raises(NotPSDError):
        inverse_root(-M)
    bad = KroneckerSum([(torch.diag(torch.tensor([10.0, -1.0, 10.0], dtype=DT)), torch.eye(2, dtype=DT))])
    with pytest.raises(NotPSDError, match="did not converge"):  # positive trace, a negative eigenvalue
        InverseFreeDamping(value=1e-4).invert(bad)
    two = KroneckerSum([(torch.eye(3, dtype=DT), torch.eye(2, dtype=DT))] * 2)
    with pytest.raises(ConfigError, match="one Kronecker term"):
        damped_inverse(two, InverseFreeDamping(value=0.1))


def test_trains_through_natural_gradient_with_diagonal_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    X, y = torch.randn(64, 6, dtype=DT), torch.randint(0, 3, (64,))
    loss_fn = nn.CrossEntropyLoss()
    opt = curvlib.NaturalGradient(model, loss_fn, {"damping": {"kind": "inverse_free", "value": 1e-2, "block_size": 1}},
                                  lr=0.3, kl_clip=1e-2, generator=torch.Generator().manual_seed(1))
    first = None
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        first = float(loss.detach()) if first is None else first
        opt.step(batch=(X, y))
    assert float(loss_fn(model(X), y).detach()) < 0.9 * first
    with pytest.raises(ConfigError, match="incompatible kinds"):
        curvlib.build_preconditioner(model, loss_fn, {"approximator": "exact_block",
                                                      "damping": {"kind": "inverse_free", "value": 1e-2}})
