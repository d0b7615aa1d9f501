"""A torch.compile'd or DataParallel-wrapped model trains exactly like the plain one: curvlib
captures on the wrapped module, which shares the parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib.capture.layout import unwrap_model
from curvlib.optim import NaturalGradient

DT = torch.float64


def _run(wrap):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    net = wrap(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = NaturalGradient(net, loss_fn, {"curvature": {"kind": "ggn"}}, lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(net(X), y).backward()
        opt.step(batch=(X, y))
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("wrap", [lambda m: torch.compile(m, backend="eager"), nn.DataParallel,
                                  lambda m: nn.DataParallel(torch.compile(m, backend="eager"))],
                         ids=["compile", "data_parallel", "nested"])
def test_a_wrapped_model_takes_the_same_steps(wrap):
    plain, _ = _run(lambda m: m)
    wrapped, opt = _run(wrap)
    for a, b in zip(plain, wrapped):
        assert torch.equal(a, b)
    assert opt.preconditioner.model is unwrap_model(opt.preconditioner.model)
    assert [L.name for L in opt.preconditioner.layers] == ["0", "2"]
