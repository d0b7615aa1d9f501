"""What ``curvlib bench`` reports: time-to-target, the summary table, the plots.

* :func:`time_to_target` — the first evaluation point of a curve at or below a target loss;
* :func:`summarize` — per problem, the final training and test losses of each method
  (also in bits when the loss is in nats: bits/char for a character language model),
  the steps and the training time it took to reach the target loss (by default Adam's
  best final training loss × 1.05), and the ratio of each method's time-to-target to
  Adam's; also the time per step relative to SGD's, and the median KL clip factor ν and the
  share of clipped steps of the natural-gradient runs;
* :func:`format_summary` / :func:`rich_summary` — that table as text or as a ``rich`` table;
* :func:`plot_runs` — PNGs, one line per method: training loss vs epoch, training loss
  vs training time, test loss vs epoch (as the thesis's Figure 3.2 and Figure 4.1), and ν and
  λ at every step (whether the clip or the curvature set the step).

The plots use matplotlib's Agg canvas directly (no ``pyplot``, no global backend
change), so they render without a display.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from curvlib.errors import ConfigError

__all__ = [
    "TargetHit",
    "bits_unit",
    "draw_curves",
    "format_summary",
    "plot_panels",
    "plot_runs",
    "rich_summary",
    "summarize",
    "time_to_target",
]

REFERENCE_METHOD = "adam"
STEP_COST_REFERENCE = "sgd"


class TargetHit(tuple):
    """``(index, step, time)`` of the first point of a curve at or below a target."""

    __slots__ = ()

    def __new__(cls, index: int, step: int, time: float) -> TargetHit:
        return super().__new__(cls, (index, step, time))

    @property
    def index(self) -> int:
        return self[0]

    @property
    def step(self) -> int:
        return self[1]

    @property
    def time(self) -> float:
        return self[2]


def time_to_target(
    steps: Sequence[int], times: Sequence[float], losses: Sequence[float | None], target: float
) -> TargetHit | None:
    """The first point ``i`` with ``losses[i] <= target`` as ``(i, steps[i], times[i])``.

    The curve is the one evaluated at a few points (the runs' ``eval_*`` lists): no
    interpolation between points, so the answer is exact at the evaluation grid and
    late by at most one evaluation interval. ``None`` losses (divergence) and NaN never
    count as reaching the target. Returns ``None`` when the target is never reached.

    Raises:
        ValueError: the three sequences differ in length, or ``target`` is NaN.
    """
    if not (len(steps) == len(times) == len(losses)):
        raise ValueError(f"time_to_target: steps, times and losses must have one entry per point, got lengths "
                         f"{len(steps)}, {len(times)}, {len(losses)}")
    if target is None or math.isnan(target):
        raise ValueError(f"time_to_target: the target must be a number, got {target!r}")
    for i, loss in enumerate(losses):
        if loss is not None and not math.isnan(loss) and loss <= target:
            return TargetHit(i, int(steps[i]), float(times[i]))
    return None


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def bits_unit(loss_unit: str | None) -> str | None:
    """The unit of the loss in bits when ``loss_unit`` is in nats (``"nats/char"`` →
    ``"bits/char"``), else ``None``."""
    if loss_unit is not None and loss_unit.startswith("nats/"):
        return "bits/" + loss_unit[len("nats/"):]
    return None


def _bits(nats: float | None) -> float | None:
    return None if nats is None else nats / math.log(2.0)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _range(values: Sequence[float | None]) -> list[float] | None:
    kept = [v for v in values if v is not None]
    return [min(kept), max(kept)] if kept else None


def _median_hit(hits: Sequence[TargetHit | None], what: str) -> float | None:
    """The median over seeds of the hits' ``what`` (``"time"``/``"step"``), a seed that never
    reached the target counting as infinitely late: ``None`` unless more than half reached it."""
    if not hits:
        return None
    values = sorted(math.inf if h is None else float(getattr(h, what)) for h in hits)
    med = statistics.median(values)
    return None if math.isinf(med) or math.isnan(med) else med


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b <= 0:  # the reference was there from the start: only a method also there from the start ties
        return 1.0 if a <= 0 else None
    return a / b


def summarize(records: Sequence[Any], *, target_loss: float | None = None, target_margin: float = 0.05) -> dict[str, Any]:
    """The summary of a set of runs (:class:`~curvlib.bench.record.RunRecord`), per problem.

    Target loss of each problem: ``target_loss`` if given, else the final training loss of
    its ``adam`` run (the median over its seeds) × (1 + ``target_margin``); ``None`` when
    neither exists (then no time-to-target is reported).

    The runs of one method with several seeds make one row: medians over the seeds (a seed
    that never reaches the target counts as infinitely late, so a time-to-target needs more
    than half of them to reach it), ``seeds``, ``reached_target`` (how many did) and
    ``final_train_loss_range`` ([min, max] over the seeds).

    Returns ``{"target_margin", "problems": {problem: {"target_loss", "target_source",
    "loss_unit", "bits_unit", "runs": [row, ...]}}}``; each row holds ``method``,
    ``status``, ``lr``, ``damping``, ``final_train_loss``, ``final_test_loss``,
    ``final_train_bits`` and ``final_test_bits`` (the losses ÷ ln 2 when ``loss_unit`` is
    in nats, e.g. bits/char; else ``None``), ``steps``, ``train_time``, ``time_per_step``,
    ``step_time_vs_sgd`` (this method's mean step time ÷ SGD's), ``steps_to_target``,
    ``time_to_target``, ``time_to_target_vs_adam``, and for natural gradient with KL clipping
    ``kl_scale_median`` (the median of ν over the steps) and ``kl_clipped_share`` (the share of
    steps with ν < 1: the clip, not the curvature, set their length); ``None`` otherwise.
    """
    problems: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    by_problem: dict[str, list[Any]] = {}
    for r in records:
        if r.problem not in by_problem:
            order.append(r.problem)
            by_problem[r.problem] = []
        by_problem[r.problem].append(r)
    for name in order:
        runs = by_problem[name]
        groups = _by_method(runs)
        if target_loss is not None:
            target, source = float(target_loss), "user"
        else:
            finals = [_finite(r.final_train_loss) for r in groups.get(REFERENCE_METHOD, [])]
            finals = [f for f in finals if f is not None]
            target = _median(finals) * (1.0 + target_margin) if finals else None
            several = len(finals) > 1
            source = (f"{REFERENCE_METHOD} {'median' if several else 'best'} final training loss"
                      f"{f' over {len(finals)} seeds' if several else ''} x {1.0 + target_margin:g}") if finals else None
        hits = {id(r): None if target is None else time_to_target(r.eval_step, r.eval_wall_time, r.eval_train_loss,
                                                                   target) for r in runs}
        step_time = {m: _median([r.total_time / r.steps_done for r in g if r.steps_done]) for m, g in groups.items()}
        ref_time = _median_hit([hits[id(r)] for r in groups.get(REFERENCE_METHOD, [])], "time")
        loss_unit = next((r.loss_unit for r in runs if r.loss_unit), None)
        in_bits = bits_unit(loss_unit)
        rows = []
        for method, group in groups.items():
            finals = [_finite(r.final_train_loss) for r in group]
            train = _median([f for f in finals if f is not None])
            test = _median([t for t in (_finite(r.final_test_loss) for r in group) if t is not None])
            group_hits = [hits[id(r)] for r in group]
            hit_time, hit_step = _median_hit(group_hits, "time"), _median_hit(group_hits, "step")
            statuses = [r.status for r in group]
            status = statuses[0] if len(set(statuses)) == 1 else ", ".join(
                f"{st} {statuses.count(st)}/{len(statuses)}" for st in dict.fromkeys(statuses))
            rows.append({
                "method": method,
                "status": status,
                "lr": group[0].hyperparameters.get("lr"),
                "damping": group[0].hyperparameters.get("damping"),
                "seeds": [r.seed for r in group],
                "final_train_loss": train,
                "final_train_loss_range": _range(finals),
                "final_test_loss": test,
                "final_train_bits": _bits(train) if in_bits else None,
                "final_test_bits": _bits(test) if in_bits else None,
                "steps": max(r.steps_done for r in group),
                "train_time": _median([r.total_time for r in group]),
                "time_per_step": step_time[method],
                "step_time_vs_sgd": _ratio(step_time[method], step_time.get(STEP_COST_REFERENCE)),
                "reached_target": sum(h is not None for h in group_hits),
                "steps_to_target": None if hit_step is None else int(round(hit_step)),
                "time_to_target": hit_time,
                "time_to_target_vs_adam": _ratio(hit_time, ref_time),
                **_kl_statistics([m for r in group for m in r.optimizer_metrics]),
            })
        problems[name] = {"target_loss": target, "target_source": source, "loss_unit": loss_unit,
                          "bits_unit": in_bits, "runs": rows}
    return {"target_margin": target_margin, "problems": problems}


def _step_series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(step, value) of ``key`` over the steps that recorded a finite one (skipped steps record none)."""
    steps, values = [], []
    for m in metrics:
        v = m.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(int(m.get("step", len(steps))))
            values.append(float(v))
    return steps, values


def _kl_statistics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    _, nu = _step_series(metrics, "kl_scale")
    if not nu:
        return {"kl_scale_median": None, "kl_clipped_share": None}
    return {"kl_scale_median": statistics.median(nu), "kl_clipped_share": sum(v < 1.0 for v in nu) / len(nu)}


# --------------------------------------------------------------------------- tables

_COLUMNS = (
    # key, plain-text title, format, short title (rich tables on narrow terminals)
    ("method", "method", "{}", "method"),
    ("lr", "lr", "{:.3g}", "lr"),
    ("damping", "damping", "{:.3g}", "λ"),
    ("final_train_loss", "final train", "{:.5g}", "train"),
    ("final_test_loss", "final test", "{:.5g}", "test"),
    ("step_time_vs_sgd", "t/step ÷ sgd", "{:.2f}", "step÷sgd"),
    ("steps_to_target", "steps→target", "{}", "steps→T"),
    ("time_to_target", "time→target [s]", "{:.2f}", "s→T"),
    ("time_to_target_vs_adam", "time→target ÷ adam", "{:.2f}", "÷adam"),
    ("status", "status", "{}", "status"),
)


def _columns(problem: dict[str, Any]) -> tuple[tuple[str, str, str, str], ...]:
    """:data:`_COLUMNS`, with the final losses in bits after the test loss when the loss is in nats."""
    unit = problem.get("bits_unit")
    if not unit:
        return _COLUMNS
    at = [key for key, *_ in _COLUMNS].index("final_test_loss") + 1
    bits = (("final_train_bits", f"train {unit}", "{:.4g}", f"tr {unit}"),
            ("final_test_bits", f"test {unit}", "{:.4g}", f"te {unit}"))
    return _COLUMNS[:at] + bits + _COLUMNS[at:]


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return fmt.format(value)


def _header(name: str, problem: dict[str, Any]) -> str:
    target = problem["target_loss"]
    if target is None:
        return f"{name}: no target loss (no adam run; pass --target-loss)"
    unit = f" {problem['loss_unit']}" if problem.get("loss_unit") else ""
    return f"{name}: target training loss {target:.5g}{unit} ({problem['target_source']})"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as plain-text tables, one per problem."""
    blocks = []
    for name, problem in summary["problems"].items():
        columns = _columns(problem)
        header = [title for _, title, _, _ in columns]
        body = [[_cell(row.get(key), fmt) for key, _, fmt, _ in columns] for row in problem["runs"]]
        widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]

        def line(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        lines = [_header(name, problem), line(header), line(["-" * w for w in widths])]
        lines += [line(r) for r in body]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def rich_summary(summary: dict[str, Any]) -> list[Any]:
    """The summary as ``rich.table.Table`` objects, one per problem."""
    # rich is optional (the bench extra): only a caller that wants rich tables needs it
    from rich.table import Table

    tables = []
    for name, problem in summary["problems"].items():
        table = Table(title=_header(name, problem), title_justify="left",
                      caption="T: target loss; s→T: training seconds to reach it; ÷adam: that time ÷ Adam's",
                      caption_justify="left")
        columns = _columns(problem)
        for i, (_, _, _, short) in enumerate(columns):
            table.add_column(short, justify="left" if i == 0 else "right", no_wrap=True)
        for row in problem["runs"]:
            table.add_row(*[_cell(row.get(key), fmt) for key, _, fmt, _ in columns])
        tables.append(table)
    return tables


# --------------------------------------------------------------------------- plots


def _by_method(records: Sequence[Any]) -> dict[str, list[Any]]:
    """The records grouped by method, in the order of each method's first record."""
    groups: dict[str, list[Any]] = {}
    for r in records:
        groups.setdefault(r.method, []).append(r)
    return groups


def _require_matplotlib(hint: str) -> None:
    if importlib.util.find_spec("matplotlib") is None:  # pragma: no cover - matplotlib is in the bench extra
        raise ConfigError(f"the bench plots need matplotlib: pip install 'curvlib[bench]'{hint}")


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    # matplotlib is optional (the bench extra) and slow to import: only the plots need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _points(xs: Sequence[float], ys: Sequence[float | None]) -> tuple[list[float], list[float]]:
    keep = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
    return [x for x, _ in keep], [y for _, y in keep]


def plot_runs(records: Sequence[Any], out_dir: str | Path, *, log_y: bool = True) -> list[Path]:
    """Write, per problem, ``<problem>_train_loss_vs_epoch.png``,
    ``<problem>_train_loss_vs_time.png``, (when there is a test set)
    ``<problem>_test_loss_vs_epoch.png`` — one line per method, from the evaluation
    points of each run (with several seeds: the median over the seeds and a band over their
    range, at the points every seed reached with a finite loss) — and (when a natural-gradient run clips) ``<problem>_step_scale.png``:
    the KL clip factor ν and the damping λ at every step; the y axis is logarithmic (``log_y``) when the curves span more
    than a decade. Returns the paths written.

    Needs matplotlib (the ``bench`` extra); raises :class:`~curvlib.errors.ConfigError`
    naming it otherwise.
    """
    _require_matplotlib(" (or pass --no-plots)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_problem: dict[str, list[Any]] = {}
    for r in records:
        by_problem.setdefault(r.problem, []).append(r)
    written: list[Path] = []
    for problem, runs in by_problem.items():
        groups = _by_method(runs)
        colors = _colors(len(groups))
        panels = [
            ("train_loss_vs_epoch", "epoch", "training loss", "eval_epoch", "eval_train_loss"),
            ("train_loss_vs_time", "training time [s]", "training loss", "eval_wall_time", "eval_train_loss"),
        ]
        if any(any(v is not None for v in r.eval_test_loss) for r in runs):
            panels.append(("test_loss_vs_epoch", "epoch", "test loss", "eval_epoch", "eval_test_loss"))
        unit = next((r.loss_unit for r in runs if r.loss_unit), None)
        for suffix, xlabel, ylabel, xkey, ykey in panels:
            fig, ax = _figure(f"{problem}: {ylabel} vs {xlabel.split(' [')[0]}", xlabel,
                              f"{ylabel} [{unit}]" if unit else ylabel)
            if draw_curves(ax, groups, colors, xkey, ykey, log_y=log_y):
                ax.legend(fontsize=8, ncols=2 if len(runs) > 6 else 1)
            path = out / f"{problem}_{suffix}.png"
            fig.savefig(path)
            written.append(path)
        first = [(group[0], color) for group, color in zip(groups.values(), colors)]  # ν and λ: the first seed
        scaled = [(r, color) for r, color in first if _step_series(r.optimizer_metrics, "kl_scale")[1]]
        if scaled:
            written.append(_plot_step_scale(problem, scaled, out))
    return written


def draw_curves(ax: Any, groups: Mapping[str, Sequence[Any]], colors: Sequence[Any], xkey: str, ykey: str, *,
                log_y: bool = True) -> bool:
    """Draw one line per method of ``groups`` (method -> its runs) on the matplotlib axis ``ax``:
    with several seeds the median and a band over their range (:func:`_seed_band`); a method
    with a failed run is labelled so.  The y axis turns logarithmic when the curves span more
    than a decade (``log_y``).  Returns whether anything was drawn."""
    plotted = False
    for (method, group), color in zip(groups.items(), colors):
        xs, ys, lo, hi = _seed_band(group, xkey, ykey)
        if not xs:
            continue
        bad = [r.status for r in group if r.status != "ok"]
        label = method + (f" ({', '.join(bad)})" if bad else "")
        if len(group) > 1:
            label += f", median of {len(group)} seeds"
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
        ax.plot(xs, ys, color=color, label=label, linewidth=1.4, marker="." if len(xs) < 40 else None)
        plotted = True
    if plotted:
        ys_all = [y for line in ax.get_lines() for y in line.get_ydata()]
        # a log axis only helps when the curves span more than a decade
        if log_y and min(ys_all) > 0 and max(ys_all) / min(ys_all) > 10:
            ax.set_yscale("log")
    return plotted


def plot_panels(panels: Sequence[Sequence[tuple[str, Sequence[Any]]]], path: str | Path, *,
                xkey: str = "eval_epoch", ykey: str = "eval_train_loss", xlabel: str = "epoch",
                ylabel: str = "training loss", log_y: bool = True) -> Path:
    """A grid of loss panels in one PNG, like the thesis's multi-panel figures (e.g. Fig. 4.1:
    one row per batch size, one column per problem): ``panels[row][col] = (title, records)``,
    each panel drawn by :func:`draw_curves` with one colour per method across the figure and
    one shared legend.  Returns ``path``."""
    _require_matplotlib("")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows, cols = len(panels), max(len(r) for r in panels)
    methods: dict[str, None] = {}
    for row in panels:
        for _, records in row:
            methods.update((r.method, None) for r in records)
    color_of = dict(zip(methods, _colors(len(methods))))
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, row in enumerate(panels):
        for c in range(cols):
            ax = axes[r][c]
            if c >= len(row):
                ax.set_visible(False)
                continue
            title, records = row[c]
            groups = _by_method(records)
            draw_curves(ax, groups, [color_of[m] for m in groups], xkey, ykey, log_y=log_y)
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
    handles = [Line2D([], [], color=color_of[m], linewidth=1.4) for m in methods]
    fig.legend(handles, list(methods), loc="outside lower center", ncols=min(len(methods), 8), fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _plot_step_scale(problem: str, runs: Sequence[tuple[Any, Any]], out: Path) -> Path:
    """``<problem>_step_scale.png``: per step, the KL clip factor ν (ν < 1: the clip shortened the
    step, not the curvature) and the damping λ of each natural-gradient run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.0), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for r, color in runs:
        steps, nu = _step_series(r.optimizer_metrics, "kl_scale")
        share = sum(v < 1.0 for v in nu) / len(nu)
        top.plot(steps, nu, color=color, linewidth=1.0, label=f"{r.method} (clipped {share:.0%} of steps)")
        steps, lam = _step_series(r.optimizer_metrics, "damping")
        bottom.plot(steps, lam, color=color, linewidth=1.0, label=r.method)
    top.axhline(1.0, color="0.5", linewidth=0.8, linestyle="--")
    top.set_yscale("log")
    top.set_ylabel("KL clip factor ν")
    top.set_title(f"{problem}: what sets the step length", fontsize=10)
    top.legend(fontsize=8)
    bottom.set_yscale("log")
    bottom.set_ylabel("damping λ")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(True, which="both", alpha=0.3)
    path = out / f"{problem}_step_scale.png"
    fig.savefig(path)
    return path


def _seed_band(group: Sequence[Any], xkey: str, ykey: str) -> tuple[list[float], list[float], list[float], list[float]]:
    """One method's curve over its seeds: at each evaluation point every seed has a finite value
    at, the median x (step, epoch or time), the median y and the seeds' [min, max] of y."""
    if len(group) == 1:
        xs, ys = _points(getattr(group[0], xkey), getattr(group[0], ykey))
        return xs, ys, ys, ys
    n = min(len(getattr(r, ykey)) for r in group)
    out: tuple[list[float], ...] = ([], [], [], [])
    for i in range(n):
        pts = [(getattr(r, xkey)[i], getattr(r, ykey)[i]) for r in group]
        if any(y is None or not math.isfinite(y) for _, y in pts):
            continue
        values = [y for _, y in pts]
        for col, v in zip(out, (statistics.median(x for x, _ in pts), statistics.median(values), min(values),
                                max(values))):
            col.append(v)
    return out  # type: ignore[return-value]


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps  # optional and slow to import, as in _figure

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]
