"""Helpers shared by the scripts in ``benchmarks/`` (imported as ``_common``: the scripts are
run as ``python benchmarks/<script>.py``, which puts this folder first on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["median_time"]


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time (``time.perf_counter``, seconds) of ``repeats`` calls of ``fn``, after
    one untimed call (warm-up: first-call costs such as allocations, kernel choice, a first refresh)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
