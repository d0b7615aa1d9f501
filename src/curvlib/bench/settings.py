"""The settings of a ``curvlib bench`` run: what a ``--config`` file and the command-line
options fill in.

* :class:`BenchConfig` — everything one benchmark run needs, validated;
* :class:`MethodConfig` — one method with its own settings;
* :class:`GridSettings` — the grid search run before the main runs;
* :func:`load_config_file` — a ``--config`` file (YAML or JSON) as a mapping;
* :data:`DEFAULT_PROBLEMS`, :data:`DEFAULT_METHODS`, :data:`DEFAULT_STEPS` — what a bare
  ``curvlib bench`` runs.

A method's hyperparameters are layered (:meth:`BenchConfig.hyperparameters`): its own
:class:`MethodConfig` entry, then the global values, then the problem's defaults for the
method's family, then the method's own defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from curvlib.bench.grid import THESIS_GRID_3_3_2, THESIS_KL_CLIPS
from curvlib.bench.methods import Hyperparameters, Method
from curvlib.bench.problems import PROBLEMS, Problem
from curvlib.config import FrozenDict, StrictModel, load_config_mapping, validate_options
from curvlib.errors import ConfigError

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_PROBLEMS",
    "DEFAULT_STEPS",
    "PROTOCOLS",
    "BenchConfig",
    "GridSettings",
    "MethodConfig",
    "load_config_file",
    "with_protocol",
]

#: Problems and methods of a bare ``curvlib bench``: the thesis's MNIST auto-encoder
#: (``small=True``) with the baselines and the KFAC family of chapter 3. A problem that
#: names its own :attr:`~curvlib.bench.problems.Problem.default_methods` (``char_lm``,
#: ``mnist_resnet``) runs those instead when no methods are given.
DEFAULT_PROBLEMS: tuple[str, ...] = ("mnist_autoencoder",)
DEFAULT_METHODS: tuple[str, ...] = ("sgd", "adam", "kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected")
DEFAULT_STEPS = 200

#: The §3.3.2 learning rates from 10⁻³ up, for the reduced protocol (2-core machines).
_REDUCED_LR: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)

#: ``curvlib bench --protocol NAME``: the thesis's training protocol (§3.3.2, §4.3) as the
#: bottom layer of the settings — a ``--config`` file and the command line go on top.
#: Both: T1 = T2 = 100, γ = 0.95, 1,000 steps evaluated every 20, 3 seeds, early stopping
#: after 10 evaluations without improvement (§4.3, counted in evaluations), and a grid search
#: per method selecting by the training loss (SGD keeps momentum 0.9). ``thesis`` searches
#: lr ∈ {10⁻³, 3·10⁻³, …, 1} × λ ∈ {10⁻³, 10⁻², 10⁻¹} × c ∈ {10⁻², 10⁻³} with 100-step trials
#: (42 points per natural-gradient method); ``thesis-full`` the whole §3.3.2 grid, lr and λ
#: ∈ {10⁻⁴, 3·10⁻⁴, …, 3·10⁻¹} × c (128 points), for machines with time or a GPU.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "thesis": {
        "steps": 1000, "eval_every": 20, "seeds": 3, "patience": 10,
        "update_every": 100, "invert_every": 100, "ema": 0.95,
        "grid": {"lr": _REDUCED_LR, "damping": (1e-3, 1e-2, 1e-1), "kl_clip": THESIS_KL_CLIPS, "steps": 100},
    },
    "thesis-full": {
        "steps": 1000, "eval_every": 20, "seeds": 3, "patience": 10,
        "update_every": 100, "invert_every": 100, "ema": 0.95,
        "grid": {"lr": THESIS_GRID_3_3_2, "damping": THESIS_GRID_3_3_2, "kl_clip": THESIS_KL_CLIPS, "steps": 100},
    },
}


def with_protocol(name: str | None, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a config file's mapping, then the command line) on top of protocol ``name``:
    keys of ``data`` win, a ``grid`` mapping is merged key by key."""
    if name is None:
        return dict(data)
    if name not in PROTOCOLS:
        raise ConfigError(f"--protocol: expected one of {list(PROTOCOLS)}, got {name!r}")
    out = {**PROTOCOLS[name], **data}
    if isinstance(data.get("grid"), Mapping):
        out["grid"] = {**PROTOCOLS[name]["grid"], **data["grid"]}
    elif data.get("grid") is True:
        out["grid"] = dict(PROTOCOLS[name]["grid"])
    return out


