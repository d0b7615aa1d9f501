"""Optional TensorBoard export of a bench job: per-step training loss, evaluation losses and
the natural-gradient optimizer's metrics (damping, KL scale, refresh/inversion seconds, the
largest factor condition number at inversions), one TensorBoard run per (problem, method).

TensorBoard is not a dependency of curvlib: ``pip install tensorboard`` to use it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from curvlib.bench.record import RunRecord
from curvlib.errors import ConfigError

__all__ = ["require_tensorboard", "write_tensorboard"]

_SCALARS = ("damping", "kl_scale", "reduction_ratio", "refresh_seconds", "invert_seconds")


def require_tensorboard() -> None:
    """Raise :class:`ConfigError` unless the ``tensorboard`` package is installed (checked
    before a job starts, so a long run does not fail at its end)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the 'tensorboard' package (pip install tensorboard); "
                          "the run JSON files hold the same metrics")


def write_tensorboard(records: Sequence[RunRecord], logdir: str | Path) -> list[Path]:
    """Write each run's curves as TensorBoard scalars under ``logdir/<problem>__<method>``
    (``…__seed<k>`` when a method ran with several seeds).

    Returns:
        the run directories written.

    Raises:
        ConfigError: the ``tensorboard`` package is not installed.
    """
    require_tensorboard()
    from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

    out = []
    per_method: dict[tuple[str, str], int] = {}
    for r in records:
        per_method[r.problem, r.method] = per_method.get((r.problem, r.method), 0) + 1
    for r in records:
        several = per_method[r.problem, r.method] > 1  # --seeds: one run directory per seed
        run_dir = Path(logdir) / f"{r.problem}__{r.method}{f'__seed{r.seed}' if several else ''}"
        with SummaryWriter(log_dir=str(run_dir)) as w:
            for step, (loss, t) in enumerate(zip(r.train_loss, r.wall_time), start=1):
                w.add_scalar("train/batch_loss", loss, step, walltime=None)
                w.add_scalar("train/seconds", t, step)
            for step, tr, te in zip(r.eval_step, r.eval_train_loss, r.eval_test_loss):
                if tr is not None:
                    w.add_scalar("eval/train_loss", tr, step)
                if te is not None:
                    w.add_scalar("eval/test_loss", te, step)
            for m in r.optimizer_metrics:
                for key in _SCALARS:
                    if m.get(key) is not None:
                        w.add_scalar(f"optimizer/{key}", m[key], m["step"])
                conds = m.get("condition_numbers")
                if conds:
                    w.add_scalar("optimizer/max_condition_number", max(max(k) for k in conds.values()), m["step"])
        out.append(run_dir)
    return out
