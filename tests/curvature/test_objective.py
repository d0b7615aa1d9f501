"""Objectives that are not likelihoods (:class:`curvlib.Objective`): their empirical Fisher,
GGN and Hessian against dense ``torch.func`` float64 references (per-sample gradients,
Jacobians and output Hessians of the one-sample objective), what is refused, and the two
captures of a WGAN-GP step: the critic's (the gradient penalty excluded from the statistics,
included in the gradient) and the generator's (only its own layers, no targets)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as Fn

import curvlib
from curvlib import NaturalGradient, Objective
from curvlib.curvatures.losses import loss_model_for
from curvlib.errors import ConfigError, UnsupportedLossError
from curvlib.testing import assert_close
from curvlib.testing import references as ref

DT = torch.float64


def _critic(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 7, 7)), nn.Conv2d(1, 2, 3, stride=2), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.Linear(18, 1)).to(DT)


def _generator(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 49)).to(DT)


def _wasserstein(reduction: str = "mean") -> Objective:
    # ℓ_b = 2 s_b D(x_b): with s = +1 for the m/2 fakes and −1 for the m/2 reals, the mean over
    # the m samples is mean D(fake) − mean D(real), the critic's Wasserstein loss
    return Objective(lambda out, s: 2 * s * out.squeeze(1), reduction=reduction, name="wasserstein")


def _batch(m: int = 6, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 49, generator=g, dtype=DT)
    s = torch.tensor([1.0, -1.0], dtype=DT).repeat(m // 2)
    return x, s


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_fisher_is_the_per_sample_terms_gradients_outer_products(reduction):
    D, obj = _critic(), _wasserstein(reduction)
    x, s = _batch()
    F = curvlib.curvature("empirical_fisher", D, obj, batch=(x, s))
    assert_close(F.to_dense(), ref.dense_empirical_fisher(D, F, obj, x, s))


def _convex(out: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # a convex, non-separable ℓ_b of a 3-output network: PSD output Hessian with off-diagonal terms
    return Fn.softplus(s[:, None] * out).sum(1) + 0.3 * out.sum(1) ** 2


def _convex_hessian(out: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(s[:, None] * out)  # softplus'' (s f) · s² = p(1 − p)
    return torch.diag_embed(p * (1 - p)) + 0.6 * torch.ones(out.shape[0], 3, 3, dtype=out.dtype)


def _mlp(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


@pytest.mark.parametrize("closed_form", [False, True], ids=["autograd", "output_hessian"])
def test_ggn_of_a_convex_objective_is_j_h_j(closed_form):
    model = _mlp()
    obj = Objective(_convex, output_hessian=_convex_hessian if closed_form else None)
    g = torch.Generator().manual_seed(4)
    x, s = torch.randn(5, 5, generator=g, dtype=DT), torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=DT)
    G = curvlib.curvature("ggn", model, obj, batch=(x, s))
    assert_close(G.to_dense(), ref.dense_ggn(model, G, obj, x, s))


def test_hessian_of_an_objective_is_the_exact_hessian():
    model, obj = _mlp(), Objective(_convex)
    x, s = torch.randn(4, 5, dtype=DT), torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=DT)
    H = curvlib.curvature("hessian", model, obj, batch=(x, s))
    assert_close(H.to_dense(), ref.dense_hessian(model, H, obj, x, s))


def test_ggn_of_a_linear_objective_is_zero_and_of_an_indefinite_one_is_refused():
    D, x, s = _critic(), *_batch()
    G = curvlib.curvature("ggn", D, _wasserstein(), batch=(x, s))  # ∇²_f (s f) = 0
    assert float(G.to_dense().abs().max()) == 0.0
    saddle = Objective(lambda out, _: out[:, 0] * out[:, 1], name="saddle")  # ∇²_f = [[0, 1], [1, 0]]
    model = nn.Linear(3, 2).to(DT)
    with pytest.raises(UnsupportedLossError, match=r"saddle.*sample 0 has the eigenvalue -1.*empirical_fisher"):
        curvlib.curvature("ggn", model, saddle, batch=(torch.randn(2, 3, dtype=DT), None))


def test_refusals_name_what_is_wrong():
    D, x, s = _critic(), *_batch()
    with pytest.raises(ConfigError, match="fisher.*wasserstein is not one.*empirical_fisher"):
        NaturalGradient(D, _wasserstein(), {"curvature": "fisher"}, lr=0.1)
    with pytest.raises(UnsupportedLossError, match="not the negative log-likelihood"):
        curvlib.curvature("fisher", D, _wasserstein(), batch=(x, s))
    with pytest.raises(UnsupportedLossError, match=r"per-sample terms \[m\].*got \[\]"):
        curvlib.curvature("empirical_fisher", D, Objective(lambda out, s: out.mean(), name="scalar"), batch=(x, s))
    with pytest.raises(ConfigError, match="reduction"):
        Objective(lambda out, s: out, reduction="none")
    with pytest.raises(ConfigError, match="callable"):
        Objective(3)
    with pytest.raises(UnsupportedLossError, match="output_hessian must return"):
        curvlib.curvature("ggn", _mlp(), Objective(_convex, output_hessian=lambda f, s: f), batch=(x[:, :5], s))
    with pytest.raises(UnsupportedLossError, match="curvlib.Objective"):
        loss_model_for(lambda out, y: out)


def test_a_critic_passed_as_per_sample_is_not_registered():
    D = _critic()
    obj = Objective(D)  # e.g. ℓ_b = D(x_b) directly (a module returning [m, 1] is refused at use)
    assert list(obj.parameters()) == [] and "Sequential" in repr(obj)


def _gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    eps = torch.rand(real.shape[0], 1, dtype=real.dtype, generator=torch.Generator().manual_seed(5))
    xi = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(D(xi).sum(), xi, create_graph=True)
    return weight * ((g.norm(dim=1) - 1) ** 2).mean()


def test_critic_step_excludes_the_gradient_penalty_from_the_statistics_and_preconditions_the_full_gradient():
    D, critic = _critic(), _wasserstein()
    x, s = _batch()
    real, fake = x[s < 0], x[s > 0]
    opt = NaturalGradient(D, critic, {"curvature": "empirical_fisher", "damping": {"kind": "tikhonov", "value": 0.1},
                                      "approximator": "kfac"}, lr=0.05)
    before = [p.detach().clone() for p in opt.preconditioner.model.parameters()]
    D_before = copy.deepcopy(D)  # the curvature is the one at the step's parameters
    opt.zero_grad()
    with opt.capture((x, s)):
        out = D(x)  # the critic called once in the block: the statistics' forward
    loss = critic(out, s) + _gradient_penalty(D, real, fake)  # the penalty's own forward, outside the block
    loss.backward()
    grads = [p.grad.clone() for p in D.parameters()]
    opt.step()
    pre = opt.preconditioner
    # the curvature: the per-sample Wasserstein terms only (no penalty)
    assert_close(pre.curvature.to_dense(), ref.dense_empirical_fisher(D_before, pre.curvature, critic, x, s))
    # the step: the preconditioner applied to the full gradient, penalty included
    params = list(D.parameters())
    order = {id(p): i for i, p in enumerate(params)}
    directions = pre.apply([grads[order[id(q)]] for q in pre.params()])
    for q, d in zip(pre.params(), directions):
        i = order[id(q)]
        assert_close(params[i].detach(), before[i] - 0.05 * d)
    # the penalty's forward inside the block is a second call: refused, with the reason
    opt.zero_grad()
    with pytest.raises(ConfigError, match="called twice"):
        with opt.capture((x, s)):
            out = D(x)
            _gradient_penalty(D, real, fake)
        opt.step()


def test_generator_step_captures_only_its_own_layers_without_targets():
    G, D = _generator(), _critic()
    gen_obj = Objective(lambda images, _: -D(images).squeeze(1), name="generator")
    opt = NaturalGradient(G, gen_obj, {"curvature": "empirical_fisher"}, lr=0.05)
    z = torch.randn(4, 4, dtype=DT, generator=torch.Generator().manual_seed(6))
    d_before = [p.detach().clone() for p in D.parameters()]
    G_before = copy.deepcopy(G)
    opt.zero_grad()
    with opt.capture((z, None)):
        images = G(z)
    gen_obj(images).backward()
    opt.step()
    F = opt.preconditioner.curvature
    assert [L.name for L in F.layers] == ["0", "2"]  # G's Linear layers; D's are not hooked
    assert_close(F.to_dense(), ref.dense_empirical_fisher(G_before, F, gen_obj, z, torch.zeros(4, dtype=DT)))
    assert all(torch.equal(p, q) for p, q in zip(D.parameters(), d_before))  # D is not G's optimizer's
