"""``curvlib bench`` end to end on a tiny problem: run JSONs, PNG plots, summary, options."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from curvlib.bench.training_step import natural_gradient_available
from curvlib.cli import main

NG_OK, NG_WHY = natural_gradient_available()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = ["--problem", "digits_autoencoder", "--small", "--threads", "1", "--warmup-steps", "2", "--progress", "plain"]



def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert len(data) > 100 and data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_bench_end_to_end_writes_runs_plots_and_summary(tmp_path, capsys):
    if not NG_OK:
        pytest.skip(f"curvlib.optim is not importable ({NG_WHY}): kfac cannot run")
    out = tmp_path / "res"
    rc = main(["bench", *TINY, "--methods", "sgd", "adam", "kfac", "--steps", "12", "--eval-every", "4", "--lr", "adam=0.03",
               "--update-every", "2", "--invert-every", "4", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # progress lines (not a TTY: plain), then the summary table and where the results are
    assert "[digits_autoencoder kfac] start: 12 steps" in captured.out
    assert "time→target ÷ adam" in captured.out and f"results: {out}" in captured.out

    for method in ("sgd", "adam", "kfac"):
        run = json.loads((out / "runs" / f"digits_autoencoder__{method}.json").read_text())
        assert run["method"] == method and run["status"] == "ok" and run["seed"] == 0
        assert len(run["train_loss"]) == len(run["wall_time"]) == 12
        assert run["wall_time"] == sorted(run["wall_time"]) and run["wall_time"][0] > 0
        assert run["eval_step"] == [0, 4, 8, 12] and len(run["eval_test_loss"]) == 4
        assert all(x is not None for x in run["eval_test_loss"])
        assert set(run["versions"]) >= {"python", "torch", "numpy", "curvlib"}
        assert run["hyperparameters"]["lr"] > 0
        if method == "kfac":
            pc = run["preconditioner_config"]
            assert pc["approximator"]["kind"] == "kfac" and pc["update_every"] == 2 and pc["invert_every"] == 4
            assert run["optimizer"].endswith("NaturalGradient")
        else:
            assert run["preconditioner_config"] is None

    for name in ("train_loss_vs_epoch", "train_loss_vs_time", "test_loss_vs_epoch", "step_scale"):
        width, height = _png_size(out / f"digits_autoencoder_{name}.png")
        assert width > 100 and height > 100

    summary = json.loads((out / "summary.json").read_text())
    problem = summary["problems"]["digits_autoencoder"]
    assert [r["method"] for r in problem["runs"]] == ["sgd", "adam", "kfac"]
    adam = next(r for r in problem["runs"] if r["method"] == "adam")
    assert problem["target_loss"] == pytest.approx(adam["final_train_loss"] * 1.05)
    assert adam["steps_to_target"] > 0 and adam["time_to_target_vs_adam"] == pytest.approx(1.0)
    # ν of the KL clip, from the run's per-step metrics (none for the first-order methods)
    kfac = next(r for r in problem["runs"] if r["method"] == "kfac")
    nus = [m["kl_scale"] for m in json.loads((out / "runs" / "digits_autoencoder__kfac.json").read_text())[
        "optimizer_metrics"] if m.get("kl_scale") is not None]
    assert len(nus) == 12 and 0 < kfac["kl_scale_median"] <= 1
    assert kfac["kl_clipped_share"] == pytest.approx(sum(v < 1 for v in nus) / 12)
    assert adam["kl_scale_median"] is None and adam["kl_clipped_share"] is None
    assert (out / "summary.txt").read_text().startswith("digits_autoencoder: target training loss")
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["methods"][2]["name"] == "kfac" and config["versions"]["torch_threads"] == 1


def test_first_order_only_run_needs_no_optimizer_package(tmp_path, capsys):
    rc = main(["bench", *TINY, "--methods", "sgd,adam", "--epochs", "1", "--lr", "adam=0.01", "--no-plots",
               "--target-loss", "0.9", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    adam = json.loads((tmp_path / "runs" / "digits_autoencoder__adam.json").read_text())
    assert adam["hyperparameters"]["lr"] == 0.01 and len(adam["train_loss"]) == adam["steps_per_epoch"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["problems"]["digits_autoencoder"]["target_loss"] == 0.9
    assert not list(tmp_path.glob("*.png"))


def test_unknown_method_lists_the_valid_ones(tmp_path, capsys):
    rc = main(["bench", *TINY, "--methods", "sgd", "kfca", "--steps", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown method 'kfca'" in err
    for name in ("sgd", "adam", "kfac", "kfac_tikhonov", "kpsvd", "block_ng", "exact_ng"):
        assert name in err
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_per_method_option_for_a_method_not_run_is_an_error(tmp_path, capsys):
    rc = main(["bench", *TINY, "--methods", "sgd", "--lr", "kfac=0.1", "--steps", "2", "--out", str(tmp_path)])
    assert rc == 2 and "'kfac' is not among the methods run (sgd)" in capsys.readouterr().err


def test_momentum_for_every_method_or_one_method(tmp_path, capsys):
    if not NG_OK:
        pytest.skip(f"curvlib.optim is not importable ({NG_WHY}): kfac cannot run")
    out = tmp_path / "out"
    rc = main(["bench", *TINY, "--methods", "sgd", "kfac", "--steps", "2", "--no-plots", "--momentum", "0.3",
               "--momentum", "kfac=0.5", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    sgd, kfac = (json.loads((out / "runs" / f"digits_autoencoder__{m}.json").read_text()) for m in ("sgd", "kfac"))
    assert sgd["hyperparameters"]["momentum"] == 0.3 and kfac["hyperparameters"]["momentum"] == 0.5
    # a per-method value is validated like the global one
    rc = main(["bench", *TINY, "--methods", "sgd", "--steps", "2", "--momentum", "sgd=1.5", "--out", str(out)])
    assert rc == 2 and "momentum" in capsys.readouterr().err


def test_config_file_with_command_line_overrides(tmp_path, capsys):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text(
        "problems: [digits_autoencoder]\n"
        "methods:\n"
        "  - sgd\n"
        "  - {name: adam, lr: 0.02}\n"
        "steps: 50\n"
        "seed: 7\n"
        "plots: false\n"
        "grid: {lr: [0.001, 0.1], steps: 3}\n"
    )
    out = tmp_path / "out"
    rc = main(["bench", "--config", str(cfg), "--steps", "5", "--threads", "1", "--warmup-steps", "0",
               "--progress", "none", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    sgd = json.loads((out / "runs" / "digits_autoencoder__sgd.json").read_text())
    adam = json.loads((out / "runs" / "digits_autoencoder__adam.json").read_text())
    assert len(sgd["train_loss"]) == 5 and sgd["seed"] == 7  # --steps beat the file, the seed came from it
    # the grid chose each learning rate and the runs record the choice
    for run in (sgd, adam):
        assert run["grid"]["lr"] in (0.001, 0.1) and run["grid"]["points"] == 2 and run["grid"]["steps"] == 3
        assert run["hyperparameters"]["lr"] == run["grid"]["lr"]
        grid = json.loads((out / "grid" / f"digits_autoencoder__{run['method']}.json").read_text())
        assert [p["lr"] for p in grid["points"]] == [0.001, 0.1]


def test_list_methods_and_problems(capsys):
    assert main(["bench", "--list-methods"]) == 0
    out = capsys.readouterr().out
    for name in ("sgd", "adam", "kfac", "kfac_tikhonov", "kpsvd", "deflation", "lanczos", "kfac_corrected",
                 "block_ng", "exact_ng"):
        assert f"  {name} " in out
    assert main(["bench", "--list-problems"]) == 0
    assert "mnist_autoencoder" in capsys.readouterr().out


def test_plugins_list_still_works(capsys):
    assert main(["plugins", "list", "--no-external"]) == 0
    assert "approximators (" in capsys.readouterr().out


def test_several_seeds_give_medians_ranges_and_bands(tmp_path, capsys):
    """--seeds 3: three runs per method (seeds 0, 1, 2, the same data split), one summary row of
    medians over them, the seeds' range of the final loss, and the median curve in the plots."""
    import statistics

    out = tmp_path / "res"
    rc = main(["bench", *TINY, "--methods", "sgd", "adam", "kfac", "--steps", "8", "--eval-every", "4", "--seeds", "3",
               "--lr", "adam=0.03", "--update-every", "2", "--invert-every", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    runs = {}
    for method in ("sgd", "adam", "kfac"):
        for seed in (0, 1, 2):
            run = json.loads((out / "runs" / f"digits_autoencoder__{method}__seed{seed}.json").read_text())
            assert run["seed"] == seed and run["status"] == "ok"
            runs[method, seed] = run
    assert runs["sgd", 0]["train_loss"] != runs["sgd", 1]["train_loss"]  # other weights and batch order
    summary = json.loads((out / "summary.json").read_text())["problems"]["digits_autoencoder"]
    assert [r["method"] for r in summary["runs"]] == ["sgd", "adam", "kfac"]
    finals = {m: [runs[m, s]["final"]["train_loss"] for s in (0, 1, 2)] for m in ("sgd", "adam", "kfac")}
    assert summary["target_loss"] == pytest.approx(statistics.median(finals["adam"]) * 1.05)
    assert "median final training loss over 3 seeds" in summary["target_source"]
    for row in summary["runs"]:
        assert row["seeds"] == [0, 1, 2]
        assert row["final_train_loss"] == pytest.approx(statistics.median(finals[row["method"]]))
        assert row["final_train_loss_range"] == pytest.approx([min(finals[row["method"]]), max(finals[row["method"]])])
        assert 0 <= row["reached_target"] <= 3
    adam = next(r for r in summary["runs"] if r["method"] == "adam")
    assert adam["reached_target"] >= 2 and adam["time_to_target_vs_adam"] == pytest.approx(1.0)
    for name in ("train_loss_vs_epoch", "train_loss_vs_time", "step_scale"):
        assert _png_size(out / f"digits_autoencoder_{name}.png")[0] > 100


def test_seed_band_is_the_median_and_range_over_seeds():
    from types import SimpleNamespace

    from curvlib.bench.report import _seed_band

    runs = [SimpleNamespace(eval_step=[0, 4, 8], eval_train_loss=[3.0, 2.0, None]),
            SimpleNamespace(eval_step=[0, 4, 8], eval_train_loss=[1.0, 4.0, 1.0]),
            SimpleNamespace(eval_step=[0, 4], eval_train_loss=[2.0, 3.0])]  # stopped early
    xs, ys, lo, hi = _seed_band(runs, "eval_step", "eval_train_loss")
    assert (xs, ys, lo, hi) == ([0, 4], [2.0, 3.0], [1.0, 2.0], [3.0, 4.0])  # step 8: not every seed has it


def test_grid_kl_clip_and_cache_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["bench", *TINY, "--methods", "kfac", "--steps", "4", "--grid", "--grid-lr", "0.1", "--grid-damping", "1e-3",
            "--grid-kl-clip", "1e-2,1e-3", "--grid-steps", "2", "--no-plots", "--target-loss", "1", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    grid = json.loads((out / "grid" / "digits_autoencoder__kfac.json").read_text())
    assert grid["choice"]["kl_clips"] == [1e-2, 1e-3] and grid["choice"]["cached_points"] == 0
    assert [p["kl_clip"] for p in grid["points"]] == [1e-2, 1e-3]
    assert len(list((out / "grid" / "cache").glob("*.json"))) == 2
    assert main(argv) == 0  # resumed into the same folder: every point from the cache
    assert "2 from the cache" in capsys.readouterr().out
    run = json.loads((out / "runs" / "digits_autoencoder__kfac.json").read_text())
    assert run["hyperparameters"]["kl_clip"] == grid["choice"]["kl_clip"]


def test_bench_runs_a_composed_config_file_as_a_method(tmp_path, capsys):
    """A PreconditionerConfig file with rules is a method: its rules reach the optimizer."""
    if not NG_OK:
        pytest.skip(f"curvlib.optim is not importable ({NG_WHY})")
    composed = tmp_path / "composed.yaml"
    composed.write_text("approximator: kfac\n"
                        "damping: {kind: heuristic, value: 1.0e-3}\n"
                        "rules:\n"
                        "  - max_params: 2000\n"
                        "    approximator: exact_block\n"
                        "    damping: {kind: tikhonov, value: 1.0e-2}\n"
                        "  - min_params: 20000\n"
                        "    update_every: 4\n"
                        "    invert_every: 4\n")
    out = tmp_path / "res"
    rc = main(["bench", *TINY, "--methods", "adam", str(composed), "--steps", "8", "--eval-every", "4",
               "--no-plots", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    runs = list((out / "runs").glob("digits_autoencoder__*composed.yaml.json"))
    assert len(runs) == 1, sorted(p.name for p in (out / "runs").iterdir())
    run = json.loads(runs[0].read_text())
    assert run["status"] == "ok" and len(run["train_loss"]) == 8
    rules = run["preconditioner_config"]["rules"]
    assert rules[0]["approximator"] == {"kind": "exact_block"} and rules[0]["damping"]["kind"] == "tikhonov"
    assert rules[1]["update_every"] == 4 and "composed by 2 rule(s)" in captured.out + json.dumps(run)

    # the file's damping options reach the optimizer; its λ is the bench's
    structured = tmp_path / "diag.yaml"
    structured.write_text("approximator: kfac\ndamping: {kind: inverse_free, value: 0.5, block_size: 1}\n")
    rc = main(["bench", *TINY, "--methods", str(structured), "--steps", "2", "--damping", "1e-2", "--no-plots",
               "--out", str(tmp_path / "r1")])
    assert rc == 0, capsys.readouterr().err
    run = json.loads(next((tmp_path / "r1" / "runs").glob("*diag.yaml.json")).read_text())
    assert run["preconditioner_config"]["damping"] == {"kind": "inverse_free", "block_size": 1, "value": 1e-2}

    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - match: x\n    approximator: {kind: kpsvd, rank: 0}\n")
    assert main(["bench", *TINY, "--methods", str(bad), "--steps", "2", "--out", str(tmp_path / "r2")]) == 2
    assert "rules[0].approximator.rank" in capsys.readouterr().err


def test_bench_panels_draws_several_result_folders_in_one_figure(tmp_path, capsys):
    """benchmarks/bench_panels.py: one panel per bench --out folder, rows of --cols panels; the
    figure grows with the grid (a missing folder is an error naming it)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "bench_panels", Path(__file__).resolve().parents[2] / "benchmarks" / "bench_panels.py")
    panels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(panels)
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"res{seed}"
        rc = main(["bench", *TINY, "--methods", "sgd", "adam", "--steps", "6", "--eval-every", "2", "--no-plots",
                   "--seed", str(seed), "--out", str(out)])
        assert rc == 0, capsys.readouterr().err
        outs.append(out)
    one = tmp_path / "one.png"
    panels.main(["--panel", f"seed 0={outs[0]}", "--out", str(one)])
    grid = tmp_path / "grid.png"
    panels.main(["--cols", "2", "--x", "time", "--out", str(grid),
                 *[a for i in range(3) for a in ("--panel", f"p{i}={outs[i % 2]}")]])
    (w1, h1), (w2, h2) = _png_size(one), _png_size(grid)
    assert w2 > 1.8 * w1 and h2 > 1.5 * h1  # 2 columns, 2 rows (the last row's second panel hidden)
    with pytest.raises(SystemExit, match="no runs"):
        panels.main(["--panel", f"x={tmp_path / 'missing'}", "--out", str(tmp_path / "x.png")])
