"""``singd`` (SINGD's running update of the inverse factors) against its fixed points, written
densely, and the ``inverse_factors`` damping that applies them."""

from __future__ import annotations

import io

import approx_reference as ref
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvlib.approximators import LayerFit
from curvlib.approximators.singd import SINGDApproximator, SINGDBlock, SINGDOptions, singd_step
from curvlib.damping import InverseFactorsDamping, TikhonovDamping
from curvlib.errors import ConfigError, NumericalError, NumericalWarning
from curvlib.curvatures.factors import kfac_factors
from curvlib.linalg import KroneckerSum, vec
from curvlib.optim import NaturalGradient
from curvlib.testing.compare import assert_close
from curvlib.testing.distributed import train_steps

DT = torch.float64


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    X = torch.randn(d, d + 2, generator=gen, dtype=DT)
    return X @ X.T / (d + 2)


def _run(terms, opts: SINGDOptions, steps: int):
    dA, dG = terms[0][0].shape[0], terms[0][1].shape[0]
    K, C = torch.eye(dA, dtype=DT), torch.eye(dG, dtype=DT)
    m_K, m_C = torch.zeros_like(K), torch.zeros_like(C)
    for _ in range(steps):
        K, C, m_K, m_C = singd_step(K, C, m_K, m_C, terms, opts)
    return K, C, m_K, m_C


def _block_part(M: torch.Tensor, b: int | None) -> torch.Tensor:
    """The block-diagonal part, written with explicit blocks (independent of structured_part)."""
    if b is None:
        return M
    out = torch.zeros_like(M)
    for i in range(0, M.shape[0], b):
        out[i : i + b, i : i + b] = M[i : i + b, i : i + b]
    return out


@pytest.mark.parametrize("block_size", [None, 1, 2])
def test_kfac_like_fixed_point_is_the_damped_structured_kfac_inverse(block_size):
    gen = torch.Generator().manual_seed(0)
    A, G = _spd(4, gen), _spd(3, gen)
    lam = 0.1
    opts = SINGDOptions(lr_cov=0.2, alpha1=0.0, damping=lam, kfac_like=True, block_size=block_size)
    K, C, m_K, m_C = _run([(A, G)], opts, 1500)
    assert float(m_K.abs().max()) < 1e-10 and float(m_C.abs().max()) < 1e-10
    assert_close(K @ K.T, torch.linalg.inv(_block_part(A, block_size) + lam * torch.eye(4, dtype=DT)), rtol=1e-8)
    assert_close(C @ C.T, torch.linalg.inv(_block_part(G, block_size) + lam * torch.eye(3, dtype=DT)), rtol=1e-8)
    for M in (K, C):  # a structured K stays in its structure
        assert torch.equal(M, _block_part(M, block_size))


def test_singd_fixed_point_couples_the_sides_by_their_traces():
    gen = torch.Generator().manual_seed(1)
    A, G = _spd(4, gen), _spd(3, gen)
    lam = 0.05
    opts = SINGDOptions(lr_cov=0.1, alpha1=0.5, damping=lam)
    K, C, m_K, m_C = _run([(A, G)], opts, 4000)
    assert float(m_K.abs().max()) < 1e-9 and float(m_C.abs().max()) < 1e-9
    c_C = torch.trace(C.T @ G @ C) / 3  # the average traces of SINGD's update
    c_K = torch.trace(K.T @ A @ K) / 4
    t_C, t_K = torch.trace(C.T @ C) / 3, torch.trace(K.T @ K) / 4
    assert_close(K @ K.T, torch.linalg.inv(c_C * A + lam * t_C * torch.eye(4, dtype=DT)), rtol=1e-7)
    assert_close(C @ C.T, torch.linalg.inv(c_K * G + lam * t_K * torch.eye(3, dtype=DT)), rtol=1e-7)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), alpha1=st.floats(0.0, 0.9), normalize=st.booleans(), kfac_like=st.booleans())
def test_one_step_follows_the_written_update(seed, alpha1, normalize, kfac_like):
    gen = torch.Generator().manual_seed(seed)
    K, C = torch.randn(3, 3, generator=gen, dtype=DT), torch.randn(2, 2, generator=gen, dtype=DT)
    m_K, m_C = torch.randn(3, 3, generator=gen, dtype=DT), torch.randn(2, 2, generator=gen, dtype=DT)
    terms = [(_spd(3, gen), _spd(2, gen)), (_spd(3, gen), _spd(2, gen))]
    opts = SINGDOptions(lr_cov=0.3, alpha1=alpha1, damping=0.2, kfac_like=kfac_like, normalize_lr_cov=normalize)
    got = singd_step(K, C, m_K, m_C, terms, opts)
    # the update, entry by entry from its definition
    HK = [K.T @ A @ K for A, _ in terms]
    HC = [C.T @ G @ C for _, G in terms]
    wK = [1.0 if kfac_like else float(torch.trace(h)) / 2 for h in HC]
    wC = [1.0 if kfac_like else float(torch.trace(h)) / 3 for h in HK]
    tC = 1.0 if kfac_like else float(torch.trace(C.T @ C)) / 2
    tK = 1.0 if kfac_like else float(torch.trace(K.T @ K)) / 3
    s = 0.5 * (1 - alpha1) if normalize else 0.5
    nK = alpha1 * m_K + s * (wK[0] * HK[0] + wK[1] * HK[1] + 0.2 * tC * K.T @ K - torch.eye(3, dtype=DT))
    nC = alpha1 * m_C + s * (wC[0] * HC[0] + wC[1] * HC[1] + 0.2 * tK * C.T @ C - torch.eye(2, dtype=DT))
    bK = 0.3 / max(1.0, float(nK.abs().max())) if normalize else 0.3
    bC = 0.3 / max(1.0, float(nC.abs().max())) if normalize else 0.3
    for g, w in zip(got, (K - bK * K @ nK, C - bC * C @ nC, nK, nC)):
        assert_close(g, w)


