"""Malformed calls: batches of the wrong structure, shape or dtype given to ``opt.step``, and misuse of
the preconditioner's public API.  The model's own forward pass works on the inputs (the hostile part is
what curvlib does with the rest), so every exception must be a CurvlibError with a clear message, and
a refused step must leave everything bit-identical (conftest.step_outcome)."""

from __future__ import annotations

import pytest
import torch

from .conftest import (
    CLEAR,
    FAILURE,
    backward,
    expect_clear_error_or_ok,
    loss_module,
    make_config,
    make_opt,
    record_one,
    step_outcome,
    tiny_batch,
    tiny_model,
)


def _batches(X, y, loss):
    """name -> the batch given to step (the gradients come from the clean (X, y))."""
    m = X.shape[0]
    out = {
        "bare tensor": X,
        "1-tuple": (X,),
        "3-tuple": (X, y, y),
        "string": "batch",
        "dict": {"x": X, "y": y},
        "y too short": (X, y[:-1]),
        "y too long": (X, torch.cat([y, y[:1]])),
        "y is None": (X, None),
        "y is a list": (X, y.tolist()),
        "y on the meta device": (X, y.to("meta")),
    }
    if loss == "ce":
        out.update({
            "labels out of range": (X, torch.full((m,), 7)),
            "negative labels": (X, torch.full((m,), -3)),
            "float labels": (X, y.to(X.dtype)),
            "one-hot labels 2-D": (X, torch.nn.functional.one_hot(y, 3)),
            "labels [m, 1]": (X, y[:, None]),
        })
    else:
        out.update({
            "targets of another width": (X, torch.zeros(m, 5, dtype=X.dtype)),
            "targets of another dtype": (X, y.to(torch.float16)),
            "integer targets": (X, y.round().long()),
            "targets [m]": (X, y[:, 0]),
        })
    return out


CASES = [(loss, name, T1, when) for loss in ("ce", "mse") for name in _batches(*tiny_batch("float64", loss), loss)
         for T1, when in ((1, 0), (1, 2), (2, 3))]


@pytest.mark.parametrize("loss, name, T1, when", CASES, ids=[f"{l}-{n}-T1={t}-step{w}" for l, n, t, w in CASES])
def test_malformed_refresh_batches_raise_clear_errors(loss, name, T1, when):
    """The batch at step ``when`` is malformed: a clear error and nothing changed, or (at a step
    where no refresh is due and the batch is ignored) a normal step."""
    model = tiny_model("float64", seed=0)
    loss_fn = loss_module(loss)
    opt = make_opt(model, loss_fn, make_config("kfac", "heuristic", "fisher", T1=T1, T2=T1), momentum=0.9)
    outcomes = []
    for k in range(when + 1):
        X, y = tiny_batch("float64", loss, seed=k)
        batch = _batches(X, y, loss)[name] if k == when else (X, y)
        backward(model, loss_fn, X, y, opt)
        outcomes.append(step_outcome(opt, model, lambda: opt.step(batch=batch)))
    o, d = outcomes[-1]
    record_one("malformed-batch", f"{name} at step {when} (T1={T1}, loss={loss})", o, d)


def _ready():
    model = tiny_model("float64", seed=0)
    loss_fn = loss_module("ce")
    opt = make_opt(model, loss_fn, make_config("kfac", "heuristic", "ggn"))
    X, y = tiny_batch("float64", "ce")
    backward(model, loss_fn, X, y, opt)
    opt.step(batch=(X, y))
    return model, loss_fn, opt, X, y


API = {
    "apply: list of the wrong length": lambda pre, X, y: pre.apply([torch.zeros(1)]),
    "apply: wrong shapes": lambda pre, X, y: pre.apply([torch.zeros(2, 2, dtype=torch.float64) for _ in pre.params()]),
    "apply: wrong dtype": lambda pre, X, y: pre.apply([torch.zeros_like(p, dtype=torch.float32) for p in pre.params()]),
    "apply: flat vector too short": lambda pre, X, y: pre.apply(torch.zeros(3, dtype=torch.float64)),
    "apply: a string": lambda pre, X, y: pre.apply("grad"),
    "apply: None": lambda pre, X, y: pre.apply(None),
    "apply: NaN gradient": lambda pre, X, y: pre.apply([torch.full_like(p, float("nan")) for p in pre.params()]),
    "update: negative step": lambda pre, X, y: pre.update((X, y), step=-1),
    "update: step is a string": lambda pre, X, y: pre.update((X, y), step="3"),
    "update: step is a float": lambda pre, X, y: pre.update((X, y), step=2.5),
    "update: no batch at a refresh": lambda pre, X, y: pre.update(None, step=0),
    "vector_to_params: wrong length": lambda pre, X, y: pre.vector_to_params(torch.zeros(3, dtype=torch.float64)),
    "params_to_vector: wrong count": lambda pre, X, y: pre.params_to_vector([torch.zeros(1)]),
    "refresh_due: a string": lambda pre, X, y: pre.refresh_due("x"),
    "step: closure returns a string": None,  # filled below
}


@pytest.mark.parametrize("what", list(API))
def test_preconditioner_api_misuse_raises_clear_errors(what):
    model, loss_fn, opt, X, y = _ready()
    pre = opt.preconditioner
    if what.startswith("step:"):
        def closure():
            return "loss"

        backward(model, loss_fn, X, y, opt)
        o, d = step_outcome(opt, model, lambda: opt.step(closure, batch=(X, y)))
    else:
        o, d, result = expect_clear_error_or_ok(lambda: API[what](pre, X, y))
        if o not in (FAILURE, CLEAR) and what.startswith("apply"):
            # an answer must be finite and shaped like the input
            outs = result if isinstance(result, (list, tuple)) else [result]
            if any(isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()) for t in outs):
                o, d = FAILURE, "apply returned a non-finite direction without an error"
    record_one("api-misuse", what, o, d)
