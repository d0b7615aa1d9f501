"""Helpers shared by the scripts in ``benchmarks/`` (imported as ``_common``: the scripts are
run as ``python benchmarks/<script>.py``, which puts this folder first on ``sys.path``)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PATH_HELP", "interleaved", "median_time"]

#: ``--path`` of every script that trains or measures on MNIST (like ``curvlib bench --path``)
PATH_HELP = ("a folder of MNIST idx files (train-images-idx3-ubyte[.gz], …; e.g. from "
             "../shared/tools/get_full_mnist.sh): the full 60k/10k MNIST instead of the 5,000 bundled images")


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


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, reference: str) -> tuple[dict[str, float], dict[str, float]]:
    """Time the callables interleaved (A B C A B C …, ``rounds`` rounds, after one untimed call
    of each) and return, per name, the median over rounds of its time **divided by the
    reference's time in the same round**, and its median time in seconds.  A machine that
    slows down for a while slows every callable of those rounds alike."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    ratios = {name: statistics.median(t / r for t, r in zip(ts, times[reference])) for name, ts in times.items()}
    return ratios, {name: statistics.median(ts) for name, ts in times.items()}