def test_inverse_factors_damping_applies_the_inverse_of_the_block():
    gen = torch.Generator().manual_seed(2)
    K, C = torch.randn(4, 4, generator=gen, dtype=DT), torch.randn(3, 3, generator=gen, dtype=DT)
    block = SINGDBlock(K, C, torch.zeros(4, 4, dtype=DT), torch.zeros(3, 3, dtype=DT))
    inv = InverseFactorsDamping({"value": 1.0}).invert(block)
    X = torch.randn(2, 3, 4, generator=gen, dtype=DT)
    D = block.to_dense()
    assert_close(vec(inv.apply(X)), torch.linalg.solve(D, vec(X).T).T, rtol=1e-9)
    assert_close(vec(block.apply(X)), (D @ vec(X).T).T, rtol=1e-9)
    with pytest.raises(ConfigError, match="inverse factors"):  # a KFAC block has none
        InverseFactorsDamping({"value": 1.0}).invert(KroneckerSum([(_spd(4, gen), _spd(3, gen))]))
    with pytest.raises(ConfigError, match="'tikhonov'.*inverse_factors"):  # and tikhonov cannot invert this one
        TikhonovDamping({"value": 1.0}).invert(block)


def test_fits_continue_from_the_previous_and_round_trip_exactly():
    stats = [ref.linear_stats(m=6, d_a=4, d_g=3, c=2, seed=s) for s in range(3)]
    approx = SINGDApproximator({"lr_cov": 0.1})
    fit = approx.fit(stats[0])
    assert isinstance(fit.block, SINGDBlock) and fit.refresh == 1
    buf = io.BytesIO()
    torch.save(fit.state_dict(), buf)
    buf.seek(0)
    back = LayerFit.from_state_dict(torch.load(buf))
    a, b = approx.fit(stats[1], previous=fit), approx.fit(stats[1], previous=back)
    for x, y in zip(a.block.state_dict().values(), b.block.state_dict().values()):
        assert torch.equal(x, y)
    assert a.refresh == 2
    # the second fit is one step from the first's state, not from the identity
    terms = kfac_factors(stats[1])
    want = singd_step(fit.block.K, fit.block.C, fit.block.m_K, fit.block.m_C, terms, approx.options)
    assert_close(a.block.K, want[0])


def test_trains_with_natural_gradient_and_refuses_other_dampings():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    X, y = torch.randn(128, 6, dtype=DT), torch.randint(0, 3, (128,))
    loss_fn = nn.CrossEntropyLoss()
    opt = NaturalGradient(net, loss_fn, {"approximator": {"kind": "singd", "lr_cov": 0.1},
                                         "damping": "inverse_factors"}, lr=0.1)
    losses = train_steps(opt, net, loss_fn, [(X, y)] * 20)
    assert losses[-1] < 0.95 * losses[0]
    with pytest.raises(ConfigError, match="singd"):
        NaturalGradient(net, loss_fn, {"approximator": "singd"}, lr=0.1)  # the default π-split needs factors


def test_a_training_step_decomposes_and_inverts_nothing(monkeypatch):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    X, y = torch.randn(32, 5, dtype=DT), torch.randint(0, 2, (32,))
    loss_fn = nn.CrossEntropyLoss()
    opt = NaturalGradient(net, loss_fn, {"approximator": {"kind": "singd", "block_size": 2}, "damping": "inverse_factors"},
                          lr=0.1)

    def forbidden(*args, **kwargs):
        raise AssertionError("a decomposition or inverse was called")

    for name in ("eigh", "eigvalsh", "cholesky", "cholesky_ex", "inv", "inv_ex", "solve", "solve_ex", "svd", "qr", "lu"):
        monkeypatch.setattr(torch.linalg, name, forbidden)
    monkeypatch.setattr(torch, "cholesky_solve", forbidden)
    monkeypatch.setattr(torch, "cholesky_inverse", forbidden)
    before = [q.detach().clone() for q in net.parameters()]
    train_steps(opt, net, loss_fn, [(X, y)] * 3)
    assert all(not torch.equal(b, q) for b, q in zip(before, net.parameters()))


def test_a_step_that_overflows_keeps_the_previous_fit_or_raises_without_one():
    stats = ref.linear_stats(m=6, d_a=4, d_g=3, seed=4)
    wild = SINGDApproximator({"lr_cov": 1e150, "alpha1": 0.0})
    first = wild.fit(stats)  # K ~ 1e150: finite, and the next step overflows
    assert all(bool(torch.isfinite(t).all()) for t in first.block.state_dict().values())
    with pytest.warns(NumericalWarning, match="non-finite factors"):
        kept = wild.fit(stats, previous=first)
    assert kept is first
    with pytest.raises(NumericalError, match="non-finite factors"):
        wild.fit(ref.linear_stats(m=6, d_a=4, d_g=3, scale=1e300, seed=5))
