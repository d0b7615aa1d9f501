"""curvature(check_samples=False, loss_gradient=False): the same statistics, two backward passes fewer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlib
from curvlib.curvatures.operator import NoStatisticsError
from curvlib.errors import ConfigError


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(10, 5, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), (X, torch.randint(0, 3, (10,)))


def test_skipping_the_checks_keeps_the_statistics_and_saves_two_backward_passes(monkeypatch):
    model, loss_fn, batch = _problem()
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    full = curvlib.curvature("fisher", model, loss_fn, batch, generator=torch.Generator().manual_seed(1))
    n_full, calls[:] = len(calls), []
    lean = curvlib.curvature("fisher", model, loss_fn, batch, generator=torch.Generator().manual_seed(1),
                             check_samples=False, loss_gradient=False)
    assert len(calls) == n_full - 2
    for i in range(len(full.layers)):
        a, b = full.statistics(i), lean.statistics(i)
        for u, v in zip(a.uses, b.uses):
            torch.testing.assert_close(u.g, v.g, rtol=0, atol=0)
    with pytest.raises(NoStatisticsError):
        lean.gradient_vector()
    assert full.gradient_vector().shape == (full.p,)


def test_the_options_are_refused_where_they_do_not_apply():
    model, loss_fn, batch = _problem()
    with pytest.raises(ConfigError, match="own kinds on one batch"):
        curvlib.curvature("ggn", model, loss_fn, data=[batch], check_samples=False)