class MethodConfig(StrictModel):
    """One method with its own settings (unset fields fall back to the global ones, then
    to the method's defaults). In a config file a bare string is the name alone.

    Attributes mirror :class:`~curvlib.bench.methods.Hyperparameters`; ``name`` is a
    method name (:func:`~curvlib.bench.methods.resolve_method`). The ``*_options``
    mappings are stored read-only (:class:`~curvlib.config.FrozenDict`).
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
    background_inversion: bool | None = None
    approximator_options: FrozenDict | None = None
    coarse_options: FrozenDict | None = None
    fallback: Literal["sgd", "adam"] | None = None
    optimizer_options: FrozenDict | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    def overrides(self) -> dict[str, Any]:
        """The hyperparameters this entry sets (``None`` fields left out), as plain values."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and v is not None}


#: The BenchConfig fields that are hyperparameters of every method.
_GLOBAL_HP = ("lr", "damping", "damping_kind", "momentum", "weight_decay", "kl_clip",
              "update_every", "invert_every", "ema", "mc_samples", "background_inversion")


class GridSettings(StrictModel):
    """The grid search run before the main runs (``--grid``; :mod:`curvlib.bench.grid`).

    Attributes:
        lr: learning rates tried (default: the §3.3.2 grid).
        damping: dampings tried for the natural-gradient methods (default: the §3.3.2
            grid); the baselines search ``lr`` only.
        steps: length of each trial run; ``None``: a quarter of the main run's steps
            (at least 10).
        kl_clip: KL clipping constants c tried for the natural-gradient methods (§3.3.2:
            :data:`~curvlib.bench.grid.THESIS_KL_CLIPS`); ``None``: not searched.
        cache: the folder of finished grid points (:mod:`curvlib.bench.grid`); ``None``:
            ``grid/cache`` in the results directory (a run resumed into the same ``--out``
            reuses its points).
        shard: ``"i/n"``: train only shard i of n of every grid (every n-th point, from the
            i-th) into ``cache`` and stop there, no main runs — n jobs on one cache folder train
            the grid in parallel; a run without ``shard`` on that cache then chooses
            (:func:`~curvlib.bench.grid.grid_shard`). Needs ``cache``.
    """

    lr: tuple[float, ...] = THESIS_GRID_3_3_2
    damping: tuple[float, ...] = THESIS_GRID_3_3_2
    steps: int | None = Field(None, ge=1)
    kl_clip: tuple[float, ...] | None = None
    cache: str | None = None
    shard: str | None = None

    @field_validator("shard")
    @classmethod
    def _shard(cls, value: str | None) -> str | None:
        if value is not None:
            shard_of(value)
        return value

    @model_validator(mode="after")
    def _shard_needs_cache(self) -> GridSettings:
        if self.shard is not None and self.cache is None:
            raise ValueError("a grid shard writes its points into the cache the other shards and the final run "
                             "read: give the grid a cache folder (--grid-cache DIR), the same for every shard")
        return self

    @field_validator("lr", "damping", "kl_clip")
    @classmethod
    def _positive(cls, values: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if values is None:
            return None
        if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError(f"a grid needs at least one value, all positive and finite; got {list(values)}")
        return values


def shard_of(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with 1 ≤ i ≤ n (a grid shard, :class:`GridSettings`)."""
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"a grid shard is written i/n (e.g. 1/2), got {text!r}") from None
    if not 1 <= i <= n:
        raise ValueError(f"a grid shard i/n needs 1 ≤ i ≤ n, got {text!r}")
    return i, n


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
        invert_every, ema, mc_samples, background_inversion: global hyperparameters, for every
            method that does not set its own (``lr``/``damping``: ``None`` keeps the method defaults).
        seed: seeds the model weights, the batch order, the Monte Carlo draws and the data split.
        seeds: runs per method: seeds ``seed``, ``seed + 1``, … (weights, batch order and draws;
            the data split stays ``seed``'s); the summary reports medians over them and the
            plots the median curve with the seeds' range.
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
        tensorboard: a directory to also write TensorBoard scalars to (needs ``tensorboard``).
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
    background_inversion: bool | None = None
    seed: int = 0
    seeds: int = Field(1, ge=1)
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
    tensorboard: str | None = None
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
            for key in ("damping", "damping_kind", "kl_clip", "update_every", "invert_every", "ema", "mc_samples",
                        "background_inversion"):
                values.pop(key, None)
        values.update(entry.overrides())
        try:
            return method.default_hyperparameters(**values)
        except Exception as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"method {method.name!r}: invalid settings {values}: {exc}") from exc


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a ``--config`` file: JSON (``.json``) or YAML (any other suffix; needs PyYAML).

    The shared reader :func:`curvlib.config.load_config_mapping`: YAML 1.2 floats
    (``lr: 1e-3`` is a number), an empty file is an empty mapping, and a missing path, a
    directory, a binary file, a syntax error (with its line), a key given twice or a top
    level that is not a mapping raise :class:`~curvlib.errors.ConfigError` naming the file.
    """
    return load_config_mapping(path, who="config file")
