"""Grid search of the learning rate and the damping, as in the thesis's experiments.

§3.3.2 searches α and λ in {10⁻¹, 10⁻², 10⁻³, 10⁻⁴, 3·10⁻¹, 3·10⁻², 3·10⁻³, 3·10⁻⁴}
(:data:`THESIS_GRID_3_3_2`, the default) and keeps "hyperparameters that gave a better
reduction to the training loss"; §4.3 searches both in {10⁻⁴, …, 10⁴}
(:data:`THESIS_GRID_4_3`). Damping is searched for the natural-gradient methods only;
SGD and Adam search the learning rate.

§3.3.2 also tries the KL clipping constant c ∈ {10⁻², 10⁻³} (``kl_clips``, natural gradient
only; :data:`THESIS_KL_CLIPS`).

Here every grid point is a short run (:func:`curvlib.bench.training.train`, same seed,
same batch order, same initial weights) and the point with the lowest final training
loss wins; a diverged run counts as +∞, ties go to the first point in grid order
(learning rates outer, then dampings, then KL clips, each as given).

With a ``cache`` folder every finished point is kept there as one JSON file named by a hash
of everything the trial depends on (problem and its size, method, hyperparameters, steps,
seed, evaluation size, curvlib version): a grid stopped half-way, or run again with more
values, or a second grid sharing points, trains only the points it has not seen. The same
cache lets a grid be trained in parallel: :func:`grid_shard` trains every n-th point, so n
jobs on one cache folder share the work, and the search on that cache then only chooses.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from curvlib.bench.methods import Hyperparameters, Method
from curvlib.bench.problems import Problem
from curvlib.bench.progress import ProgressReporter
from curvlib.bench.record import write_text_atomic
from curvlib.bench.training import train

__all__ = ["THESIS_GRID_3_3_2", "THESIS_GRID_4_3", "THESIS_KL_CLIPS", "GridPoint", "GridResult", "GridShard",
           "grid_search", "grid_shard"]

#: The learning-rate and damping grid of the thesis's §3.3.2:
#: {10⁻¹, 10⁻², 10⁻³, 10⁻⁴, 3·10⁻¹, 3·10⁻², 3·10⁻³, 3·10⁻⁴}.
THESIS_GRID_3_3_2: tuple[float, ...] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)

#: §4.3: {10⁻⁴, 10⁻³, …, 10³, 10⁴}.
THESIS_GRID_4_3: tuple[float, ...] = tuple(10.0**k for k in range(-4, 5))

#: §3.3.2's KL clipping constants c.
THESIS_KL_CLIPS: tuple[float, ...] = (1e-2, 1e-3)

GRID_SCHEMA = "curvlib.bench.grid/1"


@dataclass(frozen=True)
class GridPoint:
    """One trial: its learning rate, damping (``None`` for SGD/Adam), final training loss
    (``None`` if it diverged), status, steps run and KL clip c (``None``: the base's)."""

    lr: float
    damping: float | None
    final_train_loss: float | None
    status: str
    steps: int
    kl_clip: float | None = None

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
    kl_clips: tuple[float | None, ...] = (None,)
    cached: int = 0
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
        return self.base.model_copy(update=_update(self.best.lr, self.best.damping, self.best.kl_clip))

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
            "kl_clip": self.best.kl_clip,
            "kl_clips": list(self.kl_clips),
            "cached_points": self.cached,
            "all_diverged": self.all_diverged,
        }

    def describe_choice(self) -> str:
        damping = "" if self.best.damping is None else f", damping {self.best.damping:g}"
        damping += "" if self.best.kl_clip is None else f", KL clip {self.best.kl_clip:g}"
        loss = "diverged" if self.best.final_train_loss is None else f"{self.best.final_train_loss:.5g}"
        note = " (every point diverged: kept the first)" if self.all_diverged else ""
        cached = f", {self.cached} from the cache" if self.cached else ""
        return f"lr {self.best.lr:g}{damping} (training loss {loss} after {self.steps} steps, " \
               f"{len(self.points)} points{cached}){note}"

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
    kl_clips: Sequence[float | None] | None = None,
    cache: str | Path | None = None,
    small: bool | None = None,
) -> GridResult:
    """Try every (learning rate, damping, KL clip) for ``steps`` steps; keep the lowest final
    training loss (module docstring).

    Args:
        base: the other hyperparameters, kept fixed.
        lrs: learning rates to try.
        dampings: dampings to try; ``None``: the §3.3.2 grid for natural-gradient
            methods and no damping for SGD/Adam. ``(None,)`` keeps ``base.damping``.
        steps: length of each trial; ``seed``, ``registry``: as for :func:`~curvlib.bench.training.train`.
        progress: receives one update per trial, under the label ``"<problem> <method> grid"``.
        kl_clips: KL clipping constants c to try (natural gradient only); ``None``: the base's.
        cache: a folder of finished points (module docstring); ``None``: none.
        small: the problem's size, part of the cache key.
    """
    grid = _Grid(problem, method, base, lrs, dampings, kl_clips, steps, seed, registry, eval_train_limit, cache, small)
    progress = progress or ProgressReporter()
    label = f"{problem.name} {method.name} grid"
    progress.start(label, len(grid.updates))
    points: list[GridPoint] = []
    best = math.inf
    for update in grid.updates:
        points.append(grid.point(update))
        best = min(best, points[-1].score)
        progress.update(label, len(points), best, grid.spent)
    result = GridResult(problem=problem.name, method=method.name, steps=steps, lrs=grid.lrs, dampings=grid.dampings,
                        points=points, base=base, kl_clips=grid.kl_clips, cached=grid.cached)
    progress.finish(label, "ok" if not result.all_diverged else "diverged", result.best.final_train_loss)
    return result


