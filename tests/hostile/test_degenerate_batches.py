"""Degenerate batches and networks: empty batches (0 rows), a batch of one, ReLU networks with dead
units (first-layer bias −10), all-zero inputs, constant (identical) rows.  Each situation runs three
steps of every approximator; every step must satisfy the step invariant (conftest.step_outcome)."""

from __future__ import annotations

import itertools

import pytest
import torch

from .conftest import (
    APPROXIMATORS,
    CURVATURES,
    backward,
    loss_module,
    make_config,
    make_opt,
    record_one,
    step_outcome,
    tiny_batch,
    tiny_model,
    worst,
)

SITUATIONS = ("empty_batch", "empty_refresh_batch", "one_row", "dead_relu", "zero_inputs", "constant_rows")
CASES = [
    (sit, approx, ("float32", "float64")[(i // 2) % 2], CURVATURES[i % 3], ("ce", "mse")[i % 2])
    for i, (sit, approx) in enumerate(itertools.product(SITUATIONS, APPROXIMATORS))
]


@pytest.mark.parametrize("situation, approx, dtype, curvature, loss", CASES,
                         ids=[f"{s}-{a}-{d}-{c}-{l}" for s, a, d, c, l in CASES])
def test_degenerate_batches_keep_the_step_invariant(situation, approx, dtype, curvature, loss):
    model = tiny_model(dtype, seed=0, variant="dead_relu" if situation == "dead_relu" else "mlp")
    loss_fn = loss_module(loss)
    damping = "tikhonov" if approx == "ekfac" else "heuristic"
    opt = make_opt(model, loss_fn, make_config(approx, damping, curvature), momentum=0.9)
    results = []
    for k in range(3):
        X, y = tiny_batch(dtype, loss, seed=k)
        Xr, yr = X, y
        if situation == "empty_batch":
            X = Xr = X[:0]
            y = yr = y[:0]
        elif situation == "empty_refresh_batch" and k == 1:
            Xr, yr = X[:0], y[:0]
        elif situation == "one_row":
            X = Xr = X[:1]
            y = yr = y[:1]
        elif situation == "zero_inputs":
            X = Xr = torch.zeros_like(X)
        elif situation == "constant_rows":
            X = Xr = X[:1].expand_as(X).clone()
        backward(model, loss_fn, X, y, opt)
        results.append(step_outcome(opt, model, lambda: opt.step(batch=(Xr, yr))))
    o, d = worst(results)
    record_one("degenerate-batch", f"{situation} {dtype} {approx}/{damping}/{curvature} loss={loss}", o, d)
