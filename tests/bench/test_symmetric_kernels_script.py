"""``benchmarks/symmetric_kernels.py``: a smoke run on the CPU, and the rule restored after it."""

from __future__ import annotations

import importlib
from pathlib import Path

import curvlib.linalg.rows as rows
import curvlib.linalg.zproducts as zproducts

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_script_times_all_variants_and_restores_the_rule(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("symmetric_kernels")
    rule = rows.split_symmetric
    module.main(["--rows", "8", "--widths", "7", "200", "--repeats", "2"])
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith(("XᵀX", "x_iᵀ"))]
    assert len(lines) == 4  # two kernels at two widths
    # one width below the blocking threshold, one above: the CPU splits only the second
    assert [line[-1] for line in lines] == ["False", "False", "True", "True"]
    assert rows.split_symmetric is rule and zproducts.split_symmetric is rule
