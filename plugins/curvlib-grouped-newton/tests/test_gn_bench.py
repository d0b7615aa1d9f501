"""``curvlib bench`` runs the ``GroupedNewton`` optimizer by name (family ``optimizers``)."""

from __future__ import annotations

from gn_reference import single_thread  # noqa: F401  (autouse fixture)
import json
import math

import pytest

from curvlib.bench.methods import available_methods, resolve_method
from curvlib.bench.job import run_bench
from curvlib.bench.settings import BenchConfig
from curvlib.plugins import load_registry

from curvlib_grouped_newton.optimizer import GroupedNewton, GroupedNewtonOptions
from curvlib_grouped_newton.plugin import DEFAULT_LR, GroupedNewtonBenchOptions


@pytest.fixture(scope="module")
def registry():
    reg = load_registry()
    if "grouped_newton" not in reg.optimizers:
        pytest.fail("curvlib-grouped-newton is not installed: pip install -c constraints.txt ./plugins/curvlib-grouped-newton")
    return reg


def test_the_optimizer_is_a_bench_method(registry):
    assert "grouped_newton" in available_methods(registry)
    method = resolve_method("grouped_newton", registry)
    assert method.family == "optimizer" and method.needs_batch
    assert method.default_hyperparameters().lr == DEFAULT_LR == GroupedNewtonOptions().lr
    # the options model's defaults are the optimizer's
    defaults = GroupedNewtonOptions().model_dump()
    defaults.pop("lr")
    assert GroupedNewtonBenchOptions().model_dump() == defaults


def test_bench_runs_sgd_and_grouped_newton_with_finite_losses(registry, tmp_path):
    config = BenchConfig.from_mapping({
        "problems": ["digits_autoencoder"], "small": True,
        "methods": ["sgd", {"name": "grouped_newton", "optimizer_options": {"period": 2}}],
        "steps": 4, "progress": "none", "plots": False, "warmup_steps": 0,
    })
    result = run_bench(config, registry=registry, out=tmp_path)
    records = {r.method: r for r in result.records}
    assert set(records) == {"sgd", "grouped_newton"}
    for name, record in records.items():
        assert record.status == "ok", (name, record.status)
        assert record.steps_done == 4
        losses = [x for x in record.train_loss if x is not None]
        assert losses and all(math.isfinite(x) for x in losses), (name, record.train_loss)
    gn = records["grouped_newton"]
    assert gn.optimizer == f"{GroupedNewton.__module__}.GroupedNewton"
    assert gn.hyperparameters["lr"] == DEFAULT_LR
    assert gn.hyperparameters["optimizer_options"] == {"period": 2}
    saved = json.loads((tmp_path / "runs" / "digits_autoencoder__grouped_newton.json").read_text())
    assert saved["method"] == "grouped_newton"
    assert all(x is None or math.isfinite(x) for x in saved["train_loss"])
