"""The benchmark runner API: method names, time-to-target, summary, grid search,
reproducibility, third-party approximator kinds (curvlib.bench.settings/training/job/methods/report/grid)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch

from curvlib.bench import grid as grid_mod
from curvlib.bench.job import run_bench
from curvlib.bench.methods import (
    Hyperparameters,
    available_methods,
    resolve_method,
)
from curvlib.bench.problems import PROBLEMS
from curvlib.bench.record import RunRecord
from curvlib.bench.report import format_summary, summarize, time_to_target
from curvlib.bench.settings import BenchConfig
from curvlib.bench.training import train
from curvlib.bench.training_step import natural_gradient_available
from curvlib.errors import ConfigError, UnknownKindError
from curvlib.plugins import hookimpl, load_registry

NG_OK, NG_WHY = natural_gradient_available()
needs_ng = pytest.mark.skipif(not NG_OK, reason=f"curvlib.optim is not importable: {NG_WHY}")



@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


@pytest.fixture(scope="module")
def tiny():
    return PROBLEMS["digits_autoencoder"](small=True, seed=0)


# --------------------------------------------------------------------------- time to target


def test_time_to_target_first_crossing_without_interpolation():
    steps = [0, 10, 20, 30, 40]
    times = [0.0, 1.0, 2.5, 3.0, 4.0]
    losses = [1.0, 0.8, 0.49, 0.52, 0.3]
    hit = time_to_target(steps, times, losses, 0.5)
    assert hit == (2, 20, 2.5) and hit.step == 20 and hit.time == 2.5 and hit.index == 2
    # a target equal to a value counts as reached
    assert time_to_target(steps, times, losses, 0.8).step == 10
    # the initial point may already be there
    assert time_to_target(steps, times, losses, 2.0).step == 0


def test_time_to_target_never_reached_and_divergence():
    assert time_to_target([0, 1, 2], [0.0, 1.0, 2.0], [1.0, 0.9, 0.8], 0.5) is None
    # None (diverged) and NaN never reach a target
    assert time_to_target([0, 1, 2], [0.0, 1.0, 2.0], [1.0, None, float("nan")], 10.0).step == 0
    assert time_to_target([0, 1, 2], [0.0, 1.0, 2.0], [None, float("nan"), 0.1], 0.5).step == 2


def test_time_to_target_rejects_ragged_curves():
    with pytest.raises(ValueError, match="one entry per point"):
        time_to_target([0, 1], [0.0], [1.0, 0.5], 0.5)


def _record(method: str, losses: list[float | None], times: list[float], *, problem: str = "p", lr: float = 0.1) -> RunRecord:
    n = len(losses) - 1
    return RunRecord(
        problem=problem, method=method, method_description="", problem_description="",
        hyperparameters={"lr": lr, "damping": None}, preconditioner_config=None, optimizer="x",
        seed=0, batch_size=1, steps_planned=10 * n, steps_per_epoch=10, n_train=10, n_test=0, small=True,
        train_loss=[1.0] * (10 * n), wall_time=[times[-1] * (i + 1) / (10 * n) for i in range(10 * n)],
        eval_step=[10 * i for i in range(n + 1)], eval_epoch=[float(i) for i in range(n + 1)],
        eval_wall_time=times, eval_train_loss=losses, eval_test_loss=[None] * (n + 1),
    )


def test_summary_target_is_adams_best_final_loss_times_margin_and_ratios():
    adam = _record("adam", [1.0, 0.6, 0.4, 0.2], [0.0, 1.0, 2.0, 3.0])
    kfac = _record("kfac", [1.0, 0.3, 0.2, 0.1], [0.0, 2.0, 4.0, 6.0])
    sgd = _record("sgd", [1.0, 0.9, 0.8, 0.7], [0.0, 0.5, 1.0, 1.5])
    summary = summarize([adam, kfac, sgd])
    problem = summary["problems"]["p"]
    assert problem["target_loss"] == pytest.approx(0.2 * 1.05)
    rows = {r["method"]: r for r in problem["runs"]}
    assert rows["adam"]["steps_to_target"] == 30 and rows["adam"]["time_to_target"] == 3.0
    assert rows["adam"]["time_to_target_vs_adam"] == pytest.approx(1.0)
    assert rows["kfac"]["steps_to_target"] == 20 and rows["kfac"]["time_to_target_vs_adam"] == pytest.approx(4.0 / 3.0)
    assert rows["sgd"]["steps_to_target"] is None and rows["sgd"]["time_to_target_vs_adam"] is None
    # time per step relative to SGD's: 6.0/30 over 1.5/30
    assert rows["kfac"]["step_time_vs_sgd"] == pytest.approx(4.0)
    text = format_summary(summary)
    assert "target training loss 0.21" in text and "kfac" in text
    json.dumps(summary, allow_nan=False)


def test_summary_user_target_and_missing_adam():
    kfac = _record("kfac", [1.0, 0.3, 0.2], [0.0, 2.0, 4.0])
    assert summarize([kfac])["problems"]["p"]["target_loss"] is None
    assert "no target loss" in format_summary(summarize([kfac]))
    row = summarize([kfac], target_loss=0.25)["problems"]["p"]["runs"][0]
    assert row["steps_to_target"] == 20 and row["time_to_target_vs_adam"] is None


# --------------------------------------------------------------------------- method names


def test_unknown_method_lists_the_valid_ones(registry):
    with pytest.raises(UnknownKindError) as info:
        resolve_method("kfca", registry)
    msg = str(info.value)
    for name in ("sgd", "adam", "kfac", "kfac_tikhonov", "block_ng", "exact_ng"):
        assert name in msg
    for kind in registry.approximators.kinds():
        assert kind in msg


def test_method_grammar(registry):
    assert resolve_method("sgd", registry).family == "sgd"
    tik = resolve_method("kfac_tikhonov", registry)
    assert (tik.approximator, tik.damping_kind) == ("kfac", "tikhonov")
    for kind in registry.approximators.kinds():
        method = resolve_method(kind, registry)
        # the damping its registration names (exact_block: tikhonov), else the π-split
        default = registry.approximators.get(kind).metadata.get("default_damping", "heuristic")
        assert method.approximator == kind and method.damping_kind == default
    assert resolve_method("kfac", registry).damping_kind == "heuristic"
    for coarse in registry.coarse_spaces.kinds():
        two = resolve_method(f"kfac+{coarse}", registry)
        assert (two.approximator, two.coarse_space, two.coarse_mode) == ("kfac", coarse, "multiplicative")
        assert f"kfac+{coarse}" in available_methods(registry)
    if "nicolaides" in registry.coarse_spaces:
        prev = resolve_method("kfac+previous", registry)
        assert (prev.coarse_space, prev.coarse_mode) == ("nicolaides", "previous")
    with pytest.raises(UnknownKindError, match="coarse space 'nope' is not registered"):
        resolve_method("kfac+nope", registry)
    with pytest.raises(UnknownKindError, match="not an approximator method"):
        resolve_method("sgd+residual", registry)
    block = resolve_method("block_ng", registry)
    config = block.preconditioner_config(block.default_hyperparameters(damping=1e-3))
    assert config["preconditioner"] == "block_natural_gradient" and "approximator" not in config
    assert config["damping"] == {"kind": "tikhonov", "value": 1e-3}


def test_hyperparameter_defaults_and_schedule(registry):
    kfac = resolve_method("kfac", registry)
    hp = kfac.default_hyperparameters(update_every=30)
    assert hp.invert_every % hp.update_every == 0
    cfg = kfac.preconditioner_config(hp)
    assert cfg["approximator"] == {"kind": "kfac"} and cfg["damping"]["kind"] == "heuristic"
    assert cfg["update_every"] == 30 and cfg["curvature"] == {"kind": "fisher", "mc_samples": 1}
    assert resolve_method("adam", registry).default_hyperparameters().damping is None


def test_background_inversion_reaches_the_preconditioner_from_the_command_line(registry):
    from curvlib.cli import bench_config_from_args, build_parser

    args = build_parser().parse_args(["bench", "--methods", "adam", "kfac", "--background-inversion"])
    config = bench_config_from_args(args)
    problem = PROBLEMS["mnist_autoencoder"](small=True, seed=0)
    kfac, adam = resolve_method("kfac", registry), resolve_method("adam", registry)
    hp = config.hyperparameters(kfac, config.methods_for(problem)[1], problem)
    assert hp.background_inversion is True and kfac.preconditioner_config(hp)["background_inversion"] is True
    assert config.hyperparameters(adam, config.methods_for(problem)[0], problem).background_inversion is None
    off = bench_config_from_args(build_parser().parse_args(["bench", "--methods", "kfac"]))
    assert "background_inversion" not in kfac.preconditioner_config(off.hyperparameters(kfac, off.methods_for(problem)[0]))


def test_bench_config_validation():
    with pytest.raises(ConfigError, match="unknown problem"):
        BenchConfig.from_mapping({"problems": ["nope"]})
    with pytest.raises(ConfigError, match="steps or epochs"):
        BenchConfig.from_mapping({"steps": 3, "epochs": 1})
    with pytest.raises(ConfigError, match="listed twice"):
        BenchConfig.from_mapping({"methods": ["sgd", "sgd"]})
    config = BenchConfig.from_mapping({"methods": ["sgd", {"name": "adam", "lr": 0.01}], "grid": True})
    assert config.grid is not None and config.grid.lr[0] == 1e-4 and len(config.grid.damping) == 8
    assert config.methods[1].lr == 0.01
    with pytest.raises(ConfigError, match="stepz: Extra inputs"):
        BenchConfig.from_mapping({"stepz": 3})


# --------------------------------------------------------------------------- training


def _methods_for_repro() -> tuple[str, str]:
    return ("sgd", "kfac") if NG_OK else ("sgd", "adam")


def test_rerun_with_the_same_seed_gives_identical_per_step_losses(tiny, registry):
    runs = []
    for _ in range(2):
        losses = {}
        for name in _methods_for_repro():
            method = resolve_method(name, registry)
            hp = method.default_hyperparameters(update_every=2, invert_every=4) if method.is_natural_gradient \
                else method.default_hyperparameters()
            record = train(tiny, method, hp, steps=8, seed=3, registry=registry, eval_every=4)
            assert record.status == "ok" and len(record.train_loss) == 8
            assert record.eval_step == [0, 4, 8]
            losses[name] = (record.train_loss, record.eval_train_loss, record.eval_test_loss)
        runs.append(losses)
    assert runs[0] == runs[1]
    first, second = _methods_for_repro()
    # same initial model and batches: the first batch loss is the same for both methods
    assert runs[0][first][0][0] == runs[0][second][0][0]
    assert runs[0][first][0] != runs[0][second][0]
    other = train(tiny, resolve_method("sgd", registry), Hyperparameters(lr=0.1, momentum=0.9), steps=3, seed=4,
                  registry=registry)
    assert other.train_loss[0] != runs[0]["sgd"][0][0]


def test_a_diverging_run_stops_and_writes_valid_json(tiny, registry, tmp_path):
    # squared error on a linear output overflows where BCE-with-logits saturates
    problem = dataclasses.replace(tiny, loss_fn=torch.nn.MSELoss())
    record = train(problem, resolve_method("sgd", registry), Hyperparameters(lr=1e9, momentum=0.9), steps=30,
                   seed=0, registry=registry)
    assert record.status == "diverged" and record.steps_done < 30
    assert record.final_train_loss is None and record.eval_step[-1] == record.steps_done
    data = json.loads(record.write(tmp_path / "r.json").read_text())
    assert data["status"] == "diverged" and data["final"]["steps"] == record.steps_done


def test_early_stopping_counts_evaluations_without_improvement(tiny, registry):
    # lr = 0 never improves: stop after `patience` evaluations past the first
    record = train(tiny, resolve_method("sgd", registry), Hyperparameters(lr=1e-12), steps=40, seed=0,
                   registry=registry, eval_every=2, patience=3)
    assert record.status == "early_stopped" and record.steps_done == 8


def test_grid_selection_prefers_lowest_final_loss_and_counts_divergence_as_infinite():
    points = [
        grid_mod.GridPoint(lr=1.0, damping=None, final_train_loss=None, status="diverged", steps=3),
        grid_mod.GridPoint(lr=0.1, damping=None, final_train_loss=0.5, status="ok", steps=5),
        grid_mod.GridPoint(lr=0.01, damping=None, final_train_loss=0.4, status="ok", steps=5),
        grid_mod.GridPoint(lr=0.001, damping=None, final_train_loss=0.4, status="ok", steps=5),
    ]
    result = grid_mod.GridResult(problem="p", method="sgd", steps=5, lrs=(1.0, 0.1, 0.01, 0.001), dampings=(None,),
                                 points=points, base=Hyperparameters(lr=0.5))
    assert result.best.lr == 0.01  # the first of the tied best
    assert result.best_hyperparameters.lr == 0.01
    assert not result.all_diverged
    json.dumps(result.to_json(), allow_nan=False)


def test_grid_search_runs_each_point(tiny, registry):
    method = resolve_method("sgd", registry)
    result = grid_mod.grid_search(tiny, method, method.default_hyperparameters(), lrs=(1e-4, 0.3), steps=6,
                                  seed=0, registry=registry)
    assert [p.lr for p in result.points] == [1e-4, 0.3] and all(p.damping is None for p in result.points)
    assert result.best.lr == 0.3  # a tiny lr barely moves in 6 steps
    assert result.best.final_train_loss < result.points[0].final_train_loss


@needs_ng
def test_grid_search_searches_damping_for_natural_gradient(tiny, registry):
    method = resolve_method("kfac", registry)
    base = method.default_hyperparameters(update_every=1, invert_every=1)
    result = grid_mod.grid_search(tiny, method, base, lrs=(0.1,), dampings=(1e-3, 1e-1), steps=4, seed=0,
                                  registry=registry)
    assert [(p.lr, p.damping) for p in result.points] == [(0.1, 1e-3), (0.1, 1e-1)]
    assert result.best_hyperparameters.damping in (1e-3, 1e-1)


@needs_ng
def test_grid_search_tries_the_kl_clip_and_caches_every_point(tiny, registry, tmp_path):
    """§3.3.2's c ∈ {1e-2, 1e-3} as a third axis; a second search with the same cache trains
    nothing, one with an extra learning rate only the new points — and gets the same numbers."""
    method = resolve_method("kfac", registry)
    base = method.default_hyperparameters(update_every=1, invert_every=1)
    kwargs = dict(dampings=(1e-3,), kl_clips=(1e-2, 1e-3), steps=4, seed=0, registry=registry, cache=tmp_path)
    first = grid_mod.grid_search(tiny, method, base, lrs=(0.1,), **kwargs)
    assert [(p.lr, p.damping, p.kl_clip) for p in first.points] == [(0.1, 1e-3, 1e-2), (0.1, 1e-3, 1e-3)]
    assert first.cached == 0 and len(list(tmp_path.glob("*.json"))) == 2
    assert first.best_hyperparameters.kl_clip == first.best.kl_clip
    again = grid_mod.grid_search(tiny, method, base, lrs=(0.1,), **kwargs)
    assert again.cached == 2 and again.points == first.points
    more = grid_mod.grid_search(tiny, method, base, lrs=(0.1, 0.3), **kwargs)
    assert more.cached == 2 and more.points[:2] == first.points and len(more.points) == 4
    fresh = grid_mod.grid_search(tiny, method, base, lrs=(0.3,), **{**kwargs, "cache": None})
    assert fresh.points == more.points[2:]  # a cached point is the point a fresh run gives
    other = grid_mod.grid_search(tiny, method, base.model_copy(update={"ema": 0.5}), lrs=(0.1,), **kwargs)
    assert other.cached == 0  # another base configuration is another key


# --------------------------------------------------------------------------- third-party kinds


@needs_ng
def test_a_third_party_approximator_kind_is_a_method_by_name(tiny, tmp_path):
    from curvlib.approximators.kfac import KFACApproximator, KFACOptions

    fits: list[str] = []

    class ThrowawayKFAC(KFACApproximator):
        """KFAC that counts its fits (a stand-in for a third party's approximator)."""

        kind = "throwaway_kfac"

        def fit(self, stats, previous=None):
            fits.append(stats.name if hasattr(stats, "name") else "layer")
            return super().fit(stats, previous)

    class ThrowawayPlugin:
        @hookimpl
        def curvlib_register_approximators(self, registry):
            registry.add("throwaway_kfac", ThrowawayKFAC, options=KFACOptions, description="test-only KFAC")

    reg = load_registry(external=False)
    reg.register(ThrowawayPlugin(), name="throwaway", distribution="throwaway-dist")
    assert "throwaway_kfac" in available_methods(reg)
    config = BenchConfig.from_mapping({
        "problems": ["digits_autoencoder"], "methods": ["throwaway_kfac", "throwaway_kfac+residual"]
        if "residual" in reg.coarse_spaces else ["throwaway_kfac"],
        "steps": 4, "update_every": 2, "invert_every": 2, "progress": "none", "plots": False, "warmup_steps": 0,
    })
    result = run_bench(config, registry=reg, out=tmp_path)
    assert fits, "the third-party approximator was never fitted"
    record = result.records[0]
    assert record.method == "throwaway_kfac" and record.status == "ok"
    assert record.preconditioner_config["approximator"]["kind"] == "throwaway_kfac"
    assert json.loads((tmp_path / "runs" / "digits_autoencoder__throwaway_kfac.json").read_text())["method"] \
        == "throwaway_kfac"
    # the default registry does not know it: the error lists what it does know
    with pytest.raises(UnknownKindError, match="Valid methods: sgd, adam"):
        resolve_method("throwaway_kfac", load_registry(external=False))


def test_a_failing_step_marks_the_run_failed_and_keeps_its_curve(tiny, registry, tmp_path, monkeypatch):
    """A method that raises mid-run loses only its own run: status "failed", the error kept,
    the steps done so far recorded, the JSON valid."""
    import curvlib.bench.training as training

    real = training.build_training_step

    def flaky(*args, **kwargs):
        stepper = real(*args, **kwargs)
        calls = {"n": 0}
        step = stepper.step

        def failing(X, y):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom at step 3")
            return step(X, y)

        stepper.step = failing
        return stepper

    monkeypatch.setattr(training, "build_training_step", flaky)
    record = train(tiny, resolve_method("sgd", registry), Hyperparameters(lr=0.1), steps=6, seed=0, registry=registry)
    assert record.status == "failed" and record.error == "RuntimeError: boom at step 3"
    assert record.steps_done == 2 and record.eval_train_loss[-1] is None
    path = record.write(tmp_path / "r.json")
    assert json.loads(path.read_text())["error"] == "RuntimeError: boom at step 3"


@needs_ng
def test_the_run_json_carries_the_optimizers_metrics(tiny, registry, tmp_path):
    method = resolve_method("kfac", registry)
    hp = method.default_hyperparameters(update_every=2, invert_every=4)
    record = train(tiny, method, hp, steps=6, seed=0, registry=registry)
    m = json.loads(record.write(tmp_path / "kfac.json").read_text())["optimizer_metrics"]
    assert [x["step"] for x in m] == list(range(6))
    assert [x["refreshed"] for x in m] == [True, False, True, False, True, False]
    assert [x["inverted"] for x in m] == [True, False, False, False, True, False]
    assert all(x["damping"] == hp.damping for x in m)
    assert all(isinstance(x["kl_scale"], float) for x in m)  # the device tensor read back after the run
    linear = {n for n, mod in tiny.model_fn(0).named_modules() if isinstance(mod, torch.nn.Linear)}
    assert set(m[0]["condition_numbers"]) == linear
    assert all(ka >= 1 and kg >= 1 for ka, kg in m[4]["condition_numbers"].values())
    assert m[-1]["counts"]["inversions"] == 2
    sgd = train(tiny, resolve_method("sgd", registry), Hyperparameters(lr=0.1, momentum=0.9), steps=2, seed=0,
                registry=registry)
    assert sgd.optimizer_metrics == []



@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_without_the_package_fails_before_training(tmp_path):
    config = BenchConfig(problems=["digits_autoencoder"], methods=["sgd"], steps=2, tensorboard=str(tmp_path / "tb"))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        run_bench(config, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="needs tensorboard")
def test_tensorboard_scalars_are_written(tmp_path):
    config = BenchConfig(problems=["digits_autoencoder"], methods=["sgd", "kfac"], steps=2, plots=False,
                         tensorboard=str(tmp_path / "tb"), progress="none")
    run_bench(config, out=tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["digits_autoencoder__kfac", "digits_autoencoder__sgd"]
