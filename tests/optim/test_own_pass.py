"""Statistics from the caller's own pass (NaturalGradient.capture): the same steps as
step(batch=...), one forward pass fewer per refresh."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlib.errors import ConfigError
from curvlib.optim import NaturalGradient

DT = torch.float64


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 6)).to(DT)


def _data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 6, generator=g, dtype=DT)
    return X, (X > 0).to(DT)


def _opt(model, kind, T1=2, **kw):
    cfg = {"curvature": {"kind": kind}, "update_every": T1, "invert_every": 2 * T1, **kw}
    return NaturalGradient(model, nn.BCEWithLogitsLoss(), cfg, lr=0.1, momentum=0.5,
                           generator=torch.Generator().manual_seed(3))


def _captured_backward(model, opt, X, y):
    """The documented training loop up to opt.step(): the curvature from this forward pass."""
    opt.zero_grad()
    with opt.capture((X, y)):
        loss = nn.BCEWithLogitsLoss()(model(X), y)
    loss.backward()


def _train(model, opt, steps, own_pass):
    X, y = _data()
    for _ in range(steps):
        if own_pass:
            _captured_backward(model, opt, X, y)
            opt.step()
        else:
            opt.zero_grad()
            nn.BCEWithLogitsLoss()(model(X), y).backward()
            opt.step(batch=(X, y))


@pytest.mark.parametrize("kind", ["fisher", "empirical_fisher", "ggn"])
def test_the_own_pass_gives_the_same_steps_as_step_batch(kind):
    runs = []
    for own in (False, True):
        model = _model()
        opt = _opt(model, kind)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _train(model, opt, 7, own)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    assert o1.preconditioner.num_refreshes == o2.preconditioner.num_refreshes == 4
    assert torch.equal(o1.preconditioner.generator.get_state(), o2.preconditioner.generator.get_state())


def test_the_own_pass_saves_the_second_forward_and_hooks_only_at_refresh_steps():
    model = _model()
    opt = _opt(model, "fisher")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(model, opt, 4, own_pass=True)
    assert len(calls) == 4  # the caller's forwards only (step(batch=...) runs 2 more at the 2 refreshes)
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(model, opt, 4, own_pass=False)
    assert len(calls) == 6


def test_misuse_is_a_clear_error_and_changes_nothing():
    model = _model()
    opt = _opt(model, "fisher")
    X, y = _data()
    loss_fn = nn.BCEWithLogitsLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="not called on the batch"), opt.capture((X, y)):
            pass
        with pytest.raises(ConfigError, match="called twice"), opt.capture((X, y)):
            model(X)
            model(X)
        assert opt.preconditioner.step == 0 and opt.preconditioner.pending_batch(0) is None
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        with pytest.raises(ConfigError, match="needs the batch"):
            opt.step()  # a refresh is due and nothing was captured
        _captured_backward(model, opt, X, y)
        opt.step()
    assert opt.preconditioner.step == 1 and opt.preconditioner.pending_batch(1) is None


def test_a_plugin_kind_or_a_hessian_kind_captures_the_batch_at_the_step():
    """Kinds without the own-pass capture keep the batch; step() captures it as usual."""
    model = _model()
    opt = _opt(model, "fisher")
    pre = opt.preconditioner
    X, y = _data()

    class Other:  # a curvature factory that is not one of curvlib's statistics kinds
        def __init__(self, inner):
            self.inner, self.builds = inner, 0

        def build(self, *a, **k):
            self.builds += 1
            return self.inner.build(*a, **{key: v for key, v in k.items() if key not in ("verify", "gradient")})

    pre._curvature_factory = Other(pre._curvature_factory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _captured_backward(model, opt, X, y)
        opt.step()
    assert pre._curvature_factory.builds == 1 and pre.step == 1


def test_a_skipped_step_drops_its_capture():
    model = _model()
    opt = _opt(model, "fisher")
    X, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _captured_backward(model, opt, X, y)
        model[0].weight.grad[0, 0] = float("nan")
        opt.step()  # skipped
    assert opt.metrics["skipped"] and opt.preconditioner.pending_batch(0) is None
