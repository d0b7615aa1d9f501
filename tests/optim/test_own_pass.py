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


def test_the_empirical_fisher_from_the_callers_backward_back_propagates_nothing_of_its_own(monkeypatch):
    """Issue 11, item 3: the empirical Fisher's one column is the caller's own ``loss.backward()``
    (read by hooks at the recorded outputs); the Monte Carlo Fisher still back-propagates its
    sampled targets."""
    import curvlib.curvatures.kinds as kinds

    counts = {}
    real = kinds.backpropagate_columns
    for kind in ("empirical_fisher", "fisher"):
        calls = []
        monkeypatch.setattr(kinds, "backpropagate_columns", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
        model = _model()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning either
            _train(model, _opt(model, kind), 4, own_pass=True)
        counts[kind] = len(calls)
    assert counts == {"empirical_fisher": 0, "fisher": 2}, counts


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")])
def test_the_empirical_fisher_from_the_callers_backward_equals_its_own_column(loss_fn):
    """The kind-level capture: the statistics from the caller's backward equal those of the
    back-propagated column, on a model that calls one layer twice (two uses of one block)."""
    from curvlib.curvatures.kinds import EmpiricalFisherCurvature

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 5)

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.b(torch.tanh(self.a(x)))))))

    torch.manual_seed(0)
    model = Twice().to(DT)
    X = torch.randn(12, 6, dtype=DT)
    y = torch.randint(0, 5, (12,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(12, 5, dtype=DT)
    kind = EmpiricalFisherCurvature()
    with kind.capturing(model, loss_fn, (X, y)) as own_column:
        model(X)
    with kind.capturing_backward(model, loss_fn, (X, y)) as from_backward:
        out = model(X)
    loss_fn(out, y).backward()
    F, G = own_column.operator, from_backward.finish()
    v = torch.randn(F.p, dtype=DT)
    torch.testing.assert_close(G @ v, F @ v, rtol=1e-12, atol=1e-13)
    for i in range(len(F.layers)):
        for u, w in zip(F.statistics(i).uses, G.statistics(i).uses):
            torch.testing.assert_close(w.g, u.g, rtol=1e-12, atol=1e-14)


def test_a_backward_that_cannot_stand_for_the_column_falls_back_to_a_pass_of_its_own():
    """A loss with another term of the output (or no backward before the step): the refresh
    captures the batch itself, with a warning, and the steps equal step(batch=...)'s."""
    from curvlib.errors import PerformanceWarning

    X, y = _data()

    def loss_of(model):
        out = model(X)
        return nn.BCEWithLogitsLoss()(out, y) + 0.1 * out.pow(2).mean()

    runs = []
    for own in (False, True):
        model = _model()
        opt = _opt(model, "empirical_fisher")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                opt.zero_grad()
                if own:
                    with opt.capture((X, y)):
                        loss = loss_of(model)
                else:
                    loss = loss_of(model)
                loss.backward()
                opt.step(batch=(X, y))
        fallbacks = [w for w in caught if issubclass(w.category, PerformanceWarning)]
        assert len(fallbacks) == (2 if own else 0)  # the two refreshes
        runs.append(model)
    for p, q in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)

    model = _model()
    opt = _opt(model, "empirical_fisher")
    with opt.capture((X, y)):
        nn.BCEWithLogitsLoss()(model(X), y)
    with pytest.warns(PerformanceWarning, match="did not run"):
        opt.preconditioner.update()
    assert opt.preconditioner.num_refreshes == 1
