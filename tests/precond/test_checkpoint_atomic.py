"""Checkpoint loading is validated and atomic: a state that does not fit raises a ConfigError
and leaves the optimizer and its preconditioner exactly as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvlib.errors import ConfigError
from curvlib.optim import NaturalGradient

DT = torch.float64


def _trained(hidden=6, momentum=0.9, steps=2, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(DT)
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    opt = NaturalGradient(model, loss_fn, {"curvature": {"kind": "ggn"}}, lr=0.1, momentum=momentum,
                          generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step(batch=(X, y))
    return opt, model, X


def _fingerprint(opt, X):
    pre = opt.preconditioner
    g = [torch.ones_like(p) for p in pre.params()]
    return (pre.step, pre.num_refreshes, pre.generator.get_state().clone(), [d.clone() for d in pre.apply(g)],
            copy.deepcopy({k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}))


def _same(a, b):
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]))
    assert a[4].keys() == b[4].keys()
    for k in a[4]:
        assert all(torch.equal(a[4][k][n], b[4][k][n]) for n in a[4][k])


def test_a_state_of_other_layer_shapes_is_refused_and_nothing_changes():
    opt, _, X = _trained(hidden=6)
    other, _, _ = _trained(hidden=5)
    before = _fingerprint(opt, X)
    with pytest.raises(ConfigError, match=r"buffer 'momentum_buffer' of parameter 0 is \[5, 4\]"):
        opt.load_state_dict(other.state_dict())
    _same(before, _fingerprint(opt, X))
    state = other.state_dict()
    state["state"] = {}
    with pytest.raises(ConfigError, match=r"factors of layer '0' are \(d_a, d_g\) = \(5, 5\)"):
        opt.load_state_dict(state)
    _same(before, _fingerprint(opt, X))


@pytest.mark.parametrize("corrupt, match", [
    (lambda s: s.__setitem__("step", -5), "expected a step ≥ 0"),
    (lambda s: s.__setitem__("generator", torch.zeros(3, dtype=torch.uint8)), "generator state"),
    (lambda s: s["damping"].__setitem__("value", 123.0), "cannot load the state"),
])
def test_corrupt_preconditioner_states_are_refused_and_nothing_changes(corrupt, match):
    opt, _, X = _trained()
    state = opt.state_dict()
    corrupt(state["preconditioner"])
    before = _fingerprint(opt, X)
    with pytest.raises(ConfigError, match=match):
        opt.load_state_dict(state)
    _same(before, _fingerprint(opt, X))


def test_a_good_state_still_round_trips():
    opt, _, X = _trained()
    again, _, _ = _trained(steps=1, seed=3)
    again.load_state_dict(opt.state_dict())
    _same(_fingerprint(opt, X), _fingerprint(again, X))


def test_a_one_level_state_into_a_two_level_preconditioner_is_refused():
    one, _, X = _trained()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    two = NaturalGradient(model, nn.CrossEntropyLoss(),
                          {"curvature": {"kind": "ggn"}, "coarse_space": {"kind": "nicolaides"}}, lr=0.1)
    with pytest.raises(ConfigError, match="coarse space needs the captured curvature"):
        two.load_state_dict(one.state_dict())
    assert not two.preconditioner.is_ready


def test_a_curvature_gradient_of_the_wrong_shape_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    config = {"curvature": "ggn", "damping": {"kind": "levenberg_marquardt", "value": 1e-2}, "coarse_space": "residual"}
    opt = NaturalGradient(model, loss_fn, config, lr=0.1, generator=torch.Generator().manual_seed(1))
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    opt.step(batch=(X, y))
    state = opt.state_dict()
    before = _fingerprint(opt, X)
    state["preconditioner"]["curvature"]["gradient"][0] = state["preconditioner"]["curvature"]["gradient"][0][:, :2]
    with pytest.raises(ConfigError, match=r"curvature gradient of layer '0' is \[6, 2\]; expected \[d_g, d_a\] = \[6, 5\]"):
        opt.load_state_dict(state)
    _same(before, _fingerprint(opt, X))
