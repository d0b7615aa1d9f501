"""The benchmark runner behind ``curvlib bench``: train every method on every problem,
record the curves, write the results directory.

Entry points:

* :class:`BenchConfig` — everything one benchmark run needs (what ``--config`` files and
  the command-line options fill in);
* :func:`train` — one method on one problem: a :class:`RunRecord` with the per-step
  training loss and cumulative wall time, and the training/test loss at every
  evaluation point (each epoch end by default);
* :func:`run_bench` — the whole job: optional grid search (:mod:`curvlib.bench.grid`),
  the runs, one JSON per run, the plots and ``summary.json``
  (:mod:`curvlib.bench.report`).

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

import dataclasses
import datetime as _dt
import json
import math
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from curvlib.bench.data import TokenDataset
from curvlib.bench.methods import Hyperparameters, Method, build_training_step, resolve_method
from curvlib.bench.problems import PROBLEMS, Problem
from curvlib.config import StrictModel, validate_options
from curvlib.errors import ConfigError

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_PROBLEMS",
    "DEFAULT_STEPS",
    "BenchConfig",
    "BenchResult",
    "GridSettings",
    "MethodConfig",
    "ProgressReporter",
    "RunRecord",
    "build_problem",
    "evaluate",
    "load_config_file",
    "make_progress",
    "run_bench",
    "train",
    "versions",
]

#: Problems and methods of a bare ``curvlib bench``: the thesis's MNIST auto-encoder
#: (``small=True``) with the baselines and the KFAC family of chapter 3. A problem that
#: names its own :attr:`~curvlib.bench.problems.Problem.default_methods` (``char_lm``,
#: ``mnist_resnet``) runs those instead when no methods are given.
DEFAULT_PROBLEMS: tuple[str, ...] = ("mnist_autoencoder",)
DEFAULT_METHODS: tuple[str, ...] = ("sgd", "adam", "kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected")
DEFAULT_STEPS = 200

RUN_SCHEMA = "curvlib.bench.run/1"
SUMMARY_SCHEMA = "curvlib.bench.summary/1"


# --------------------------------------------------------------------------- configuration


class MethodConfig(StrictModel):
    """One method with its own settings (unset fields fall back to the global ones, then
    to the method's defaults). In a config file a bare string is the name alone.

    Attributes mirror :class:`~curvlib.bench.methods.Hyperparameters`; ``name`` is a
    method name (:func:`~curvlib.bench.methods.resolve_method`).
    """

    name: str
    lr: float | None = Field(None, gt=0)
    damping: float | None = Field(None, gt=0)
    damping_kind: str | None = None
    momentum: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    kl_clip: float | None = Field(None, ge=0)
    curvature: str | None = None
    mc_samples: int | None = Field(None, ge=1)
    update_every: int | None = Field(None, ge=1)
    invert_every: int | None = Field(None, ge=1)
    ema: float | None = Field(None, ge=0, le=1)
    approximator_options: dict[str, Any] | None = None
    coarse_options: dict[str, Any] | None = None
    fallback: Literal["sgd", "adam"] | None = None
    optimizer_options: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    def overrides(self) -> dict[str, Any]:
        """The hyperparameters this entry sets (``None`` fields left out)."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}


#: The BenchConfig fields that are hyperparameters of every method.
_GLOBAL_HP = ("lr", "damping", "damping_kind", "momentum", "weight_decay", "kl_clip",
              "update_every", "invert_every", "ema", "mc_samples")

#: The learning-rate and damping grid of the thesis's §3.3.2:
#: {10⁻¹, 10⁻², 10⁻³, 10⁻⁴, 3·10⁻¹, 3·10⁻², 3·10⁻³, 3·10⁻⁴}.
THESIS_GRID_3_3_2: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


class GridSettings(StrictModel):
    """The grid search run before the main runs (``--grid``; :mod:`curvlib.bench.grid`).

    Attributes:
        lr: learning rates tried (default: the §3.3.2 grid).
        damping: dampings tried for the natural-gradient methods (default: the §3.3.2
            grid); the baselines search ``lr`` only.
        steps: length of each trial run; ``None``: a quarter of the main run's steps
            (at least 10).
    """

    lr: tuple[float, ...] = THESIS_GRID_3_3_2
    damping: tuple[float, ...] = THESIS_GRID_3_3_2
    steps: int | None = Field(None, ge=1)

    @field_validator("lr", "damping")
    @classmethod
    def _positive(cls, values: tuple[float, ...]) -> tuple[float, ...]:
        if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError(f"a grid needs at least one value, all positive and finite; got {list(values)}")
        return values


class BenchConfig(StrictModel):
    """Everything a ``curvlib bench`` run needs (a ``--config`` file holds these keys).

    Attributes:
        problems: names from :data:`curvlib.bench.problems.PROBLEMS`.
        methods: method names or :class:`MethodConfig` entries, run on every problem;
            ``None`` (the default): each problem's own ``default_methods``, else
            :data:`DEFAULT_METHODS` (:meth:`methods_for`).
        steps / epochs: run length, in optimizer steps or in passes over the training
            set (at most one of them; neither: :data:`DEFAULT_STEPS` steps).
        batch_size: ``None``: each problem's own (the thesis's) batch size.
        lr, damping, damping_kind, momentum, weight_decay, kl_clip, update_every,
        invert_every, ema, mc_samples: global hyperparameters, for every method that
            does not set its own (``lr``/``damping``: ``None`` keeps the method defaults).
        seed: seeds the model weights, the batch order, the Monte Carlo draws and the data split.
        small: the shrunk problems (``small=True`` of the problem builders) or the thesis's
            full architectures.
        path: data files for the problems (e.g. a folder of MNIST idx files).
        out: the results directory; ``None``: ``results/bench/<name>``.
        name: the run's name; ``None``: a UTC timestamp.
        target_loss: the training loss whose time-to-reach the summary reports; ``None``:
            per problem, Adam's best final training loss × (1 + ``target_margin``).
        target_margin: see ``target_loss`` (default 5 %).
        grid: run a grid search per method first (:class:`GridSettings`), or ``None``.
        eval_every: steps between evaluations of the training and test loss;
            ``None``: once per epoch.
        patience: early stopping (§4.3): stop a run after this many evaluations without a
            decrease of the training loss; ``None``: off.
        eval_train_limit: the training loss is evaluated on the first this-many training
            inputs (all of them when there are fewer).
        progress: ``"auto"`` (rich when the output is a terminal, plain lines otherwise),
            ``"rich"``, ``"plain"`` or ``"none"``.
        plots: write the PNG plots.
        warmup_steps: untimed SGD steps on a throwaway copy of each problem's model before
            its timed runs, so that one-time costs of the process (thread pools, kernel
            selection, the allocator's first page faults) are not charged to whichever
            method runs first; 0: none. Touches no generator the runs use.
        threads: ``torch.set_num_threads`` for the run (restored afterwards); ``None``:
            torch's setting. Per-step losses are reproducible for a fixed thread count.
    """

    problems: tuple[str, ...] = DEFAULT_PROBLEMS
    methods: tuple[MethodConfig, ...] | None = None
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0)
    damping: float | None = Field(None, gt=0)
    damping_kind: str | None = None
    momentum: float | None = Field(None, ge=0, lt=1)
    weight_decay: float | None = Field(None, ge=0)
    kl_clip: float | None = Field(None, ge=0)
    update_every: int | None = Field(None, ge=1)
    invert_every: int | None = Field(None, ge=1)
    ema: float | None = Field(None, ge=0, le=1)
    mc_samples: int | None = Field(None, ge=1)
    seed: int = 0
    small: bool = True
    path: str | None = None
    out: str | None = None
    name: str | None = None
    target_loss: float | None = Field(None, gt=0)
    target_margin: float = Field(0.05, ge=0)
    grid: GridSettings | None = None
    eval_every: int | None = Field(None, ge=1)
    patience: int | None = Field(None, ge=1)
    eval_train_limit: int = Field(10_000, ge=1)
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    plots: bool = True
    warmup_steps: int = Field(20, ge=0)
    threads: int | None = Field(None, ge=1)

    @field_validator("grid", mode="before")
    @classmethod
    def _grid_switch(cls, value: Any) -> Any:
        # ``grid: true`` in a config file: the default grid; ``false``: none.
        if value is True:
            return {}
        if value is False:
            return None
        return value

    @field_validator("problems")
    @classmethod
    def _known_problems(cls, problems: tuple[str, ...]) -> tuple[str, ...]:
        if not problems:
            raise ValueError("at least one problem is needed")
        unknown = [p for p in problems if p not in PROBLEMS]
        if unknown:
            raise ValueError(f"unknown problem(s) {unknown}; known problems: {', '.join(PROBLEMS)}")
        return problems

    @field_validator("methods")
    @classmethod
    def _some_methods(cls, methods: tuple[MethodConfig, ...] | None) -> tuple[MethodConfig, ...] | None:
        if methods is None:
            return None
        if not methods:
            raise ValueError("at least one method is needed")
        names = [m.name for m in methods]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"methods listed twice: {dupes}")
        return methods

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> BenchConfig:
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give steps or epochs, not both (steps={self.steps}, epochs={self.epochs})")
        return self

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, where: str = "bench configuration") -> BenchConfig:
        """Validate ``data`` (raises :class:`~curvlib.errors.ConfigError` naming the fields)."""
        return validate_options(cls, dict(data), where=where)  # type: ignore[return-value]

    def methods_for(self, problem: Problem) -> tuple[MethodConfig, ...]:
        """The methods run on ``problem``: :attr:`methods`, or when that is ``None`` the
        problem's ``default_methods``, else :data:`DEFAULT_METHODS`."""
        if self.methods is not None:
            return self.methods
        return tuple(MethodConfig(name=m) for m in (problem.default_methods or DEFAULT_METHODS))

    def hyperparameters(self, method: Method, entry: MethodConfig, problem: Problem | None = None) -> Hyperparameters:
        """The settings of ``method``: its :class:`MethodConfig` entry, then the global
        values, then the defaults ``problem`` gives the method's family
        (:attr:`~curvlib.bench.problems.Problem.hyperparameter_defaults`), then the method's defaults."""
        values = dict(problem.hyperparameter_defaults.get(method.family, {})) if problem is not None else {}
        values.update({k: getattr(self, k) for k in _GLOBAL_HP if getattr(self, k) is not None})
        if not method.is_natural_gradient:
            for key in ("damping", "damping_kind", "kl_clip", "update_every", "invert_every", "ema", "mc_samples"):
                values.pop(key, None)
        values.update(entry.overrides())
        try:
            return method.default_hyperparameters(**values)
        except Exception as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"method {method.name!r}: invalid settings {values}: {exc}") from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``--config`` file: YAML (``.yaml``/``.yml``, needs PyYAML) or JSON."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} does not exist")
    text = file.read_text()
    if file.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:  # pragma: no cover - pyyaml is in the bench extra
            raise ConfigError(f"reading {file} needs PyYAML: pip install pyyaml (or use a .json file)") from exc
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid JSON: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {file} must hold a mapping of options, got {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- progress


class ProgressReporter:
    """Receives the progress of the runs; the base class shows nothing.

    ``start`` once per run, ``update`` after optimizer steps (``loss`` is the last
    batch loss, ``elapsed`` the timed training seconds so far), ``finish`` at the end,
    ``message`` for anything else (grid choices, file paths).
    """

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, label: str, total: int) -> None:
        """A run called ``label`` of ``total`` steps begins."""

    def update(self, label: str, step: int, loss: float, elapsed: float) -> None:
        """``step`` steps of ``label`` are done."""

    def finish(self, label: str, status: str, final_loss: float | None) -> None:
        """``label`` ended with ``status`` (``"ok"``, ``"diverged"``, ``"early_stopped"``)."""

    def message(self, text: str) -> None:
        """A free-form line."""

    def close(self) -> None:
        """Release the display."""


