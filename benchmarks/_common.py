"""Helpers shared by the scripts in ``benchmarks/`` (imported as ``_common``: the scripts are
run as ``python benchmarks/<script>.py``, which puts this folder first on ``sys.path``)."""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["PATH_HELP", "LockstepRun", "autoencoder_on_device", "host_syncs", "interleaved", "median_time",
           "run_lockstep"]

#: ``--path`` of every script that trains or measures on MNIST (like ``curvlib bench --path``)
PATH_HELP = ("a folder of MNIST idx files (train-images-idx3-ubyte[.gz], …; e.g. from "
             "../shared/tools/get_full_mnist.sh): the full 60k/10k MNIST instead of the 5,000 bundled images")


def autoencoder_on_device(parser: Any, argv: Sequence[str] | None, *, device: str = "cpu") -> tuple[Any, Any, Any]:
    """Parse the arguments of a device benchmark (``parser`` plus ``--device``, ``--threads``,
    ``--batch``, ``--small``) and build the MNIST auto-encoder problem: ``(args, problem, X)``
    with X the first ``--batch`` training images on ``args.device`` (a ``torch.device``)."""
    from curvlib.bench.problems import PROBLEMS

    parser.add_argument("--device", default=device)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--small", action="store_true", help="the shrunk auto-encoder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device)
    problem = PROBLEMS["mnist_autoencoder"](small=args.small, seed=0)
    return args, problem, problem.dataset.X_train[: args.batch].to(args.device)


def host_syncs(fn: Callable[[], Any]) -> int:
    """How many host synchronisations one call of ``fn`` makes on the GPU (``torch.cuda``'s sync
    debug mode warns at every implicit device → host wait: ``.item()``, ``.tolist()``, ``bool(t)``)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


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


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, reference: str,
                warmup: int = 1) -> tuple[dict[str, float], dict[str, float]]:
    """Time the callables interleaved (A B C A B C …, ``rounds`` rounds, after ``warmup``
    untimed rounds of the same order) and return, per name, the median over rounds of its time
    **divided by the reference's time in the same round**, and its median time in seconds.  A
    machine that slows down for a while slows every callable of those rounds alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
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


def run_lockstep(build: Callable[[str, torch.nn.Module], LockstepRun], names: Sequence[str], init: torch.nn.Module,
                 problem: Any, *, steps: int, eval_every: int, warmup: int, seed: int) -> list[LockstepRun]:
    """Train one :class:`LockstepRun` per name, ``build(name, model)``, from copies of ``init`` on the
    same batches of ``problem`` (``problem.batches(generator)``, seeded by ``seed``), one step of each in
    turn; the training loss on ``problem.dataset.X_train`` every ``eval_every`` steps (printed).
    First, ``warmup`` untimed steps of each method on a throwaway copy (one-time costs off the clock).
    Warnings are silenced; a run whose loss turns non-finite stops (``diverged``)."""
    X_train = problem.dataset.X_train
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Xw, yw = next(problem.batches(torch.Generator().manual_seed(seed + 1)))
        for name in names:
            throwaway = build(name, copy.deepcopy(init))
            for _ in range(warmup):
                throwaway.step(Xw, yw)
        runs = [build(name, copy.deepcopy(init)) for name in names]
        for run in runs:
            run.curve.append((0, run.train_loss(X_train)))
        gen, k = torch.Generator().manual_seed(seed), 0
        while k < steps:
            for X, y in problem.batches(gen):
                for run in runs:
                    if not run.diverged:
                        run.diverged = not math.isfinite(run.step(X, y))
                k += 1
                if k % eval_every == 0 or k == steps:
                    for run in runs:
                        run.curve.append((k, run.train_loss(X_train)))
                    print(f"step {k:4d}: " + ", ".join(f"{r.name} {r.curve[-1][1]:.4f}" for r in runs), flush=True)
                if k >= steps:
                    break
    return runs
