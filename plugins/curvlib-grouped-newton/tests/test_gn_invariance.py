"""Appendix E: the trajectory is invariant under a per-tensor rescaling of the parameters.

Two float64 networks compute the same function: A with parameters θ = (W1, b1, W2, b2)
and B with φ = (c_W1 W1, c_b1 b1, c_W2 W2, c_b2 b2), built from ``nn.Linear`` layers (so
curvlib adapts them) between fixed scalings.  Both are trained by GroupedNewton from
equivalent points on the same batches; θ_k and φ_k / c must agree at every step.
"""

from __future__ import annotations

import gn_reference as ref
from gn_reference import single_thread  # noqa: F401  (autouse fixture)
import pytest
import torch
from torch import nn

from curvlib.testing import assert_close
from curvlib_grouped_newton import GroupedNewton

F64 = torch.float64


class Scale(nn.Module):
    """x -> a·x with a fixed (non-trainable) a."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=F64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x


def _rescaled(model: nn.Sequential, c: dict[str, float]) -> tuple[nn.Sequential, list[float]]:
    """B: β(φ(αx) + ψ) = Wx + b per layer with φ = c_W W, ψ = c_b b, β = 1/c_b, α = c_b/c_W."""
    lin1, act, lin2 = model[0], model[1], model[2]
    layers, factors = [], []
    for k, lin in ((0, lin1), (2, lin2)):
        cw, cb = c[f"{k}.weight"], c[f"{k}.bias"]
        new = nn.Linear(lin.in_features, lin.out_features).to(F64)
        with torch.no_grad():
            new.weight.copy_(cw * lin.weight)
            new.bias.copy_(cb * lin.bias)
        layers += [Scale(cb / cw), new, Scale(1.0 / cb)]
        factors += [cw] * lin.weight.numel() + [cb] * lin.bias.numel()
        if k == 0:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers), factors


@pytest.mark.parametrize("groups", ["tensors", "weights_and_biases"])
def test_trajectory_is_invariant_under_per_tensor_rescaling(groups):
    A = ref.mlp((3, 5, 3), seed=21)
    theta_0 = ref.flatten(A)
    if groups == "tensors":  # one group per tensor: any nonzero factor per tensor
        c = {"0.weight": 7.0, "0.bias": 0.05, "2.weight": -0.3, "2.bias": 40.0}
    else:  # groups {W1, W2} and {b1, b2}: appendix E's map is one factor per group
        c = {"0.weight": 7.0, "2.weight": 7.0, "0.bias": -0.05, "2.bias": -0.05}
    B, factors = _rescaled(A, c)
    factors = torch.tensor(factors, dtype=F64)
    loss_fn = nn.BCEWithLogitsLoss()  # third derivatives along every tensor are nonzero
    gen = torch.Generator().manual_seed(22)
    batches = [ref.data(16, 3, 3, seed=int(torch.randint(0, 10**6, (1,), generator=gen)), kind="probabilities")
               for _ in range(6)]
    X0, y0 = batches[0]
    assert_close(B(X0), A(X0))

    def group_spec(model, names):
        if groups == "tensors":
            return None
        params = dict(model.named_parameters())
        return [[params[n] for n in grp] for grp in names]

    spec_a = group_spec(A, [["0.weight", "2.weight"], ["0.bias", "2.bias"]])
    spec_b = group_spec(B, [["1.weight", "5.weight"], ["1.bias", "5.bias"]])
    options = dict(lr=0.5, cubic=1.0, period=2, lr_momentum=0.5)
    opt_a = GroupedNewton(A, loss_fn, groups=spec_a, **options)
    opt_b = GroupedNewton(B, loss_fn, groups=spec_b, **options)
    losses = []
    for X, y in batches:
        for model, opt in ((A, opt_a), (B, opt_b)):
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step(batch=(X, y))
        losses.append(float(loss.detach()))
        assert opt_a.last_rates.solution.case == opt_b.last_rates.solution.case
        theta_a = ref.flatten(A)
        assert_close(ref.flatten(B) / factors, theta_a, msg=f"step {opt_a.steps}")
    assert float((theta_a - theta_0).abs().max()) > 1e-2, "the parameters did not move"
    assert all(torch.isfinite(torch.tensor(losses))), losses