def _eta(step: int, total: int, elapsed: float) -> float | None:
    return None if step <= 0 else elapsed / step * (total - step)


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


class PlainProgress(ProgressReporter):
    """Plain lines (CI, pipes): one when a run starts, about every 10 % of it, and at its end."""

    def __init__(self, stream: Any = None, *, every_fraction: float = 0.1) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self.every_fraction = every_fraction
        self._totals: dict[str, int] = {}
        self._next: dict[str, int] = {}

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def start(self, label: str, total: int) -> None:
        self._totals[label] = total
        self._next[label] = max(1, int(total * self.every_fraction))
        self._write(f"[{label}] start: {total} steps")

    def update(self, label: str, step: int, loss: float, elapsed: float) -> None:
        total = self._totals.get(label, step)
        if step < self._next.get(label, 0) and step != total:
            return
        self._next[label] = step + max(1, int(total * self.every_fraction))
        self._write(f"[{label}] step {step:>{len(str(total))}}/{total}  loss {loss:.5g}  "
                    f"elapsed {_fmt_seconds(elapsed)}  eta {_fmt_seconds(_eta(step, total, elapsed))}")

    def finish(self, label: str, status: str, final_loss: float | None) -> None:
        loss = "n/a" if final_loss is None else f"{final_loss:.5g}"
        self._write(f"[{label}] {status}: final training loss {loss}")

    def message(self, text: str) -> None:
        self._write(text)


