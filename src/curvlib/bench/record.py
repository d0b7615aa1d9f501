"""The record of one benchmark run: its curves, its settings, and what produced them.

* :class:`RunRecord` — one method on one problem, written as one JSON file
  (``runs/<problem>__<method>.json``, schema :data:`RUN_SCHEMA`) and read back by
  :meth:`RunRecord.from_json`;
* :func:`versions` — the versions of python, torch, numpy and curvlib stored with it;
* :func:`write_text_atomic` — how every results file is written: to a temporary file in
  the same directory, then renamed over the target, so that an interrupted job never
  leaves a half-written file.

Non-finite numbers (a diverged loss) are written as ``null``, so every file is strict JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy
import torch

__all__ = ["RUN_SCHEMA", "RunRecord", "plain_metrics", "versions", "write_text_atomic"]

RUN_SCHEMA = "curvlib.bench.run/1"


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
        optimizer_metrics: ``[steps]`` the natural-gradient optimizer's per-step metrics
            (:attr:`curvlib.optim.NaturalGradient.metrics`: damping, KL scale, refresh and
            inversion seconds, factor condition numbers at inversions, fallback counts);
            empty for SGD/Adam.
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
    optimizer_metrics: list[dict[str, Any]] = field(default_factory=list)
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
        """Write the record's JSON to ``path`` (atomically: :func:`write_text_atomic`)."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``: to a temporary file in the same directory, then
    ``os.replace`` onto ``path``, so that a reader — or a job killed half-way — sees the old
    file or the new one, never a part. Creates the parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkstemp: its 0600 mode would make every results file private
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
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
    try:
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


def plain_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer's metrics dict as JSON values: 0-d tensors -> floats, tuples -> lists
    (read back after the timed loop, so the conversion adds no host synchronisation to a step)."""

    def plain(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return float(v)
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return _finite(plain(metrics))
