"""Every reproduction and cost script of ``benchmarks/`` takes ``--path`` (MNIST idx files, like
``curvlib bench --path``) and hands it to the problem it builds."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = ["fim_approximation_errors", "grouped_newton_vs_kfac", "refresh_cost", "step_cost",
           "two_level_error_reduction", "uncovered_parameters"]


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


def test_uncovered_parameters_script_covers_every_parameter_only_with_per_sample(monkeypatch, tmp_path):
    """A smoke run: the changed auto-encoder has 11 parameter tensors without an adapter (7 gains,
    two hand-written layers' W and b); the fallback runs leave them out, the per-sample runs give
    each a block, and every run trains with finite losses."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("uncovered_parameters")
    out = module.main(["--steps", "3", "--eval-every", "3", "--warmup", "1", "--json", str(tmp_path / "r.json")])
    runs = out["runs"]
    for approximator in ("kfac", "tnt"):
        fallback, per_sample = runs[f"{approximator}_fallback"], runs[f"{approximator}_per_sample"]
        assert (fallback["blocks"], fallback["left_out"]) == (6, 11)
        assert (per_sample["blocks"], per_sample["left_out"]) == (17, 0)
    assert all(not r["diverged"] and r["final_train_loss"] < r["curve"][0][1] for r in runs.values())
    assert (tmp_path / "r.json").exists()