class RichProgress(ProgressReporter):
    """A live ``rich`` display: one bar per run with its step, loss, elapsed time and ETA."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = console if console is not None else Console()
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("elapsed {task.fields[elapsed]}"),
            TextColumn("eta {task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._totals: dict[str, int] = {}
        self._progress.start()

    def start(self, label: str, total: int) -> None:
        self._totals[label] = total
        self._tasks[label] = self._progress.add_task(label, total=total, loss="-", elapsed="0.0s", eta="?")

    def update(self, label: str, step: int, loss: float, elapsed: float) -> None:
        self._progress.update(self._tasks[label], completed=step, loss=f"{loss:.5g}", elapsed=_fmt_seconds(elapsed),
                              eta=_fmt_seconds(_eta(step, self._totals[label], elapsed)))

    def finish(self, label: str, status: str, final_loss: float | None) -> None:
        loss = "n/a" if final_loss is None else f"{final_loss:.5g}"
        task = self._tasks[label]
        self._progress.update(task, loss=f"{loss} ({status})", eta="0.0s")
        if status != "ok":
            self._progress.update(task, total=self._progress.tasks[self._task_index(task)].completed)

    def _task_index(self, task_id: Any) -> int:
        return next(i for i, t in enumerate(self._progress.tasks) if t.id == task_id)

    def message(self, text: str) -> None:
        self._progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self._progress.stop()


def make_progress(mode: str = "auto", stream: Any = None) -> ProgressReporter:
    """The reporter for ``mode``: ``"auto"`` picks rich on a terminal (when rich is
    installed and ``CI`` is unset), plain lines otherwise."""
    import os

    stream = stream if stream is not None else sys.stdout
    if mode == "none":
        return ProgressReporter()
    if mode == "auto":
        tty = bool(getattr(stream, "isatty", lambda: False)())
        mode = "rich" if tty and not os.environ.get("CI") else "plain"
    if mode == "rich":
        try:
            from rich.console import Console
        except ImportError:
            return PlainProgress(stream)
        return RichProgress(Console(file=stream))
    if mode == "plain":
        return PlainProgress(stream)
    raise ConfigError(f"progress must be 'auto', 'rich', 'plain' or 'none', got {mode!r}")


# --------------------------------------------------------------------------- one run


@dataclass
class RunRecord:
    """The curves and settings of one method on one problem (one JSON file).

    Attributes:
        problem, method: names; ``method_description``, ``problem_description``: one line each.
        hyperparameters: the :class:`~curvlib.bench.methods.Hyperparameters` used, as a dict.
        preconditioner_config: the ``PreconditionerConfig`` as a dict (``None`` for SGD/Adam).
        optimizer: the optimizer class's qualified name.
        seed, batch_size, steps_planned, steps_per_epoch, n_train, n_test, small: the setting
            (``n_train``, ``n_test``: inputs — windows for a next-token problem).
        loss_unit: what one unit of the loss is (``"nats/char"``), ``None`` when unstated.
        train_loss: ``[steps]`` the loss of each batch, before its step.
        wall_time: ``[steps]`` cumulative timed seconds after each step.
        eval_step, eval_epoch, eval_wall_time, eval_train_loss, eval_test_loss: at each
            evaluation point (step 0 — the initial model — then every ``eval_every``
            steps and the last step): the step count, the epochs done (steps /
            steps_per_epoch), the timed seconds so far, the mean loss over the training
            inputs (the first ``eval_train_limit``) and over the test set (``None`` when
            there is none), in ``model.eval()`` mode.
        status: ``"ok"``, ``"diverged"`` (a non-finite loss stopped it), ``"early_stopped"``
            or ``"failed"`` (a step raised; ``error`` says what, and the other runs go on).
        error: ``"<ExceptionType>: <message>"`` of a failed run, else ``None``.
        grid: the grid search that chose the learning rate / damping, if any.
        versions: python, torch, numpy, curvlib, platform, torch threads.
    """

    problem: str
    method: str
    method_description: str
    problem_description: str
    hyperparameters: dict[str, Any]
    preconditioner_config: dict[str, Any] | None
    optimizer: str
    seed: int
    batch_size: int
    steps_planned: int
    steps_per_epoch: int
    n_train: int
    n_test: int
    small: bool
    loss_unit: str | None = None
    train_loss: list[float] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_epoch: list[float] = field(default_factory=list)
    eval_wall_time: list[float] = field(default_factory=list)
    eval_train_loss: list[float | None] = field(default_factory=list)
    eval_test_loss: list[float | None] = field(default_factory=list)
    status: str = "ok"
    error: str | None = None
    grid: dict[str, Any] | None = None
    versions: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_done(self) -> int:
        return len(self.train_loss)

    @property
    def final_train_loss(self) -> float | None:
        """The training loss at the last evaluation (``None`` if it diverged there)."""
        return self.eval_train_loss[-1] if self.eval_train_loss else None

    @property
    def final_test_loss(self) -> float | None:
        return self.eval_test_loss[-1] if self.eval_test_loss else None

    @property
    def total_time(self) -> float:
        return self.wall_time[-1] if self.wall_time else 0.0

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data (non-finite numbers become ``null``)."""
        data = dataclasses.asdict(self)
        data = {"schema": RUN_SCHEMA, **data}
        data["final"] = {
            "train_loss": self.final_train_loss,
            "test_loss": self.final_test_loss,
            "steps": self.steps_done,
            "wall_time": self.total_time,
        }
        return _finite(data)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def versions() -> dict[str, Any]:
    """Versions of what produced the numbers: python, torch, numpy, curvlib, platform, threads."""
    import numpy

    try:
        from importlib.metadata import version

        curvlib_version = version("curvlib")
    except Exception:  # not installed (running from a source tree)
        curvlib_version = "?"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "curvlib": curvlib_version,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }


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
    :attr:`BenchConfig.warmup_steps`); its own generators, nothing recorded."""
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
        the :class:`RunRecord`; a non-finite loss stops the run with ``status="diverged"``.
    """
    if registry is None:
        from curvlib.plugins import load_registry

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
    progress.finish(label, record.status, record.final_train_loss)
    return record


