"""Grid search of the learning rate and the damping, as in the thesis's experiments.

§3.3.2 searches α and λ in {10⁻¹, 10⁻², 10⁻³, 10⁻⁴, 3·10⁻¹, 3·10⁻², 3·10⁻³, 3·10⁻⁴}
(:data:`THESIS_GRID_3_3_2`, the default) and keeps "hyperparameters that gave a better
reduction to the training loss"; §4.3 searches both in {10⁻⁴, …, 10⁴}
(:data:`THESIS_GRID_4_3`). Damping is searched for the natural-gradient methods only;
SGD and Adam search the learning rate.

Here every grid point is a short run (:func:`curvlib.bench.training.train`, same seed,
same batch order, same initial weights) and the point with the lowest final training
loss wins; a diverged run counts as +∞, ties go to the first point in grid order
(learning rates outer, dampings inner, both as given).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from curvlib.bench.methods import Hyperparameters, Method
from curvlib.bench.problems import Problem
from curvlib.bench.progress import ProgressReporter
from curvlib.bench.training import train

__all__ = ["THESIS_GRID_3_3_2", "THESIS_GRID_4_3", "GridPoint", "GridResult", "grid_search"]

#: The learning-rate and damping grid of the thesis's §3.3.2:
#: {10⁻¹, 10⁻², 10⁻³, 10⁻⁴, 3·10⁻¹, 3·10⁻², 3·10⁻³, 3·10⁻⁴}.
THESIS_GRID_3_3_2: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)

#: §4.3: {10⁻⁴, 10⁻³, …, 10³, 10⁴}.
THESIS_GRID_4_3: tuple[float, ...] = tuple(10.0**k for k in range(-4, 5))

GRID_SCHEMA = "curvlib.bench.grid/1"


@dataclass(frozen=True)
class GridPoint:
    """One trial: its learning rate, damping (``None`` for SGD/Adam), final training loss
    (``None`` if it diverged), status and steps run."""

    lr: float
    damping: float | None
    final_train_loss: float | None
    status: str
    steps: int

    @property
    def score(self) -> float:
        """What the search minimizes: the final training loss, +∞ when diverged."""
        loss = self.final_train_loss
        return loss if loss is not None and math.isfinite(loss) else math.inf


@dataclass
class GridResult:
    """The outcome of :func:`grid_search` for one method on one problem."""

    problem: str
    method: str
    steps: int
    lrs: tuple[float, ...]
    dampings: tuple[float | None, ...]
    points: list[GridPoint]
    base: Hyperparameters
    best: GridPoint = field(init=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("GridResult needs at least one point")
        self.best = min(self.points, key=lambda p: p.score)  # min keeps the first of equal scores

    @property
    def all_diverged(self) -> bool:
        return all(math.isinf(p.score) for p in self.points)

    @property
    def best_hyperparameters(self) -> Hyperparameters:
        """``base`` with the chosen learning rate (and damping)."""
        update: dict[str, Any] = {"lr": self.best.lr}
        if self.best.damping is not None:
            update["damping"] = self.best.damping
        return self.base.model_copy(update=update)

    def choice(self) -> dict[str, Any]:
        """What the main run records about the search."""
        return {
            "lr": self.best.lr,
            "damping": self.best.damping,
            "final_train_loss": self.best.final_train_loss,
            "steps": self.steps,
            "points": len(self.points),
            "lrs": list(self.lrs),
            "dampings": list(self.dampings),
            "all_diverged": self.all_diverged,
        }

    def describe_choice(self) -> str:
        damping = "" if self.best.damping is None else f", damping {self.best.damping:g}"
        loss = "diverged" if self.best.final_train_loss is None else f"{self.best.final_train_loss:.5g}"
        note = " (every point diverged: kept the first)" if self.all_diverged else ""
        return f"lr {self.best.lr:g}{damping} (training loss {loss} after {self.steps} steps, " \
               f"{len(self.points)} points){note}"

    def to_json(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            return None if isinstance(x, float) and not math.isfinite(x) else x

        return {
            "schema": GRID_SCHEMA,
            "problem": self.problem,
            "method": self.method,
            "steps": self.steps,
            "base_hyperparameters": self.base.model_dump(mode="json"),
            "points": [{k: clean(v) for k, v in asdict(p).items()} for p in self.points],
            "choice": self.choice(),
        }

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")
        return path


def grid_search(
    problem: Problem,
    method: Method,
    base: Hyperparameters,
    *,
    lrs: Sequence[float] = THESIS_GRID_3_3_2,
    dampings: Sequence[float | None] | None = None,
    steps: int,
    seed: int = 0,
    registry: Any = None,
    progress: ProgressReporter | None = None,
    eval_train_limit: int | None = 10_000,
) -> GridResult:
    """Try every (learning rate, damping) pair for ``steps`` steps; keep the lowest final
    training loss (module docstring).

    Args:
        base: the other hyperparameters, kept fixed.
        lrs: learning rates to try.
        dampings: dampings to try; ``None``: the §3.3.2 grid for natural-gradient
            methods and no damping for SGD/Adam. ``(None,)`` keeps ``base.damping``.
        steps: length of each trial; ``seed``, ``registry``: as for :func:`~curvlib.bench.training.train`.
        progress: receives one update per trial, under the label ``"<problem> <method> grid"``.
    """
    if dampings is None:
        dampings = THESIS_GRID_3_3_2 if method.is_natural_gradient else (None,)
    if not method.is_natural_gradient:
        dampings = (None,)
    lrs, dampings = tuple(lrs), tuple(dampings)
    progress = progress or ProgressReporter()
    label = f"{problem.name} {method.name} grid"
    total = len(lrs) * len(dampings)
    progress.start(label, total)
    points: list[GridPoint] = []
    best = math.inf
    spent = 0.0
    for lr in lrs:
        for damping in dampings:
            update: dict[str, Any] = {"lr": lr}
            if damping is not None:
                update["damping"] = damping
            hp = base.model_copy(update=update)
            record = train(problem, method, hp, steps=steps, seed=seed, registry=registry, eval_every=steps,
                           eval_train_limit=eval_train_limit)
            loss = record.final_train_loss
            points.append(GridPoint(lr=lr, damping=damping if damping is not None else None,
                                    final_train_loss=loss if loss is not None and math.isfinite(loss) else None,
                                    status=record.status, steps=record.steps_done))
            best = min(best, points[-1].score)
            spent += record.total_time
            progress.update(label, len(points), best, spent)
    result = GridResult(problem=problem.name, method=method.name, steps=steps, lrs=lrs, dampings=dampings,
                        points=points, base=base)
    progress.finish(label, "ok" if not result.all_diverged else "diverged", result.best.final_train_loss)
    return result