@dataclass(frozen=True)
class GridShard:
    """What :func:`grid_shard` did: its points trained, found in the cache, and left to the others."""

    problem: str
    method: str
    shard: tuple[int, int]
    trained: int
    cached: int
    left: int

    def describe(self) -> str:
        i, n = self.shard
        return (f"grid shard {i}/{n}: {self.trained} point(s) trained, {self.cached} found in the cache, "
                f"{self.left} left to the other shards")


def grid_shard(problem: Problem, method: Method, base: Hyperparameters, *, shard: tuple[int, int],
               cache: str | Path, lrs: Sequence[float] = THESIS_GRID_3_3_2,
               dampings: Sequence[float | None] | None = None, steps: int, seed: int = 0, registry: Any = None,
               progress: ProgressReporter | None = None, eval_train_limit: int | None = 10_000,
               kl_clips: Sequence[float | None] | None = None, small: bool | None = None) -> GridShard:
    """Shard ``i`` of ``n`` (1-based) of :func:`grid_search`'s points: the points k (grid order,
    from 0) with k mod n = i − 1 that ``cache`` does not hold yet, trained and stored there. ``n``
    jobs on one cache folder — processes, or machines sharing it — train the grid together;
    :func:`grid_search` on that cache then trains nothing and chooses."""
    i, n = shard
    grid = _Grid(problem, method, base, lrs, dampings, kl_clips, steps, seed, registry, eval_train_limit, cache, small)
    mine = [u for k, u in enumerate(grid.updates) if k % n == i - 1]
    progress = progress or ProgressReporter()
    label = f"{problem.name} {method.name} grid {i}/{n}"
    progress.start(label, len(mine))
    best = math.inf
    for k, update in enumerate(mine):
        best = min(best, grid.point(update).score)
        progress.update(label, k + 1, best, grid.spent)
    progress.finish(label, "ok", None if math.isinf(best) else best)
    return GridShard(problem.name, method.name, (i, n), trained=len(mine) - grid.cached, cached=grid.cached,
                     left=len(grid.updates) - len(mine))


class _Grid:
    """The points of one grid (learning rates outer, then dampings, then KL clips) and how one
    is trained, or read from the cache."""

    def __init__(self, problem: Problem, method: Method, base: Hyperparameters, lrs: Sequence[float],
                 dampings: Sequence[float | None] | None, kl_clips: Sequence[float | None] | None, steps: int,
                 seed: int, registry: Any, eval_train_limit: int | None, cache: str | Path | None,
                 small: bool | None) -> None:
        if dampings is None:
            dampings = THESIS_GRID_3_3_2 if method.is_natural_gradient else (None,)
        if not method.is_natural_gradient:
            dampings, kl_clips = (None,), (None,)
        self.lrs, self.dampings, self.kl_clips = tuple(lrs), tuple(dampings), tuple(kl_clips or (None,))
        self.updates = [(lr, d, c) for lr in self.lrs for d in self.dampings for c in self.kl_clips]
        self.problem, self.method, self.base, self.steps, self.seed = problem, method, base, steps, seed
        self.registry, self.eval_train_limit, self.cache, self.small = registry, eval_train_limit, cache, small
        self.spent = 0.0
        self.cached = 0

    def point(self, update: tuple[float, float | None, float | None]) -> GridPoint:
        lr, damping, c = update
        hp = self.base.model_copy(update=_update(lr, damping, c))
        key = _cache_key(self.problem, self.small, self.method, hp, self.steps, self.seed, self.eval_train_limit)
        point = _cached(self.cache, key)
        if point is not None:
            self.cached += 1
            return point
        record = train(self.problem, self.method, hp, steps=self.steps, seed=self.seed, registry=self.registry,
                       eval_every=self.steps, eval_train_limit=self.eval_train_limit)
        loss = record.final_train_loss
        point = GridPoint(lr=lr, damping=damping, kl_clip=c, status=record.status,
                          final_train_loss=loss if loss is not None and math.isfinite(loss) else None,
                          steps=record.steps_done)
        self.spent += record.total_time
        _store(self.cache, key, point)
        return point


def _update(lr: float, damping: float | None, kl_clip: float | None) -> dict[str, Any]:
    update: dict[str, Any] = {"lr": lr}
    if damping is not None:
        update["damping"] = damping
    if kl_clip is not None:
        update["kl_clip"] = kl_clip
    return update


def _cache_key(problem: Problem, small: bool | None, method: Method, hp: Hyperparameters, steps: int, seed: int,
               eval_train_limit: int | None) -> str:
    from curvlib import __version__

    what = {"problem": problem.name, "small": small, "batch_size": problem.batch_size,
            "n_train": problem.dataset.n_train, "method": method.name, "hyperparameters": hp.model_dump(mode="json"),
            "steps": steps, "seed": seed, "eval_train_limit": eval_train_limit, "curvlib": __version__}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _cached(cache: str | Path | None, key: str) -> GridPoint | None:
    """The point stored under ``key``, or ``None`` (no cache, not there, or unreadable: run it again)."""
    if cache is None:
        return None
    path = Path(cache) / f"{key}.json"
    try:
        data = json.loads(path.read_text())
        return GridPoint(**data["point"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store(cache: str | Path | None, key: str, point: GridPoint) -> None:
    if cache is None:
        return
    data = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(point).items()}
    write_text_atomic(Path(cache) / f"{key}.json", json.dumps({"key": key, "point": data}) + "\n")
