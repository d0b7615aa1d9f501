"""Every reproduction and cost script of ``benchmarks/`` takes ``--path`` (MNIST idx files, like
``curvlib bench --path``) and hands it to the problem it builds."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = ["fim_approximation_errors", "grouped_newton_vs_kfac", "refresh_cost", "step_cost",
           "two_level_error_reduction"]


class _Built(Exception):
    pass


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_script_builds_its_problem_from_path(name, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    seen = {}

    def builder(**kwargs):
        seen.update(kwargs)
        raise _Built

    monkeypatch.setitem(module.PROBLEMS, "mnist_autoencoder", builder)
    with pytest.raises(_Built):
        module.main(["--path", str(tmp_path)])
    assert seen["path"] == str(tmp_path)
