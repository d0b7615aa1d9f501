"""``kfac``: the factors (3.19) and KFC (3.29)–(3.30) against loops over samples and positions,
with activations taken from an independent route (Jacobians of the module's output)."""

from __future__ import annotations

import approx_reference as ref
import pytest
import torch
import torch.nn.functional as Fn
from torch import nn
from torch.func import jacrev

from curvlib.approximators import KFACApproximator, approximate
from curvlib.curvatures.api import curvature
from curvlib.testing.compare import assert_close

DT = torch.float64


def _mlp_fisher(m=6, mc=3, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    X = torch.randn(m, 4, dtype=DT)
    y = torch.randint(0, 3, (m,))
    gen = torch.Generator().manual_seed(seed)
    return curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=gen, mc_samples=mc)


def test_linear_factors_equal_loops():
    F = _mlp_fisher()
    approx = approximate(F, "kfac")
    for i in range(len(F.layers)):
        s = F.statistics(i)
        m, c = s.g.shape[:2]
        A = torch.zeros(s.a_dim, s.a_dim, dtype=DT)
        G = torch.zeros(s.g_dim, s.g_dim, dtype=DT)
        for b in range(m):
            A += torch.outer(s.a[b, 0], s.a[b, 0]) / m
            for j in range(c):
                G += s.scale * torch.outer(s.g[b, j, 0], s.g[b, j, 0])
        (A_fit, G_fit), = approx[i].terms
        assert_close(A_fit, A, msg=f"layer {i} A")
        assert_close(G_fit, G, msg=f"layer {i} G")
        assert s.scale == pytest.approx(1.0 / (m * c))


def test_exact_for_one_sample_one_column():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4)).to(DT)
    X = torch.randn(1, 3, dtype=DT)
    y = torch.randn(1, 4, dtype=DT)
    F = curvature("empirical_fisher", model, nn.MSELoss(), (X, y))
    approx = approximate(F, "kfac")
    assert_close(ref.kron_sum(approx[0].terms), F.block(0, 0).to_dense())


# --------------------------------------------------------------------------- convolutions


class _Recorder:
    """Forward hooks keeping each module's input."""

    def __init__(self, modules):
        self.inputs = {}
        self.handles = [mod.register_forward_hook(self._hook(mod)) for mod in modules]

    def _hook(self, mod):
        def hook(module, args, output):
            self.inputs[mod] = args[0].detach()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _conv_model():
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 3, 2, padding=1),  # 4x4 -> 5x5
        nn.ReLU(),
        nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1),  # 5x5 -> 10x10
        nn.Flatten(),
        nn.Linear(200, 3),
    ).to(DT)


def _conv_fisher(model, m=3, mc=2):
    X = torch.randn(m, 2, 4, 4, dtype=DT, generator=torch.Generator().manual_seed(4))
    y = torch.randint(0, 3, (m,), generator=torch.Generator().manual_seed(5))
    rec = _Recorder([model[0], model[2]])
    try:
        F = curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=torch.Generator().manual_seed(6), mc_samples=mc)
    finally:
        rec.close()
    return F, rec.inputs


def _activations_by_jacobian(module, x):
    """ā_t of every position for one input x ``[c_in, H, W]``: ∂s_t[0]/∂W[0, :] with the layer
    matrix W ``[c_out, c_in·k·k]`` (DESIGN.md §1 mapping, written out here), plus the bias 1."""
    c_out = module.out_channels
    k = module.kernel_size

    def out(W):
        if isinstance(module, nn.ConvTranspose2d):
            weight = W.reshape(c_out, module.in_channels, *k).transpose(0, 1)  # stored [c_in, c_out, k, k]
            return Fn.conv_transpose2d(
                x[None], weight, None, module.stride, module.padding, module.output_padding, 1, module.dilation
            )[0]
        weight = W.reshape(c_out, module.in_channels, *k)
        return Fn.conv2d(x[None], weight, None, module.stride, module.padding, module.dilation)[0]

    W0 = torch.zeros(c_out, module.in_channels * k[0] * k[1], dtype=DT)
    J = jacrev(out)(W0)  # [c_out, H, W, c_out, in]
    a = J[0, :, :, 0, :].reshape(-1, W0.shape[1])  # positions row-major
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=DT)], dim=1)