# --------------------------------------------------------------------------- the whole job


@dataclass
class BenchResult:
    """What :func:`run_bench` produced: the records, the summary and the files written."""

    config: BenchConfig
    out: Path
    records: list[RunRecord]
    summary: dict[str, Any]
    grids: dict[tuple[str, str], Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def default_out(name: str | None = None) -> Path:
    """``results/bench/<name>``, ``<name>`` defaulting to a UTC timestamp."""
    stamp = name or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("results") / "bench" / stamp


def build_problem(config: BenchConfig, name: str) -> Problem:
    """The problem ``name`` with the config's ``small``, ``seed``, ``path`` and ``batch_size``."""
    problem = PROBLEMS[name](small=config.small, seed=config.seed, path=config.path)
    if config.batch_size is not None:
        problem = dataclasses.replace(problem, batch_size=min(config.batch_size, problem.dataset.n_train))
    return problem


def _run_steps(config: BenchConfig, problem: Problem) -> int:
    if config.epochs is not None:
        return config.epochs * steps_per_epoch(problem)
    return config.steps if config.steps is not None else DEFAULT_STEPS


def resolve_methods(config: BenchConfig, registry: Any, problem: Problem | None = None
                    ) -> list[tuple[Method, MethodConfig]]:
    """The methods run on ``problem`` (:meth:`BenchConfig.methods_for`; without a problem:
    the configured ones, else :data:`DEFAULT_METHODS`) resolved against ``registry``."""
    if problem is not None:
        entries = config.methods_for(problem)
    else:
        entries = config.methods or tuple(MethodConfig(name=m) for m in DEFAULT_METHODS)
    return [(resolve_method(entry.name, registry), entry) for entry in entries]


def run_bench(
    config: BenchConfig,
    *,
    registry: Any = None,
    progress: ProgressReporter | None = None,
    out: str | Path | None = None,
    echo: Callable[[str], None] | None = None,
) -> BenchResult:
    """Run the benchmark described by ``config`` and write the results directory.

    Layout of ``out`` (default ``config.out``, else :func:`default_out`)::

        config.json                     the resolved configuration and versions
        runs/<problem>__<method>.json   one RunRecord per run
        grid/<problem>__<method>.json   the grid search of each method (with grid)
        <problem>_train_loss_vs_epoch.png, <problem>_train_loss_vs_time.png,
        <problem>_test_loss_vs_epoch.png
        summary.json, summary.txt       the summary table (also printed through ``echo``)

    Args:
        registry: plugin registry (default: :func:`curvlib.plugins.load_registry`);
            any approximator kind in it is a method name.
        progress: a :class:`ProgressReporter` (default: from ``config.progress``).
        echo: prints the summary table (default: nothing is printed).

    Raises:
        UnknownKindError: a method name is not valid (before anything runs).
        OptimizerUnavailableError: a natural-gradient method without ``curvlib.optim``.
    """
    from curvlib.bench import grid as grid_mod
    from curvlib.bench import report

    if registry is None:
        from curvlib.plugins import load_registry

        registry = load_registry()
    if config.methods is not None:
        resolve_methods(config, registry)  # a misspelt name fails before any data is loaded
    problems = [build_problem(config, name) for name in config.problems]
    methods = {problem.name: resolve_methods(config, registry, problem) for problem in problems}
    out_dir = Path(out) if out is not None else (Path(config.out) if config.out else default_out(config.name))
    out_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    own_progress = progress is None
    progress = progress if progress is not None else make_progress(config.progress)
    files: list[Path] = []
    records: list[RunRecord] = []
    grids: dict[tuple[str, str], Any] = {}
    try:
        config_path = out_dir / "config.json"
        config_path.write_text(json.dumps({
            "config": config.model_dump(mode="json"),
            "methods_by_problem": {name: [entry.name for _, entry in run] for name, run in methods.items()},
            "versions": versions(),
        }, indent=1) + "\n")
        files.append(config_path)
        for problem in problems:
            steps = _run_steps(config, problem)
            warm_up(problem, config.warmup_steps)
            for method, entry in methods[problem.name]:
                hp = config.hyperparameters(method, entry, problem)
                grid_info = None
                if config.grid is not None:
                    grid_steps = config.grid.steps or max(10, steps // 4)
                    result = grid_mod.grid_search(
                        problem, method, hp, lrs=config.grid.lr,
                        dampings=config.grid.damping if method.is_natural_gradient else (None,),
                        steps=grid_steps, seed=config.seed, registry=registry, progress=progress,
                        eval_train_limit=config.eval_train_limit,
                    )
                    grids[(problem.name, method.name)] = result
                    files.append(result.write(out_dir / "grid" / f"{_safe(problem.name)}__{_safe(method.name)}.json"))
                    hp = result.best_hyperparameters
                    grid_info = result.choice()
                    progress.message(f"[{problem.name} {method.name}] grid: {result.describe_choice()}")
                record = train(
                    problem, method, hp, steps=steps, seed=config.seed, registry=registry,
                    eval_every=config.eval_every, patience=config.patience,
                    eval_train_limit=config.eval_train_limit, progress=progress,
                    label=f"{problem.name} {method.name}", small=config.small,
                )
                record.grid = grid_info
                records.append(record)
                files.append(record.write(out_dir / "runs" / f"{_safe(problem.name)}__{_safe(method.name)}.json"))
    finally:
        if own_progress:
            progress.close()
        torch.set_num_threads(threads_before)
    summary = report.summarize(records, target_loss=config.target_loss, target_margin=config.target_margin)
    summary_path = out_dir / "summary.json"
    summary_path.write_text(json.dumps({"schema": SUMMARY_SCHEMA, **summary}, indent=1, allow_nan=False) + "\n")
    files.append(summary_path)
    table = report.format_summary(summary)
    (out_dir / "summary.txt").write_text(table + "\n")
    files.append(out_dir / "summary.txt")
    if config.plots:
        files.extend(report.plot_runs(records, out_dir))
    if echo is not None:
        echo(table)
    return BenchResult(config=config, out=out_dir, records=records, summary=summary, grids=grids, files=files)
