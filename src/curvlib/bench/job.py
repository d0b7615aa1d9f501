"""The whole ``curvlib bench`` job: every method on every problem, and the results directory.

* :func:`run_bench` — for each problem, an optional grid search per method
  (:mod:`curvlib.bench.grid`), the timed runs (:func:`~curvlib.bench.training.train`), one
  JSON per run and the summary of the runs finished so far (``summary.json``,
  ``summary.txt``, rewritten atomically after every run), then the plots
  (:mod:`curvlib.bench.report`);
* :class:`BenchInterrupted` — the ``KeyboardInterrupt`` that stopped a job, with what it
  had finished;
* :func:`build_problem`, :func:`resolve_methods` — the problems and methods a
  :class:`~curvlib.bench.settings.BenchConfig` names, built and resolved;
* :class:`BenchResult` — what the job produced.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvlib.bench import report
from curvlib.bench.grid import grid_search, grid_shard
from curvlib.bench.methods import Method, resolve_method
from curvlib.bench.problems import PROBLEMS, Problem
from curvlib.bench.progress import ProgressReporter, make_progress
from curvlib.bench.record import RunRecord, versions, write_text_atomic
from curvlib.bench.settings import DEFAULT_METHODS, DEFAULT_STEPS, BenchConfig, MethodConfig, shard_of
from curvlib.bench.tensorboard import require_tensorboard, write_tensorboard
from curvlib.bench.training import steps_per_epoch, train, warm_up
from curvlib.errors import ConfigError
from curvlib.plugins import load_registry

__all__ = [
    "SUMMARY_SCHEMA",
    "BenchInterrupted",
    "BenchResult",
    "build_problem",
    "default_out",
    "resolve_methods",
    "run_bench",
]

SUMMARY_SCHEMA = "curvlib.bench.summary/1"


@dataclass
class BenchResult:
    """What :func:`run_bench` produced: the records, the summary and the files written."""

    config: BenchConfig
    out: Path
    records: list[RunRecord]
    summary: dict[str, Any]
    grids: dict[tuple[str, str], Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


class BenchInterrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` (Ctrl-C, SIGINT) that stopped :func:`run_bench` between or
    during runs. The finished runs' JSON files and the summary of those runs are on disk.

    Attributes:
        finished: runs finished; ``total``: runs planned; ``out``: the results directory;
        result: the :class:`BenchResult` of the finished runs (no plots).
    """

    def __init__(self, finished: int, total: int, out: Path, result: BenchResult) -> None:
        super().__init__(f"interrupted after {finished} of {total} runs; results so far in {out}")
        self.finished, self.total, self.out, self.result = finished, total, out, result


