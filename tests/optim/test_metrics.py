"""NaturalGradient's per-step metrics and callback: each value checked against what the
schedule, the damping and an independent eigendecomposition of the damped factors say."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from curvlib.errors import ConfigError, NumericalWarning
from curvlib.optim import NaturalGradient

DT = torch.float64
LAM = 1e-2


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X = torch.randn(16, 4, dtype=DT)
    y = torch.randint(0, 3, (16,))
    return model, nn.CrossEntropyLoss(), X, y


def _train(opt, model, loss_fn, X, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step(batch=(X, y))


def test_metrics_follow_the_schedule_and_the_damping():
    model, loss_fn, X, y = _problem()
    seen = []
    cfg = {"curvature": {"kind": "ggn"}, "damping": {"kind": "heuristic", "value": LAM}, "update_every": 1,
           "invert_every": 2}
    opt = NaturalGradient(model, loss_fn, cfg, lr=0.1, kl_clip=1e-3, callback=seen.append,
                          generator=torch.Generator().manual_seed(0))
    assert opt.metrics == {}
    _train(opt, model, loss_fn, X, y, 4)
    assert [m["step"] for m in seen] == [0, 1, 2, 3]
    assert [m["refreshed"] for m in seen] == [True] * 4
    assert [m["inverted"] for m in seen] == [True, False, True, False]
    assert all(m["damping"] == LAM and not m["skipped"] for m in seen)
    assert all(isinstance(m["kl_scale"], torch.Tensor) and 0 < float(m["kl_scale"]) <= 1 for m in seen)
    assert all(m["refresh_seconds"] > 0 for m in seen)
    assert [m["invert_seconds"] > 0 for m in seen] == [True, False, True, False]
    assert "condition_numbers" in seen[2] and "condition_numbers" not in seen[3]
    assert seen[-1]["counts"] == {"skipped_steps": 0, "refreshes": 4, "inversions": 2, "kept_previous": 0,
                                  "fallbacks": 0}
    assert opt.metrics is seen[-1]


def test_condition_numbers_are_those_of_the_pi_split_factors():
    """The π-split inverts its damped factors by Cholesky: κ₁ = ‖M‖₁‖M⁻¹‖₁ of each, which is
    never below the eigenvalue ratio and at most d times it."""
    model, loss_fn, X, y = _problem(1)
    cfg = {"curvature": {"kind": "ggn"}, "damping": {"kind": "heuristic", "value": LAM}}
    opt = NaturalGradient(model, loss_fn, cfg, lr=0.1)
    _train(opt, model, loss_fn, X, y, 1)
    pre = opt.preconditioner
    conds = opt.metrics["condition_numbers"]
    assert set(conds) == {L.name for L in pre.layers}
    for i, L in enumerate(pre.layers):
        (A, G), = pre.approximation[i].terms
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))  # (2.96)
        Ad = A + pi * math.sqrt(LAM) * torch.eye(A.shape[0], dtype=DT)
        Gd = G + math.sqrt(LAM) / pi * torch.eye(G.shape[0], dtype=DT)
        for kappa, M in zip(conds[L.name], (Ad, Gd)):
            assert kappa == pytest.approx(float(torch.linalg.cond(M, p=1)), rel=1e-9)
            e = torch.linalg.eigvalsh(M)
            ratio = float(e.max() / e.min())
            assert ratio * (1 - 1e-9) <= kappa <= M.shape[0] * ratio


def test_a_skipped_step_is_reported_and_counted():
    model, loss_fn, X, y = _problem()
    opt = NaturalGradient(model, loss_fn, {"curvature": {"kind": "ggn"}}, lr=0.1)
    _train(opt, model, loss_fn, X, y, 1)
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        opt.step(batch=(X, y))
    assert opt.metrics["skipped"] and opt.metrics["step"] == 1
    assert opt.metrics["counts"]["skipped_steps"] == 1


def test_an_adaptive_damping_reports_its_reduction_ratio():
    model, loss_fn, X, y = _problem()
    cfg = {"curvature": {"kind": "ggn"}, "damping": {"kind": "levenberg_marquardt", "value": 1.0}}
    opt = NaturalGradient(model, loss_fn, cfg, lr=0.5)
    _train(opt, model, loss_fn, X, y, 2)
    assert opt.metrics["reduction_ratio"] == opt.last_reduction_ratio
    assert math.isfinite(opt.metrics["reduction_ratio"])
    assert opt.metrics["damping"] == opt.preconditioner.damping.value


def test_callback_must_be_callable():
    model, loss_fn, _, _ = _problem()
    with pytest.raises(ConfigError, match="callback"):
        NaturalGradient(model, loss_fn, None, lr=0.1, callback=3)
