"""``GroupedNewton``: the schedule of appendix F, the update θ ← θ − λ_d Σ_s (η_s)₊ u_s,
errors, checkpoints, and that it trains."""

from __future__ import annotations

import copy
import warnings

import gn_reference as ref
from gn_reference import single_thread  # noqa: F401  (autouse fixture)
import pytest
import torch
from torch import nn

from curvlib.errors import ConfigError, NumericalWarning
from curvlib.testing import assert_close
from curvlib_grouped_newton import GroupedNewton, GroupedNewtonOptions

F64 = torch.float64


def _setup(seed: int = 41):
    model = ref.mlp((3, 6, 2), seed=seed)
    batches = [ref.data(24, 3, 2, seed=seed * 100 + k, kind="probabilities") for k in range(12)]
    return model, nn.BCEWithLogitsLoss(), batches


def _step(model, loss_fn, opt, X, y):
    opt.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step(batch=(X, y))
    return float(loss.detach()), grads


def test_options_are_validated():
    model, loss_fn, _ = _setup()
    with pytest.raises(ConfigError, match="lr"):
        GroupedNewton(model, loss_fn, lr=0.0)
    with pytest.raises(ConfigError, match="period"):
        GroupedNewton(model, loss_fn, period=0)
    with pytest.raises(ConfigError, match="damping"):
        GroupedNewton(model, loss_fn, damping=1.0)
    opt = GroupedNewton(model, loss_fn, period=4)
    assert opt.options.gradient_momentum == pytest.approx(0.75)  # μ = 1 − 1/T
    assert GroupedNewtonOptions(period=4, momentum=0.2).gradient_momentum == 0.2


def test_schedule_of_appendix_f():
    """u = EMA_μ of the gradients; η computed every T steps on the given batch and averaged
    with ν; θ ← θ − λ_d (η_s)₊ u_s on each group."""
    model, loss_fn, batches = _setup()
    T, mu, nu, lr = 3, 0.6, 0.25, 0.3
    opt = GroupedNewton(model, loss_fn, lr=lr, cubic=2.0, period=T, momentum=mu, lr_momentum=nu)
    u = None
    eta = None
    summaries = []
    for k, (X, y) in enumerate(batches[:7]):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        _, grads = _step(model, loss_fn, opt, X, y)
        u = [g.clone() for g in grads] if u is None else [mu * a + (1 - mu) * g for a, g in zip(u, grads)]
        for a, p in zip(u, model.parameters()):
            assert_close(opt.state[p]["direction"], a, msg=f"gradient momentum at step {k}")
        if k % T == 0:
            fresh = opt.last_rates.eta
            eta = fresh.clone() if eta is None else nu * eta + (1 - nu) * fresh
            summaries.append(opt.last_summary)
        assert_close(opt.learning_rates, eta, msg=f"learning-rate momentum at step {k}")
        # the update, group by group (one group per tensor, named like the parameter)
        rates = dict(zip(opt.group_names, eta.clamp_min(0).tolist()))
        for (name, p), a in zip(model.named_parameters(), u):
            assert_close(p.detach(), before[name] - lr * rates[name] * a, msg=f"update of {name} at step {k}")
    assert len({id(s) for s in summaries}) == 3  # steps 0, 3, 6


def test_positive_part_can_be_switched_off():
    model, loss_fn, batches = _setup(43)
    opt = GroupedNewton(model, loss_fn, cubic=0.5, positive_part=False, period=1)
    X, y = batches[0]
    before = [p.detach().clone() for p in model.parameters()]
    _, grads = _step(model, loss_fn, opt, X, y)
    rates = dict(zip(opt.group_names, opt.learning_rates.tolist()))
    for (name, p), b, g in zip(model.named_parameters(), before, grads):
        assert_close(p.detach(), b - rates[name] * g)


def test_batch_is_required_when_the_rates_are_due():
    model, loss_fn, batches = _setup()
    opt = GroupedNewton(model, loss_fn, period=2)
    X, y = batches[0]
    loss_fn(model(X), y).backward()
    with pytest.raises(ConfigError, match="batch"):
        opt.step()
    opt.step(batch=(X, y))
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    opt.step()  # step 1: not due
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    with pytest.raises(ConfigError, match="step 2"):
        opt.step()


def test_uncovered_parameters_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2)).to(F64)
    X, y = ref.data(8, 3, 2, seed=0)
    opt = GroupedNewton(model, nn.MSELoss())
    nn.MSELoss()(model(X), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="1.weight"):
            opt.step(batch=(X, y))


def test_non_finite_gradients_skip_the_step():
    model, loss_fn, batches = _setup()
    opt = GroupedNewton(model, loss_fn)
    X, y = batches[0]
    loss_fn(model(X), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    before = ref.flatten(model)
    with pytest.warns(NumericalWarning, match="non-finite gradients"):
        opt.step(batch=(X, y))
    assert torch.equal(ref.flatten(model), before) and opt.steps == 0


def test_state_dict_round_trip_continues_the_same_trajectory():
    model, loss_fn, batches = _setup(44)
    opt = GroupedNewton(model, loss_fn, period=3, lr=0.5)
    for X, y in batches[:4]:
        _step(model, loss_fn, opt, X, y)
    twin = copy.deepcopy(model)
    opt2 = GroupedNewton(twin, loss_fn, period=3, lr=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.steps == 4
    for X, y in batches[4:8]:
        _step(model, loss_fn, opt, X, y)
        _step(twin, loss_fn, opt2, X, y)
    assert_close(ref.flatten(twin), ref.flatten(model))


def test_plateau_schedule_reduces_the_damping_factor():
    model, loss_fn, batches = _setup()
    opt = GroupedNewton(model, loss_fn, lr=1e-3, period=1, plateau_every=1, plateau_patience=0, plateau_factor=0.5)
    X, y = batches[0]
    lrs = []
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            return torch.tensor(1.0, dtype=F64)  # a loss that never improves
        opt.step(closure, batch=(X, y))
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [1e-3, 5e-4, 2.5e-4]


def test_it_trains():
    gen = torch.Generator().manual_seed(45)
    teacher = ref.mlp((5, 8, 3), seed=46)
    X = torch.randn(128, 5, generator=gen, dtype=F64)
    with torch.no_grad():
        y = torch.sigmoid(teacher(X))
    model = ref.mlp((5, 8, 3), seed=47)
    loss_fn = nn.BCEWithLogitsLoss()
    opt = GroupedNewton(model, loss_fn, lr=0.5, cubic=1.0, period=5)
    with torch.no_grad():
        gap0 = float(loss_fn(model(X), y) - loss_fn(teacher(X), y))
    for k in range(40):
        idx = torch.randint(0, 128, (32,), generator=gen)
        opt.zero_grad()
        loss_fn(model(X[idx]), y[idx]).backward()
        opt.step(batch=(X, y))  # the larger batch B' of appendix F
    with torch.no_grad():
        gap = float(loss_fn(model(X), y) - loss_fn(teacher(X), y))
    assert gap < 0.2 * gap0, (gap0, gap)