@pytest.mark.parametrize("layer", [0, 1], ids=["Conv2d", "ConvTranspose2d"])
def test_kfc_factors_equal_sums_over_positions(layer):
    model = _conv_model()
    F, inputs = _conv_fisher(model)
    module = F.layers[layer].module
    s = F.statistics(layer)
    m, c, T, _ = s.g.shape
    A = torch.zeros(s.a_dim, s.a_dim, dtype=DT)
    G = torch.zeros(s.g_dim, s.g_dim, dtype=DT)
    for b in range(m):
        abar = _activations_by_jacobian(module, inputs[module][b])
        assert abar.shape == (T, s.a_dim)
        for t in range(T):
            A += torch.outer(abar[t], abar[t]) / m  # (3.30a), 1/m for the expectation
            for j in range(c):
                G += (s.scale / T) * torch.outer(s.g[b, j, t], s.g[b, j, t])  # (3.30b)
    (A_fit, G_fit), = approximate(F, "kfac", layers=[layer])[layer].terms
    assert_close(A_fit, A, msg="A (3.30a)")
    assert_close(G_fit, G, msg="G (3.30b)")


def test_conv_transpose_kfac_is_the_equivalent_convolution_of_5_2_3():
    """§5.2.3: KFC of the equivalent stride-1 convolution (Relationship 1: zero-inserted, padded
    input, kernel rotated by π, channels swapped) gives Ā' and G'; ours is A = Π Ā' Πᵀ, G = G'."""
    model = _conv_model()
    F, inputs = _conv_fisher(model)
    mod = model[2]
    x = inputs[mod]
    m = x.shape[0]
    e, tau, k = mod.stride[0], mod.padding[0], mod.kernel_size[0]
    op = mod.output_padding[0]
    z = torch.zeros(m, x.shape[1], (x.shape[2] - 1) * e + 1, (x.shape[3] - 1) * e + 1, dtype=DT)
    z[:, :, ::e, ::e] = x
    pad = k - 1 - tau  # τ' = m − τ − 1
    z = Fn.pad(z, (pad, pad + op, pad, pad + op))
    patches = Fn.unfold(z, k).transpose(1, 2)  # ā'_t without the 1, unfold order (c_in, k_y, k_x)
    # the equivalent convolution really reproduces the layer's output (rotated, channel-swapped kernel)
    w_rot = mod.weight.detach().flip(2, 3).transpose(0, 1)
    assert_close(Fn.conv2d(z, w_rot, mod.bias.detach()), mod(x).detach())
    abar_prime = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=DT)], dim=2)
    A_prime = torch.einsum("bti,btj->ij", abar_prime, abar_prime) / m
    # Π: reverse both kernel axes inside each input channel, bias entry fixed
    c_in = x.shape[1]
    perm = torch.arange(c_in * k * k).reshape(c_in, k, k).flip(1, 2).reshape(-1)
    perm = torch.cat([perm, torch.tensor([c_in * k * k])])
    Pi = torch.eye(perm.numel(), dtype=DT)[perm]
    (A_fit, _), = approximate(F, "kfac", layers=[1])[1].terms
    assert_close(A_fit, Pi @ A_prime @ Pi.T)


def test_ema_follows_rho_over_three_refreshes():
    """ρ = min(1 − 1/k, γ): k = 1 → 0, k = 2 → 1/2, k = 3 → min(2/3, 0.6) = 0.6 (§3.1.2)."""
    gamma = 0.6
    stats = [ref.linear_stats(5, 4, 3, c=2, seed=s) for s in range(3)]
    approximator = KFACApproximator({"ema": gamma})
    fit = None
    A_exp = G_exp = None
    for k, s in enumerate(stats, start=1):
        fit = approximator.fit(s, previous=fit)
        rho = min(1 - 1 / k, gamma)
        A_new = sum(torch.outer(s.a[b, 0], s.a[b, 0]) for b in range(s.m)) / s.m
        G_new = s.scale * sum(torch.outer(s.g[b, j, 0], s.g[b, j, 0]) for b in range(s.m) for j in range(s.c))
        A_exp = A_new if A_exp is None else rho * A_exp + (1 - rho) * A_new
        G_exp = G_new if G_exp is None else rho * G_exp + (1 - rho) * G_new
        assert fit.info.refresh == k and fit.info.rho == pytest.approx(rho)
        (A_fit, G_fit), = fit.terms
        assert_close(A_fit, A_exp, msg=f"A at refresh {k}")
        assert_close(G_fit, G_exp, msg=f"G at refresh {k}")
