"""The lean per-step path: layer-by-layer application on the gradients equals the flat
operator product, and a plain step folds the finiteness policy into one check."""

from __future__ import annotations

import collections
import contextlib
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


@contextlib.contextmanager
def _host_reads(monkeypatch):
    """Count every way a tensor's value reaches the host (each is a device synchronisation on a
    GPU): ``item``, ``tolist``, ``bool``, ``float``, ``int``, ``numpy``, ``cpu``."""
    counts = collections.Counter()
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield counts
    monkeypatch.undo()


def _deep_mlp(layers):
    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods += [nn.Linear(6, 6), nn.Tanh()]
    return nn.Sequential(*mods[:-1], nn.Linear(6, 3))


@pytest.mark.parametrize("kl_clip", [None, 1e-3])
def test_a_plain_step_reads_one_value_to_the_host(monkeypatch, kl_clip):
    """Issue 11, item 2: the plain step's one host synchronisation (the finiteness check of the
    directions and fallback gradients), whatever the depth; a refresh reads the statistics'
    screens of all layers at once."""
    refresh_reads = {}
    for layers in (2, 5):
        model, loss_fn = _deep_mlp(layers), nn.CrossEntropyLoss()
        X, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt = NaturalGradient(model, loss_fn, {"update_every": 2, "invert_every": 1000}, lr=0.01, kl_clip=kl_clip)
        for k in range(4):
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            with _host_reads(monkeypatch) as counts:
                opt.step(batch=(X, y))
            if k == 3:  # plain
                assert dict(counts) == {"__bool__": 1}, counts
            if k == 2:  # refresh
                refresh_reads[layers] = sum(counts.values())
    # one factor screen per layer is left (inside each layer's fit), the statistics' screens are one read
    assert refresh_reads[5] - refresh_reads[2] == 5 - 2, refresh_reads


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
    # mixed dtypes: integer tensors are finite, and a large integer sum does not overflow a
    # narrow float beside it (the sums of floating tensors alone are stacked)
    ids = torch.full((1000,), 60000, dtype=torch.int64)
    assert bool(finite_screen([ids, torch.ones(3, dtype=torch.float16), torch.ones(2, dtype=torch.bfloat16)]))
    assert bool(finite_screen([ids, torch.tensor([True])]))
    assert not bool(finite_screen([ids, torch.tensor([1.0, float("nan")], dtype=torch.float16)]))
    assert not bool(finite_screen([torch.ones(2, dtype=torch.float64), torch.tensor([float("inf")], dtype=torch.bfloat16)]))


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


def _clipped(variant):
    """An optimizer with KL clipping after one step (its plan built) and the gradients of a
    second batch."""
    model, loss_fn, X, y, opt = _setup(variant)
    opt.kl_clip = 1e-3
    _backward(model, loss_fn, X, y, opt)
    opt.step(batch=(X, y))
    _backward(model, loss_fn, X, y, opt)
    assert opt.preconditioner._layer_params is not None
    return opt, opt.preconditioner


def _both_paths(opt, pre, directions, grads):
    """ν through the layer-by-layer plan, and through the adapters' pieces (the plan set aside)."""
    lean = opt._kl_scale(pre, directions, grads)
    plan, pre._layer_params = pre._layer_params, None
    try:
        return lean, opt._kl_scale(pre, directions, grads)
    finally:
        pre._layer_params = plan


@pytest.mark.parametrize("variant", ["separate", "tied"])
def test_kl_scale_from_the_layer_plan_equals_the_adapters_pieces(variant):
    """ν of appendix 3.E summed per layer through the layer-by-layer plan equals the general
    path through each layer's adapter pieces."""
    opt, pre = _clipped(variant)
    grads = [p.grad for p in pre.params()]
    lean, general = _both_paths(opt, pre, pre.apply(grads), grads)
    assert float(lean) < 1.0  # the clip acts
    assert_close(lean, general, rtol=1e-13, atol=0.0)


def test_kl_scale_takes_the_absolute_value_per_layer_not_per_parameter():
    """Weight and bias terms of opposite signs inside one layer partly cancel before |·|."""
    opt, pre = _clipped("separate")
    params = pre.params()
    grads = [torch.full_like(p, 0.5) for p in params]
    # weights: Δᵀg = +0.25 per entry; biases: −0.25·3 per entry
    directions = [torch.full_like(p, 0.5) if p.ndim == 2 else torch.full_like(p, -1.5) for p in params]
    per_layer = [abs(sum(float((directions[k] * grads[k]).sum()) for k in ks)) for ks in pre._layer_params]
    expected = min(1.0, (1e-3 / sum(per_layer)) ** 0.5)
    for nu in _both_paths(opt, pre, directions, grads):
        assert float(nu) == pytest.approx(expected, rel=1e-13)


def test_kl_scale_with_an_overflowing_product_is_zero_on_both_paths():
    """A product Δᵀg that overflows to inf in one layer gives ν = 0 (no step) on the plan's
    path as on the adapters' — never a NaN spread to the other layers."""
    opt, pre = _clipped("separate")
    big = [torch.full_like(p, 1e200 if k == 0 else 0.5) for k, p in enumerate(pre.params())]
    for nu in _both_paths(opt, pre, big, [t.clone() for t in big]):
        assert float(nu) == 0.0
