"""The non-finite / numerical-failure policy (docs/reliability.md), one mechanism per test:
solvers with a rounding rule, fallbacks that cannot throw, sampling that never raises,
transactional steps, and the edges (empty batch, NaN learning rate, foreign checkpoints,
``reduction="sum"``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import curvlib
from curvlib.damping.tikhonov import PCGTikhonovInverse
from curvlib.errors import ConfigError, CurvlibError, NotPSDError, NumericalError, NumericalWarning, ShapeError
from curvlib.linalg import pcg
from curvlib.optim import NaturalGradient

DT = torch.float64


def _mlp(dt=DT, relu=False, width=6, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU() if relu else nn.Tanh(), nn.Linear(width, 3)).to(dt)


def _data(dt=DT, m=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 4, dtype=dt, generator=g), torch.randint(0, 3, (m,), generator=g)


def _opt(model, config=None, **kw):
    kw.setdefault("lr", 0.1)
    return NaturalGradient(model, nn.CrossEntropyLoss(), config, generator=torch.Generator().manual_seed(1), **kw)


def _step(opt, model, X, y, batch=None):
    opt.zero_grad()
    opt.loss_fn(model(X), y).backward()
    opt.step(batch=(X, y) if batch is None else batch)


def _snapshot(opt, model):
    """Everything a step may change: parameters, optimizer state, preconditioner state."""
    return copy.deepcopy(({k: v.detach().clone() for k, v in model.state_dict().items()}, opt.state_dict()))


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# --------------------------------------------------------------------------- PCG's rounding rule


def test_pcg_breakdown_at_rounding_level_stops_the_column_instead_of_raising():
    # A PSD and singular: a right-hand side in its null space meets pᵀAp = 0 (rounding level),
    # which used to raise NotPSDError; now that column stops, the other one is solved
    A = torch.diag(torch.tensor([2.0, 0.0], dtype=DT))
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT)  # columns: solvable, null space
    X, info = pcg(lambda V: A @ V, B, tol=1e-14, max_iters=10)
    assert info.breakdowns == 1 and not info.converged
    torch.testing.assert_close(X, torch.tensor([[0.5, 0.0], [0.0, 0.0]], dtype=DT), rtol=0, atol=0)
    x, info = pcg(lambda V: A @ V, B[:, 1], tol=1e-14)
    assert info.breakdowns == 1 and torch.equal(x, torch.zeros(2, dtype=DT))


def test_pcg_still_rejects_negative_curvature_beyond_rounding():
    A = torch.diag(torch.tensor([1.0, -0.5], dtype=DT))
    with pytest.raises(NotPSDError, match=r"pᵀAp = .* < 0 beyond rounding"):
        pcg(lambda X: A @ X, torch.tensor([0.0, 1.0], dtype=DT), tol=1e-12)


def test_pcg_inverse_falls_back_to_the_leading_term_when_the_psd_part_fails(monkeypatch):
    g = torch.Generator().manual_seed(0)
    A1 = torch.eye(3, dtype=DT) * 2
    B1 = torch.eye(2, dtype=DT)
    C = torch.randn(3, 3, dtype=DT, generator=g)
    C = C + C.T
    terms = ((A1, B1), (C, -B1 * 5))  # indefinite beyond λ
    inv = PCGTikhonovInverse(terms, 1e-3, tol=1e-10, max_iters=50)
    calls = []

    def failing_run(op, X):
        calls.append(op)
        raise NotPSDError("pcg: forced")

    monkeypatch.setattr(inv, "_run", failing_run)
    X = torch.randn(2, 3, dtype=DT, generator=g)
    with pytest.warns(NumericalWarning) as rec:
        Y = inv.solve(X)
    assert len(calls) == 2  # M, then its PSD part, both failing
    assert inv.info.fallback == "leading_term" and inv.fallback_taken
    assert any("PSD part" in str(w.message) for w in rec) and any("leading term" in str(w.message) for w in rec)
    # the last fallback is exactly (A1⊗B1 + λI)⁻¹: here (2·1 + λ)⁻¹ X
    torch.testing.assert_close(Y, X / (2 + 1e-3), rtol=1e-13, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(inv.solve(X), Y, rtol=0, atol=0)  # kept, no new warning


@pytest.mark.parametrize("approximator", ["kfac_corrected", "deflation", "lanczos"])
def test_tiny_tikhonov_on_dead_relus_in_float32_never_raises(approximator):
    """Reported: kfac_corrected with Tikhonov λ = 1e-10 on a ReLU net with dead units raised
    NotPSDError from PCG mid-training; now every step is taken with finite parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    with torch.no_grad():
        model[0].bias[:16] = -50
        model[2].bias[:16] = -50
    X, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    opt = _opt(model, {"approximator": approximator, "damping": {"kind": "tikhonov", "value": 1e-10}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        for _ in range(3):
            _step(opt, model, X, y)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert opt.preconditioner.step == 3 - opt.metrics["counts"]["skipped_steps"]


def test_heuristic_two_term_inverse_on_huge_float32_inputs_at_the_first_step():
    """Reported: heuristic damping with inputs × 1e18 made the two-term inverse raise (its
    leading factor not positive definite in float32, the clamp fallback failing too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    X, y = torch.randn(64, 20) * 1e18, torch.randint(0, 5, (64,))
    opt = _opt(model, {"approximator": "kfac_corrected", "curvature": "ggn"})
    with pytest.warns(NumericalWarning, match="clamping"):
        _step(opt, model, X, y)
    assert opt.preconditioner.step == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --------------------------------------------------------------------------- capture


@pytest.mark.parametrize("loss_fn,target", [
    (nn.CrossEntropyLoss(), lambda m: torch.randint(0, 3, (m,))),
    (nn.BCEWithLogitsLoss(), lambda m: torch.randint(0, 2, (m, 3)).to(DT)),
])
def test_monte_carlo_fisher_on_a_nan_batch_keeps_the_previous_fit(loss_fn, target):
    """Reported: NaN in the refresh batch with ``fisher`` raised a raw RuntimeError from
    torch.multinomial, while ggn / empirical_fisher warned and kept the previous fit."""
    model = _mlp()
    X, _ = _data()
    y = target(16)
    opt = NaturalGradient(model, loss_fn, {"curvature": "fisher"}, lr=0.1, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step(batch=(X, y))
    before = [fit.terms for fit in opt.preconditioner.approximation.fits]
    bad = X.clone()
    bad[0, 0] = float("nan")
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    with pytest.warns(NumericalWarning, match=r"captured at step 2 is not finite \(statistics of layer '0'.*keeping the "
                      r"previous refresh \(step 1\)"):
        opt.step(batch=(bad, y))
    after = [fit.terms for fit in opt.preconditioner.approximation.fits]
    assert all(torch.equal(a, b) for t0, t1 in zip(before, after) for p0, p1 in zip(t0, t1) for a, b in zip(p0, p1))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_an_empty_batch_is_a_clear_error_and_changes_nothing():
    model = _mlp()
    X, y = _data()
    opt = _opt(model)
    _step(opt, model, X, y)
    before = _snapshot(opt, model)
    opt.zero_grad()
    opt.loss_fn(model(X), y).backward()
    for step in range(2):
        with pytest.raises(ShapeError, match=r"the batch has no samples \(m = 0"):
            opt.step(batch=(X[:0], y[:0]))
    assert _equal(before, _snapshot(opt, model))
    with pytest.raises(ShapeError, match="no samples"):
        curvlib.curvature("ggn", model, nn.CrossEntropyLoss(), (X[:0], y[:0]))


# --------------------------------------------------------------------------- the step


def test_a_nan_learning_rate_from_a_scheduler_is_refused_before_anything_changes():
    model = _mlp()
    X, y = _data()
    opt = _opt(model, momentum=0.9)
    _step(opt, model, X, y)
    before = _snapshot(opt, model)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ConfigError, match=r"param_groups\[0\].lr: expected a finite number, got nan"):
        _step(opt, model, X, y)
    opt.param_groups[0]["lr"] = 0.1  # (NaN ≠ NaN in the comparison)
    assert _equal(before, _snapshot(opt, model))


def test_a_failed_refresh_leaves_optimizer_and_preconditioner_untouched(monkeypatch):
    model = _mlp()
    X, y = _data()
    opt = _opt(model, {"update_every": 1, "invert_every": 2}, momentum=0.9)
    _step(opt, model, X, y)
    _step(opt, model, X, y)  # the next step (2) refreshes and inverts
    before = _snapshot(opt, model)
    counts = dict(opt.metrics["counts"])
    import curvlib.precond.preconditioner as mod

    def broken(*args, **kwargs):
        raise RuntimeError("forced bug in the inversion")

    monkeypatch.setattr(mod, "damped_inverse", broken)
    with pytest.raises(RuntimeError, match="forced"):
        _step(opt, model, X, y)
    assert _equal(before, _snapshot(opt, model))  # step counter, fits, generator, parameters
    monkeypatch.undo()
    _step(opt, model, X, y)
    assert opt.preconditioner.step == 3 and opt.metrics["counts"]["refreshes"] == counts["refreshes"] + 1


def test_a_numerical_failure_of_a_refresh_keeps_the_previous_refresh(monkeypatch):
    model = _mlp()
    X, y = _data()
    opt = _opt(model, {"update_every": 1, "invert_every": 2})
    _step(opt, model, X, y)
    _step(opt, model, X, y)
    pre = opt.preconditioner
    kept = (pre.approximation, pre.inverse, pre.curvature, pre.num_refreshes, pre.generator.get_state())
    import curvlib.precond.preconditioner as mod

    def overflowing(*args, **kwargs):
        raise NumericalError("forced: a Gram matrix overflowed")

    monkeypatch.setattr(mod, "damped_inverse", overflowing)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(NumericalWarning, match=r"refresh at step 2 failed numerically \(forced.*keeping the previous "
                      r"refresh \(step 1\)"):
        _step(opt, model, X, y)
    assert pre.step == 3 and not opt.metrics["refreshed"] and not opt.metrics["inverted"]
    assert (pre.approximation, pre.inverse, pre.curvature, pre.num_refreshes) == kept[:4]
    assert torch.equal(pre.generator.get_state(), kept[4])
    assert not all(torch.equal(a, b) for a, b in zip(params, model.parameters()))  # the step was taken
    # nothing to keep at the first refresh: the error is raised, nothing changed
    fresh = _mlp()
    opt2 = _opt(fresh)
    with pytest.raises(NumericalError, match="forced"):
        _step(opt2, fresh, X, y)
    assert opt2.preconditioner.step == 0 and not opt2.preconditioner.is_ready


def test_a_non_finite_direction_from_finite_gradients_skips_the_step(monkeypatch):
    model = _mlp()
    X, y = _data()
    opt = _opt(model, {"update_every": 2, "invert_every": 2}, momentum=0.9)
    _step(opt, model, X, y)
    before = _snapshot(opt, model)
    pre = opt.preconditioner
    real_apply = type(pre).apply

    def overflowing(self, grad, *, check_finite=True):
        out = real_apply(self, grad, check_finite=False)
        out = [o.clone() for o in out]
        out[0][0, 0] = float("inf")
        if check_finite:
            raise NumericalError("BlockDiagonalInverse.matmat: the direction has non-finite entries in layer block(s) [0]")
        return out

    monkeypatch.setattr(type(pre), "apply", overflowing)
    with pytest.warns(NumericalWarning, match=r"finite gradients gave a non-finite direction .*layer block\(s\) \[0\]"):
        _step(opt, model, X, y)
    assert _equal(before, _snapshot(opt, model))
    assert opt.metrics["skipped"] and opt.metrics["counts"]["skipped_steps"] == 1


# --------------------------------------------------------------------------- checkpoints


def test_a_float32_state_into_a_float64_model_is_refused_at_load():
    m32, m64 = _mlp(torch.float32), _mlp(DT)
    X, y = _data()
    o32, o64 = _opt(m32), _opt(m64)
    _step(o32, m32, X.float(), y)
    _step(o64, m64, X, y)
    before = _snapshot(o64, m64)
    with pytest.raises(ConfigError, match=r"is torch.float32 on cpu; this preconditioner works in torch.float64"):
        o64.load_state_dict(o32.state_dict())
    assert _equal(before, _snapshot(o64, m64))


# --------------------------------------------------------------------------- reduction="sum"


def test_a_sum_loss_takes_the_same_steps_as_the_mean_loss():
    """The gradient of reduction="sum" is m × the mean's while the curvature is per sample:
    the optimizer divides by m, so lr, damping and KL clip mean the same (module docstring)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3), nn.LayerNorm(3)).to(DT)  # LayerNorm: fallback
    X, y = _data(m=12)
    params = {}
    for reduction in ("mean", "sum"):
        model = copy.deepcopy(base)
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        opt = NaturalGradient(model, loss_fn, {"curvature": "ggn", "update_every": 2, "invert_every": 2}, lr=0.1,
                              momentum=0.9, weight_decay=1e-3, kl_clip=1e-2, fallback="adam")
        for s in range(4):
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step(batch=(X, y) if s % 2 == 0 else None)
        params[reduction] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(params["sum"], params["mean"], rtol=1e-12, atol=1e-14)
    assert not torch.equal(params["mean"], torch.cat([p.detach().flatten() for p in base.parameters()]))


def test_every_error_here_is_a_curvlib_error():
    for exc in (ShapeError, ConfigError, NumericalError, NotPSDError):
        assert issubclass(exc, CurvlibError)


# --------------------------------------------------------------------------- where warnings point


def test_warnings_point_at_the_users_line():
    """Reported: warnings pointed at curvlib's own line; now at the caller's, whatever the depth
    (here a kept refresh, deep inside step() under torch's no_grad wrapper)."""
    model = _mlp()
    X, y = _data()
    opt = _opt(model)
    _step(opt, model, X, y)
    bad = X.clone()
    bad[0, 0] = float("nan")
    opt.zero_grad()
    opt.loss_fn(model(X), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(batch=(bad, y)); line = __import__("inspect").currentframe().f_lineno  # noqa: E702
    numerical = [w for w in caught if issubclass(w.category, NumericalWarning)]
    assert numerical and all((w.filename, w.lineno) == (__file__, line) for w in numerical)
