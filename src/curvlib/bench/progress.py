"""The progress display of ``curvlib bench``: what a run shows while it trains.

* :class:`ProgressReporter` — the interface the runs report to (and the silent default);
* :class:`PlainProgress` — plain lines, for CI logs and pipes;
* :class:`RichProgress` — a live ``rich`` display, one bar per run;
* :func:`make_progress` — the reporter for a ``progress`` setting (``"auto"`` picks one).

Each line or bar shows the run's step, its last batch loss, the timed training seconds
so far and an ETA from them; the display itself is never timed.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from curvlib.errors import ConfigError

__all__ = ["PlainProgress", "ProgressReporter", "RichProgress", "make_progress"]


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
        # rich is an optional dependency (the bench extra): imported only when a live display is wanted
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
    stream = stream if stream is not None else sys.stdout
    if mode == "none":
        return ProgressReporter()
    if mode == "auto":
        tty = bool(getattr(stream, "isatty", lambda: False)())
        mode = "rich" if tty and not os.environ.get("CI") else "plain"
    if mode == "rich":
        try:
            # rich is optional: without it "rich" falls back to plain lines
            from rich.console import Console
        except ImportError:
            return PlainProgress(stream)
        return RichProgress(Console(file=stream))
    if mode == "plain":
        return PlainProgress(stream)
    raise ConfigError(f"progress must be 'auto', 'rich', 'plain' or 'none', got {mode!r}")
