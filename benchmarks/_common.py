"""Helpers shared by the scripts in ``benchmarks/`` (imported as ``_common``: the scripts are
run as ``python benchmarks/<script>.py``, which puts this folder first on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PATH_HELP", "LockstepRun", "interleaved", "median_time"]

#: ``--path`` of every script that trains or measures on MNIST (like ``curvlib bench --path``)
PATH_HELP = ("a folder of MNIST idx files (train-images-idx3-ubyte[.gz], …; e.g. from "
             "../shared/tools/get_full_mnist.sh): the full 60k/10k MNIST instead of the 5,000 bundled images")


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time (``time.perf_counter``, seconds) of ``repeats`` calls of ``fn``, after
    one untimed call (warm-up: first-call costs such as allocations, kernel choice, a first refresh)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, reference: str) -> tuple[dict[str, float], dict[str, float]]:
    """Time the callables interleaved (A B C A B C …, ``rounds`` rounds, after one untimed call
    of each) and return, per name, the median over rounds of its time **divided by the
    reference's time in the same round**, and its median time in seconds.  A machine that
    slows down for a while slows every callable of those rounds alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = {name: statistics.median(t / r for t, r in zip(ts, times[reference])) for name, ts in times.items()}
    return ratios, {name: statistics.median(ts) for name, ts in times.items()}


class LockstepRun:
    """One method of a lockstep comparison (methods advanced one step each in turn): its model,
    optimizer, accumulated step time (zero_grad, forward, backward, step and the loss read back)
    and training curve.  ``needs_batch``: the optimizer's step takes ``batch=(X, y)``."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Any, opt: Any, needs_batch: bool) -> None:
        self.name, self.model, self.loss_fn, self.opt, self.needs_batch = name, model, loss_fn, opt, needs_batch
        self.seconds = 0.0
        self.curve: list[tuple[int, float]] = []
        self.diverged = False

    def step(self, X: torch.Tensor, y: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model(X), y)
        loss.backward()
        if self.needs_batch:
            self.opt.step(batch=(X, y))
        else:
            self.opt.step()
        value = float(loss.detach())
        self.seconds += time.perf_counter() - t0
        return value

    def train_loss(self, X: torch.Tensor) -> float:
        """The loss of the auto-encoder on ``X`` (its own target), without gradients."""
        with torch.no_grad():
            return float(self.loss_fn(self.model(X), X))