def _prepare_out(out_dir: Path) -> None:
    """Create the results directory, or say why it cannot be one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"out: the results directory {str(out_dir)!r} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"out: cannot create the results directory {str(out_dir)!r}: {exc.strerror or exc}"
        ) from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"out: the results directory {str(out_dir)!r} is not writable")


def _write_summary(out_dir: Path, records: list[RunRecord], config: BenchConfig, total: int) -> tuple[dict[str, Any], str]:
    """Rewrite ``summary.json`` and ``summary.txt`` (atomically) for the runs finished so far."""
    summary = report.summarize(records, target_loss=config.target_loss, target_margin=config.target_margin)
    data = {"schema": SUMMARY_SCHEMA, "runs_finished": len(records), "runs_planned": total, **summary}
    write_text_atomic(out_dir / "summary.json", json.dumps(data, indent=1, allow_nan=False) + "\n")
    table = report.format_summary(summary)
    write_text_atomic(out_dir / "summary.txt", table + "\n")
    return summary, table


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
    """The methods run on ``problem`` (:meth:`~curvlib.bench.settings.BenchConfig.methods_for`;
    without a problem: the configured ones, else :data:`~curvlib.bench.settings.DEFAULT_METHODS`)
    resolved against ``registry``."""
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
        runs/<problem>__<method>.json   one RunRecord per run (``__seed<k>`` added with several seeds)
        grid/<problem>__<method>.json   the grid search of each method (with grid)
        <problem>_train_loss_vs_epoch.png, <problem>_train_loss_vs_time.png,
        <problem>_test_loss_vs_epoch.png
        summary.json, summary.txt       the summary table (also printed through ``echo``),
                                        rewritten after every finished run

    Args:
        registry: plugin registry (default: :func:`curvlib.plugins.load_registry`);
            any approximator kind in it is a method name.
        progress: a :class:`~curvlib.bench.progress.ProgressReporter` (default: from ``config.progress``).
        echo: prints the summary table (default: nothing is printed).

    Every file is written atomically (:func:`~curvlib.bench.record.write_text_atomic`), and
    after every finished run its JSON and the summary of the runs finished so far are on
    disk (``summary.json`` says ``runs_finished`` of ``runs_planned``).

    Raises:
        UnknownKindError: a method name is not valid (before anything runs).
        ConfigError: ``out`` is an existing file, or cannot be created or written.
        OptimizerUnavailableError: a natural-gradient method without ``curvlib.optim``.
        BenchInterrupted: a ``KeyboardInterrupt`` (Ctrl-C) stopped the job; the finished
            runs and their summary are kept.
    """
    if config.tensorboard is not None:
        require_tensorboard()
    if registry is None:
        registry = load_registry()
    if config.methods is not None:
        resolve_methods(config, registry)  # a misspelt name fails before any data is loaded
    out_dir = Path(out) if out is not None else (Path(config.out) if config.out else default_out(config.name))
    _prepare_out(out_dir)  # before any data is loaded: a bad --out fails at once
    problems = [build_problem(config, name) for name in config.problems]
    methods = {problem.name: resolve_methods(config, registry, problem) for problem in problems}
    seeds = [config.seed + k for k in range(config.seeds)]
    total = sum(len(run) for run in methods.values()) * len(seeds)
    threads_before = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    own_progress = progress is None
    progress = progress if progress is not None else make_progress(config.progress)
    files: list[Path] = []
    records: list[RunRecord] = []
    grids: dict[tuple[str, str], Any] = {}
    summary_files = [out_dir / "summary.json", out_dir / "summary.txt"]
    unwritten: tuple[RunRecord, Path] | None = None  # a finished run whose JSON is being written
    try:
        config_path = out_dir / "config.json"
        write_text_atomic(config_path, json.dumps({
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
                if config.grid is not None and config.grid.shard is not None:  # this shard's points only
                    done = grid_shard(
                        problem, method, hp, shard=shard_of(config.grid.shard), cache=config.grid.cache,
                        lrs=config.grid.lr, dampings=config.grid.damping if method.is_natural_gradient else (None,),
                        steps=config.grid.steps or max(10, steps // 4), seed=config.seed, registry=registry,
                        progress=progress, eval_train_limit=config.eval_train_limit, kl_clips=config.grid.kl_clip,
                        small=config.small,
                    )
                    grids[(problem.name, method.name)] = done
                    progress.message(f"[{problem.name} {method.name}] {done.describe()}")
                    continue
                if config.grid is not None:
                    grid_steps = config.grid.steps or max(10, steps // 4)
                    result = grid_search(
                        problem, method, hp, lrs=config.grid.lr,
                        dampings=config.grid.damping if method.is_natural_gradient else (None,),
                        steps=grid_steps, seed=config.seed, registry=registry, progress=progress,
                        eval_train_limit=config.eval_train_limit, kl_clips=config.grid.kl_clip,
                        cache=config.grid.cache or out_dir / "grid" / "cache", small=config.small,
                    )
                    grids[(problem.name, method.name)] = result
                    files.append(result.write(out_dir / "grid" / f"{_safe(problem.name)}__{_safe(method.name)}.json"))
                    hp = result.best_hyperparameters
                    grid_info = result.choice()
                    progress.message(f"[{problem.name} {method.name}] grid: {result.describe_choice()}")
                for seed in seeds:
                    several = len(seeds) > 1
                    record = train(
                        problem, method, hp, steps=steps, seed=seed, registry=registry,
                        eval_every=config.eval_every, patience=config.patience,
                        eval_train_limit=config.eval_train_limit, progress=progress,
                        label=f"{problem.name} {method.name}{f' seed {seed}' if several else ''}", small=config.small,
                    )
                    record.grid = grid_info
                    # the record counts as finished from here on: an interrupt below still writes it
                    records.append(record)
                    name = f"{_safe(problem.name)}__{_safe(method.name)}{f'__seed{seed}' if several else ''}.json"
                    path = out_dir / "runs" / name
                    unwritten = (record, path)
                    files.append(record.write(path))
                    unwritten = None
                    _write_summary(out_dir, records, config, total)
    except KeyboardInterrupt as exc:
        if unwritten is not None:  # the interrupt cut the last run's write short (it is atomic)
            files.append(unwritten[0].write(unwritten[1]))
        if records:  # ... or the summary's
            _write_summary(out_dir, records, config, total)
        summary = report.summarize(records, target_loss=config.target_loss, target_margin=config.target_margin)
        partial = BenchResult(config=config, out=out_dir, records=records, summary=summary, grids=grids,
                              files=files + [f for f in summary_files if records])
        raise BenchInterrupted(len(records), total, out_dir, partial) from exc
    finally:
        if own_progress:
            progress.close()
        torch.set_num_threads(threads_before)
    if config.grid is not None and config.grid.shard is not None:  # no main runs: nothing to summarize
        return BenchResult(config=config, out=out_dir, records=[], summary={}, grids=grids, files=files)
    summary, table = _write_summary(out_dir, records, config, total)
    files.extend(summary_files)
    if config.plots:
        files.extend(report.plot_runs(records, out_dir))
    if config.tensorboard is not None:
        files.extend(write_tensorboard(records, config.tensorboard))
    if echo is not None:
        echo(table)
    return BenchResult(config=config, out=out_dir, records=records, summary=summary, grids=grids, files=files)
