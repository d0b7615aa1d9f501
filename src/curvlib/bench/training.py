"""One benchmark run: train one method on one problem, time its steps, evaluate its losses.

* :func:`train` — a fresh seeded model trained for a number of steps: a
  :class:`~curvlib.bench.record.RunRecord` with the per-step training loss and cumulative
  wall time, and the training/test loss at every evaluation point (each epoch end by default);
* :func:`evaluate` — the mean loss of a model over (part of) a split;
* :func:`warm_up` — untimed steps on a throwaway model before the timed runs.

Reproducibility: the model weights come from ``model_fn(seed)``, the order of the
batches from ``torch.Generator().manual_seed(seed)`` (the same order for every method),
and every random draw of an optimizer (the Monte Carlo targets of the Fisher) from its
own generator seeded from ``seed``; nothing touches torch's global RNG, so a rerun with
the same seed on the same CPU and thread count gives the same per-step losses.

Timing: only the optimizer steps are timed (``time.perf_counter`` around forward,
backward and step, the loss read back included); the evaluations, the progress
display and the file writing are not. Times are recorded for the plots and for the
ratios of the summary; they are never asserted on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import nn

from curvlib.bench.data import TokenDataset
from curvlib.bench.methods import Hyperparameters, Method
from curvlib.bench.problems import Problem
from curvlib.bench.progress import ProgressReporter
from curvlib.bench.record import RunRecord, plain_metrics, versions
from curvlib.bench.training_step import build_training_step
from curvlib.errors import ConfigError
from curvlib.optim import NaturalGradient
from curvlib.plugins import load_registry

__all__ = ["EVAL_CHUNK", "EVAL_CHUNK_TOKENS", "evaluate", "steps_per_epoch", "train", "warm_up"]

#: Inputs per forward pass of :func:`evaluate`, and for a next-token problem the tokens
#: (``EVAL_CHUNK_TOKENS // T`` windows: long chunks of a transformer run slower on a CPU).
EVAL_CHUNK = 2048
EVAL_CHUNK_TOKENS = 4096


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: nn.Module, problem: Problem, split: Literal["train", "test"], *,
             limit: int | None = None, chunk: int | None = None) -> float | None:
    """The mean loss of ``model`` (in eval mode) over the first ``limit`` inputs of ``split``
    (for a next-token problem: windows, the loss the mean over their tokens).

    ``loss_fn`` is mean-reduced, so chunk means are recombined weighted by chunk size
    (windows all have ``T`` tokens). ``chunk``: inputs per forward pass; ``None``:
    :data:`EVAL_CHUNK`, or ``EVAL_CHUNK_TOKENS // T`` windows. Returns ``None`` for an
    empty split.
    """
    X = problem.dataset.X_train if split == "train" else problem.dataset.X_test
    y = problem.dataset.y_train if split == "train" else problem.dataset.y_test
    if chunk is None:
        chunk = max(1, EVAL_CHUNK_TOKENS // problem.dataset.seq_len) if isinstance(problem.dataset, TokenDataset) \
            else EVAL_CHUNK
    n = X.shape[0] if limit is None else min(limit, X.shape[0])
    if n == 0:
        return None
    was_training = model.training
    model.eval()
    try:
        total = 0.0
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            Xc = X[start:stop]
            target = problem.targets(Xc, None if y is None else y[start:stop])
            total += float(loss_fn(model(Xc), target)) * (stop - start)
    finally:
        model.train(was_training)
    return total / n


def _epoch_batches(problem: Problem, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches forever, epoch after epoch, in the order drawn from ``generator``
    (``drop_last`` so every step sees ``batch_size`` inputs)."""
    if problem.batch_size > problem.dataset.n_train:
        raise ConfigError(f"problem {problem.name!r}: batch_size {problem.batch_size} exceeds the "
                          f"{problem.dataset.n_train} training inputs")
    while True:
        yield from problem.batches(generator, split="train", drop_last=True)


