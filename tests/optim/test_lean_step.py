"""The lean per-step path: layer-by-layer application on the gradients equals the flat
operator product, and a plain step folds the finiteness policy into one check."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlib.errors import NumericalWarning
from curvlib.optim import NaturalGradient
from curvlib.testing import assert_close

DT = torch.float64


class _Net(nn.Module):
    def __init__(self, variant: str = "separate"):
        super().__init__()
        self.variant = variant
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))  # no adapter: updated by the fallback
        if variant == "tied":  # one block holding both uses of a.weight
            self.c = nn.Linear(4, 4, bias=False)
            self.c.weight = self.a.weight
        if variant == "grouped":  # one block per group: each a slice of the same weight
            self.c = nn.Conv1d(2, 4, 1, groups=2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.variant == "tied":
            h = torch.tanh(self.c(h))
        if self.variant == "grouped":
            h = torch.tanh(self.c(h.view(-1, 2, 2)).reshape(-1, 8)[:, :4])
        return self.b(h) * self.scale


def _setup(variant="separate", T1=10):
    torch.manual_seed(0)
    model = _Net(variant).to(DT)
    X, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = NaturalGradient(model, loss_fn, {"curvature": {"kind": "ggn"}, "update_every": T1, "invert_every": T1},
                              lr=0.1)
    return model, loss_fn, X, y, opt


def _backward(model, loss_fn, X, y, opt):
    opt.zero_grad()
    loss_fn(model(X), y).backward()


@pytest.mark.parametrize("variant, lean", [("separate", True), ("tied", True), ("grouped", False)])
def test_the_layerwise_application_equals_the_flat_product(variant, lean):
    model, loss_fn, X, y, opt = _setup(variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _backward(model, loss_fn, X, y, opt)
        opt.step(batch=(X, y))
    pre = opt.preconditioner
    assert (pre._layer_params is not None) == lean
    grads = [torch.randn_like(p) for p in pre.params()]
    flat = pre.vector_to_params(pre @ pre.params_to_vector(grads))
    for a, b in zip(pre.apply(grads), flat):
        assert_close(a, b)


def test_a_plain_step_checks_once_and_skips_non_finite_gradients(monkeypatch):
    model, loss_fn, X, y, opt = _setup()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _backward(model, loss_fn, X, y, opt)
        opt.step(batch=(X, y))  # step 0: refresh
    calls = []
    real = opt._grads_finite
    monkeypatch.setattr(opt, "_grads_finite", lambda: (calls.append(1), real())[1])
    _backward(model, loss_fn, X, y, opt)
    opt.step()  # a plain step: no separate gradient check
    assert calls == [] and opt.preconditioner.step == 2
    for bad in (model.a.weight, model.scale):  # a preconditioned and a fallback parameter
        _backward(model, loss_fn, X, y, opt)
        bad.grad[0] = float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.warns(NumericalWarning, match="non-finite gradients at step 2"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert opt.preconditioner.step == 2 and opt.metrics["skipped"]
    assert opt.metrics["counts"]["skipped_steps"] == 2


def test_the_per_sample_probe_runs_again_only_when_the_model_or_batch_shapes_change(monkeypatch):
    import curvlib.curvatures.kinds as kinds

    model, loss_fn, X, y, opt = _setup(T1=1)
    calls = []
    real = kinds.check_samples_independent
    monkeypatch.setattr(kinds, "check_samples_independent", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    for Xb, yb in ((X, y), (X, y), (X[:8], y[:8]), (X[:8], y[:8])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _backward(model, loss_fn, Xb, yb, opt)
            opt.step(batch=(Xb, yb))
    assert len(calls) == 2  # the first refresh, and the first with a new batch shape
    model.eval()
    _backward(model, loss_fn, X, y, opt)
    opt.step(batch=(X, y))
    assert len(calls) == 3  # a module changed mode


def test_finite_screen_flags_non_finite_entries_and_may_false_alarm_on_overflow():
    from curvlib.linalg import finite_screen

    big = torch.full((4,), 3e38)  # finite float32 entries whose sum overflows
    assert bool(finite_screen([torch.ones(3), torch.zeros(2, 2)])) and bool(finite_screen([]))
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not bool(finite_screen([torch.ones(3), torch.tensor([1.0, bad])]))
    assert bool(torch.isfinite(big).all()) and not bool(finite_screen([big]))


def test_a_false_alarm_of_the_screen_does_not_skip_the_step():
    """Finite gradients whose sums overflow trip the one-reduction screen; the exact check
    clears them and the step is taken, on refresh and plain steps alike."""
    model, loss_fn, X, y, opt = _setup()
    for refresh in (True, False):
        _backward(model, loss_fn, X, y, opt)
        model.scale.grad.fill_(torch.finfo(DT).max / 2)  # a fallback parameter: finite, sum = inf
        before = model.scale.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error", NumericalWarning)
            opt.step(batch=(X, y) if refresh else None)
        assert not opt.metrics["skipped"] and not torch.equal(model.scale, before)
    assert opt.preconditioner.step == 2
