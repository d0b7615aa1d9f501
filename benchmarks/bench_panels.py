"""Several ``curvlib bench`` result folders in one multi-panel figure, like the thesis's
Figure 4.1 (one row per batch size, one column per problem).

Each ``--panel TITLE=DIR`` is one panel: the runs of ``DIR/runs/*.json`` (a ``--out`` folder
of ``curvlib bench``), drawn as the bench draws them (the median over seeds and their range),
one colour per method across the figure.  Panels fill the rows left to right, ``--cols`` per
row.

Usage::

    python benchmarks/bench_panels.py --cols 3 --out fig.png \\
        --panel "MNIST, batch 128=res/mnist_b128" --panel "CURVES, batch 64=res/curves_b64" ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from curvlib.bench.record import RunRecord
from curvlib.bench.report import plot_panels

AXES = {"epoch": ("eval_epoch", "epoch"), "time": ("eval_wall_time", "training time [s]"), "step": ("eval_step", "step")}


def records(folder: str | Path) -> list[RunRecord]:
    files = sorted(Path(folder).glob("runs/*.json"))
    if not files:
        raise SystemExit(f"bench_panels: no runs/*.json under {folder} (a curvlib bench --out folder?)")
    return [RunRecord.from_json(json.loads(f.read_text())) for f in files]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--panel", action="append", required=True, metavar="TITLE=DIR",
                        help="one panel: its title and a curvlib bench --out folder (repeat)")
    parser.add_argument("--cols", type=int, default=3, help="panels per row")
    parser.add_argument("--x", choices=tuple(AXES), default="epoch", help="the x axis")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if args.cols < 1:
        parser.error("--cols must be ≥ 1")
    panels = []
    for spec in args.panel:
        title, sep, folder = spec.rpartition("=")
        if not sep or not title:
            parser.error(f"--panel {spec!r}: expected TITLE=DIR")
        panels.append((title, records(folder)))
    rows = [panels[i:i + args.cols] for i in range(0, len(panels), args.cols)]
    xkey, xlabel = AXES[args.x]
    print(plot_panels(rows, args.out, xkey=xkey, xlabel=xlabel))


if __name__ == "__main__":
    main()