def steps_per_epoch(problem: Problem) -> int:
    return max(1, problem.dataset.n_train // problem.batch_size)


def warm_up(problem: Problem, steps: int) -> None:
    """``steps`` untimed SGD steps on a throwaway model of ``problem`` (see
    :attr:`~curvlib.bench.settings.BenchConfig.warmup_steps`); its own generators, nothing recorded."""
    if steps <= 0:
        return
    model = problem.model_fn(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    batches = _epoch_batches(problem, torch.Generator().manual_seed(0))
    for _ in range(steps):
        X, y = next(batches)
        opt.zero_grad(set_to_none=True)
        problem.loss_fn(model(X), y).backward()
        opt.step()


def _optimizer_seed(seed: int) -> int:
    # A different stream from the data order's, fixed by the seed alone.
    return (int(seed) * 1_000_003 + 0x5EED) % (2**63)


def train(
    problem: Problem,
    method: Method,
    hp: Hyperparameters,
    *,
    steps: int,
    seed: int = 0,
    registry: Any = None,
    eval_every: int | None = None,
    patience: int | None = None,
    eval_train_limit: int | None = 10_000,
    progress: ProgressReporter | None = None,
    label: str | None = None,
    small: bool = True,
) -> RunRecord:
    """Train a fresh ``problem.model_fn(seed)`` with ``method`` for ``steps`` steps.

    Args:
        problem: the problem (its ``batch_size`` is the one used).
        method: a resolved method; ``hp`` its hyperparameters.
        steps: optimizer steps (batches of ``problem.batch_size``, ``drop_last``).
        seed: model weights, batch order and optimizer draws (module docstring).
        registry: the plugin registry the natural-gradient methods resolve kinds in
            (default: :func:`curvlib.plugins.load_registry`).
        eval_every: steps between evaluations (default: one epoch).
        patience: early stopping after this many evaluations without improvement.
        eval_train_limit: training inputs the training loss is evaluated on.
        progress: where progress goes; ``label``: the run's name there.
        small: recorded only (whether ``problem`` is a shrunk one).

    Returns:
        the :class:`~curvlib.bench.record.RunRecord`; a non-finite loss stops the run
        with ``status="diverged"``.
    """
    if registry is None:
        registry = load_registry()
    progress = progress or ProgressReporter()
    label = label or f"{problem.name} {method.name}"
    spe = steps_per_epoch(problem)
    eval_every = eval_every or spe
    model = problem.model_fn(seed)
    model.train()
    loss_fn = problem.loss_fn
    stepper = build_training_step(
        method, model, loss_fn, hp, generator=torch.Generator().manual_seed(_optimizer_seed(seed)), registry=registry,
    )
    record = RunRecord(
        problem=problem.name, method=method.name, method_description=method.description,
        problem_description=problem.description, hyperparameters=hp.model_dump(mode="json"),
        preconditioner_config=stepper.preconditioner_config,
        optimizer=f"{type(stepper.optimizer).__module__}.{type(stepper.optimizer).__qualname__}",
        seed=seed, batch_size=problem.batch_size, steps_planned=steps, steps_per_epoch=spe,
        n_train=problem.dataset.n_train, n_test=problem.dataset.n_test, small=small, loss_unit=problem.loss_unit,
        versions=versions(),
    )

    def log_eval(step: int, elapsed: float) -> bool:
        tr = evaluate(model, loss_fn, problem, "train", limit=eval_train_limit)
        te = evaluate(model, loss_fn, problem, "test")
        record.eval_step.append(step)
        record.eval_epoch.append(step / spe)
        record.eval_wall_time.append(elapsed)
        ok = tr is not None and math.isfinite(tr)
        record.eval_train_loss.append(tr if ok else None)
        record.eval_test_loss.append(te if te is not None and math.isfinite(te) else None)
        return ok

    batches = _epoch_batches(problem, torch.Generator().manual_seed(int(seed)))
    progress.start(label, steps)
    elapsed = 0.0
    best, stale = math.inf, 0
    log_eval(0, 0.0)
    metrics: list[dict[str, Any]] = []  # raw (device tensors): converted after the timed loop
    for step in range(1, steps + 1):
        X, y = next(batches)
        t0 = time.perf_counter()
        try:
            loss = float(stepper.step(X, y))
        except Exception as exc:  # one method's failure must not lose the rest of a long job
            record.status, record.error = "failed", f"{type(exc).__name__}: {exc}"
            progress.message(f"[{label}] step {step} failed: {record.error}")
            break
        elapsed += time.perf_counter() - t0
        if isinstance(stepper.optimizer, NaturalGradient):
            metrics.append(stepper.optimizer.metrics)
        record.train_loss.append(loss)
        record.wall_time.append(elapsed)
        if not math.isfinite(loss):
            record.status = "diverged"
            break
        progress.update(label, step, loss, elapsed)
        if step % eval_every == 0 or step == steps:
            if not log_eval(step, elapsed):
                record.status = "diverged"
                break
            current = record.eval_train_loss[-1]
            if current < best:
                best, stale = current, 0
            else:
                stale += 1
            if patience is not None and stale >= patience and step < steps:
                record.status = "early_stopped"
                break
    if record.status in ("diverged", "failed") and (not record.eval_step or record.eval_step[-1] != record.steps_done):
        record.eval_step.append(record.steps_done)
        record.eval_epoch.append(record.steps_done / spe)
        record.eval_wall_time.append(elapsed)
        record.eval_train_loss.append(None)
        record.eval_test_loss.append(None)
    record.optimizer_metrics = [plain_metrics(m) for m in metrics]
    progress.finish(label, record.status, record.final_train_loss)
    return record
