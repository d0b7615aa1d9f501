"""Non-finite and huge values injected at a random step and place of a short training run.

After every step the step invariant of :func:`conftest.step_outcome` must hold: the step was taken
with finite parameters / optimizer state / checkpoint, or skipped with a NumericalWarning and
bit-identical state, or refused with a CurvlibError and nothing changed.  Later clean steps must
go on satisfying it (a poisoned EMA would show up there).

Places: ``input`` (the batch the loss and the refresh see), ``refresh_input`` (only the batch given
to ``step``; the gradients are clean), ``target`` / ``refresh_target`` (MSE), ``grad`` (a ``.grad``
entry after backward), ``param`` (a parameter entry before the forward pass), ``lr`` (a LambdaLR
scheduler's factor at that step).  Values: NaN, ±inf in one entry; ×1e20, ×1e30 of the tensor.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import strategies as st

from curvlib.errors import ConfigError, CurvlibError, NumericalError

from .conftest import (
    APPROXIMATORS,
    CURVATURES,
    backward,
    loss_module,
    make_config,
    make_opt,
    record_one,
    run_situations,
    step_outcome,
    tiny_batch,
    tiny_model,
    worst,
)

PLACES = ("input", "refresh_input", "target", "refresh_target", "grad", "param", "lr")
VALUES = ("nan", "inf", "-inf", "x1e20", "x1e30")
STEPS = 5


@st.composite
def injections(draw):
    approx = draw(st.sampled_from(APPROXIMATORS))
    place = draw(st.sampled_from(PLACES))
    T1 = draw(st.sampled_from([1, 2]))
    return dict(
        place=place,
        value=draw(st.sampled_from(VALUES)),
        at=draw(st.integers(0, STEPS - 2)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
        approx=approx,
        damping="tikhonov" if approx == "ekfac" else draw(st.sampled_from(["heuristic", "tikhonov", "levenberg_marquardt"])),
        curvature=draw(st.sampled_from(CURVATURES)),
        coarse=draw(st.sampled_from([None, None, "nicolaides", "residual"])),
        T1=T1,
        T2=T1 * draw(st.sampled_from([1, 2])),
        momentum=draw(st.sampled_from([0.0, 0.9])),
        loss="mse" if "target" in place else draw(st.sampled_from(["ce", "mse"])),
        variant=draw(st.sampled_from(["mlp", "mlp", "custom", "ln"])),  # custom: an uncovered parameter
        fallback=draw(st.sampled_from(["sgd", "adam"])),
        entry=draw(st.integers(0, 2**16)),
    )


def _poison(t: torch.Tensor, value: str, entry: int) -> torch.Tensor:
    t = t.clone()
    if value.startswith("x"):
        return t * float(value[1:])
    flat = t.view(-1)
    flat[entry % flat.numel()] = float(value)
    return t


def _situation(c) -> str:
    return (f"{c['place']}={c['value']}@step{c['at']} {c['dtype']} {c['approx']}/{c['damping']}/{c['curvature']} "
            f"coarse={c['coarse']} T1={c['T1']} T2={c['T2']} momentum={c['momentum']} loss={c['loss']} "
            f"model={c['variant']} fallback={c['fallback']} entry={c['entry']}")


def _run(c):
    model = tiny_model(c["dtype"], seed=0, variant=c["variant"])
    loss_fn = loss_module(c["loss"])
    cfg = make_config(c["approx"], c["damping"], c["curvature"], c["coarse"], c["T1"], c["T2"])
    opt = make_opt(model, loss_fn, cfg, momentum=c["momentum"], fallback=c["fallback"])
    sched = None
    if c["place"] == "lr":
        factor = float("inf") if c["value"] == "inf" else float("-inf") if c["value"] == "-inf" else (
            float("nan") if c["value"] == "nan" else float(c["value"][1:]))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: factor if e == c["at"] else 1.0)
    results = []
    poisoned = False
    for k in range(STEPS):
        X, y = tiny_batch(c["dtype"], c["loss"], seed=k)
        Xr, yr = X, y
        inject = k == c["at"]
        if inject and c["place"] == "input":
            X = Xr = _poison(X, c["value"], c["entry"])
        if inject and c["place"] == "refresh_input":
            Xr = _poison(X, c["value"], c["entry"])
        if inject and c["place"] == "target":
            y = yr = _poison(y, c["value"], c["entry"])
        if inject and c["place"] == "refresh_target":
            yr = _poison(y, c["value"], c["entry"])
        if inject and c["place"] == "param":
            params = list(model.parameters())
            p = params[c["entry"] % len(params)]
            with torch.no_grad():
                p.copy_(_poison(p, c["value"], c["entry"] // 7))
            poisoned = True
        backward(model, loss_fn, X, y, opt)
        if inject and c["place"] == "grad":
            params = list(model.parameters())
            p = params[c["entry"] % len(params)]
            p.grad = _poison(p.grad, c["value"], c["entry"] // 7)
        # the documented error of each place: non-finite statistics without a previous fit raise
        # NumericalError (docs/plugin_guide.md), a non-finite lr a ConfigError naming it
        # (with clean gradients and a previous fit to keep, no error is documented at all)
        want = (ConfigError,) if (inject and c["place"] == "lr") else (NumericalError,)
        if inject and c["place"].startswith("refresh_") and opt.preconditioner.is_ready and \
                opt.preconditioner.refresh_due():
            want = None
        o, d = step_outcome(opt, model, lambda: opt.step(batch=(Xr, yr)), params_poisoned=poisoned, want=want)
        results.append((o, d))
        if sched is not None:
            sched.step()
    return worst(results)


def test_nonfinite_injection_keeps_the_step_invariant():
    def body(c):
        o, d = _run(c)
        return _situation(c), o, d

    run_situations("nonfinite-injection", injections(), body, max_examples=80)


def test_huge_refresh_inputs_keep_the_previous_fit_for_every_approximator():
    """Finite float32 inputs x1e20 whose factors overflow at the second refresh: the previous fit
    is kept with a NumericalWarning naming the layer, for every approximator (not only kfac)."""

    def body(c):
        approx, curvature = c
        model = tiny_model("float32", seed=0)
        loss_fn = loss_module("ce")
        opt = make_opt(model, loss_fn, make_config(approx, "tikhonov", curvature))
        X, y = tiny_batch("float32", "ce", seed=0)
        backward(model, loss_fn, X, y, opt)
        first = step_outcome(opt, model, lambda: opt.step(batch=(X, y)))
        backward(model, loss_fn, X, y, opt)
        second = step_outcome(opt, model, lambda: opt.step(batch=(X * 1e20, y)))
        o, d = worst([first, second])
        return f"refresh batch x1e20 at step 1, float32 {approx}/tikhonov/{curvature}", o, d

    cases = st.tuples(st.sampled_from(APPROXIMATORS), st.sampled_from(CURVATURES))
    run_situations("huge-refresh-input", cases, body, max_examples=18)


REFRESH_PATHS = [("coarse", c) for c in ("nicolaides", "residual", "spectral", "krylov", "taylor")] + [
    ("preconditioner", "block_natural_gradient"), ("preconditioner", "exact_natural_gradient"),
    ("damping", "levenberg_marquardt"), ("mode", "additive"), ("mode", "previous")]
REFRESH_CASES = [(path, kind, value) for path, kind in REFRESH_PATHS for value in ("nan", "x1e30")]


@pytest.mark.parametrize("path, kind, value", REFRESH_CASES, ids=[f"{p}={k}-{v}" for p, k, v in REFRESH_CASES])
def test_a_non_finite_refresh_batch_on_the_curvature_paths(path, kind, value):
    """The refresh batch of step 1 holds a NaN (or, in float32, x1e30), the gradients are clean: the
    coarse correction, the natural-gradient references and Levenberg–Marquardt (which use the captured
    curvature itself, not only the fit) must keep the previous state with a NumericalWarning, or raise
    NumericalError with nothing changed — never store the non-finite curvature or step with it."""
    dtype = "float32" if value == "x1e30" else "float64"
    model = tiny_model(dtype, seed=0)
    loss_fn = loss_module("ce")
    cfg = make_config("kfac", "tikhonov", "ggn")
    if path == "coarse":
        cfg.update(coarse_space={"kind": kind})
    elif path == "mode":
        cfg.update(coarse_space={"kind": "residual"}, coarse_mode=kind)
    elif path == "preconditioner":
        cfg.update(preconditioner=kind)
    else:
        cfg = make_config("kfac", kind, "ggn")
    opt = make_opt(model, loss_fn, cfg, momentum=0.9)
    results = []
    for k in range(3):
        X, y = tiny_batch(dtype, "ce", seed=k)
        Xr = _poison(X, value, 5) if k == 1 else X
        backward(model, loss_fn, X, y, opt)
        # step 0 is clean: at step 1 there is a previous fit (and curvature) to keep, no error is documented
        results.append(step_outcome(opt, model, lambda: opt.step(batch=(Xr, y)), want=None if k == 1 else CurvlibError))
    o, d = worst(results)
    record_one("nonfinite-refresh-paths", f"{path}={kind}: refresh batch {value} at step 1 ({dtype}, kfac/ggn)", o, d)


@pytest.mark.parametrize("approx", APPROXIMATORS)
def test_a_nan_first_refresh_batch_raises_numerical_error(approx):
    """No previous fit to keep: a NaN in the first refresh batch (clean gradients) raises the documented
    NumericalError (docs/plugin_guide.md: ``_keep_previous_if_nonfinite``) and changes nothing."""
    model = tiny_model("float32", seed=0)
    loss_fn = loss_module("mse")
    damping = "tikhonov" if approx == "ekfac" else "heuristic"
    opt = make_opt(model, loss_fn, make_config(approx, damping, "ggn"))
    X, y = tiny_batch("float32", "mse", seed=0)
    backward(model, loss_fn, X, y, opt)
    Xr = _poison(X, "nan", 14)
    o, d = step_outcome(opt, model, lambda: opt.step(batch=(Xr, y)), want=(NumericalError,))
    record_one("nonfinite-first-refresh", f"NaN in the first refresh batch, float32 {approx}/{damping}/ggn", o, d)
