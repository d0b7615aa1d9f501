"""``curvlib bench --problem mnist_gan``: the two-player WGAN-GP loop runs each setting end to
end (losses, FID per epoch, plots, sample grids, summary), and what it does not take is refused."""

from __future__ import annotations

import json
import math

import pytest

from curvlib.cli import main


def test_mnist_gan_trains_both_players_and_writes_fid_results(tmp_path, capsys):
    out = tmp_path / "gan"
    rc = main(["bench", "--problem", "mnist_gan", "--small", "--epochs", "1", "--batch-size", "32",
               "--methods", "adam", "kfac2", "kfac3", "--threads", "1", "--progress", "plain", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "FID, MNIST-classifier features"
    assert summary["classifier_accuracy"] > 0.8 and summary["fid_real_floor"] > 0
    assert list(summary["methods"]) == ["adam", "kfac2", "kfac3"]
    for name, v in summary["methods"].items():
        assert v["status"] == "ok" and math.isfinite(v["final_fid"]), (name, v)
        run = json.loads((out / "runs" / f"{name}-seed0.json").read_text())
        assert [e["epoch"] for e in run["epochs"]] == [0, 1] and run["generator_steps"] == 16
        assert math.isfinite(run["epochs"][1]["critic_loss"]) and math.isfinite(run["epochs"][1]["generator_loss"])
        assert (out / f"mnist_gan_samples_{name}.png").stat().st_size > 0
    assert summary["methods"]["kfac2"]["generator"].startswith("kfac(") and summary["methods"]["kfac3"]["generator"].startswith("adam(")
    assert summary["methods"]["adam"]["time_per_epoch_over_adam"] == 1.0
    for png in ("mnist_gan_fid_vs_epoch.png", "mnist_gan_fid_vs_time.png"):
        assert (out / png).stat().st_size > 0
    assert "FID, MNIST-classifier features" in (out / "summary.txt").read_text()
    assert list(out.glob("fid_classifier-*.pt"))  # cached for the next job in this folder


@pytest.mark.parametrize("argv, message", [
    (["--lr", "0.1"], "mnist_gan does not take --lr"),
    (["--methods", "kfac4"], "unknown method"),
    (["--epochs", "0"], "epochs must be ≥ 1"),
])
def test_mnist_gan_refuses_what_it_does_not_take(tmp_path, capsys, argv, message):
    assert main(["bench", "--problem", "mnist_gan", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_mnist_gan_runs_alone(tmp_path, capsys):
    assert main(["bench", "--problem", "mnist_gan", "mnist_cnn", "--out", str(tmp_path)]) == 2
    assert "run it alone" in capsys.readouterr().err


def test_a_diverged_run_is_recorded_as_diverged_with_no_fid(tmp_path, monkeypatch):
    from curvlib.bench.gan import GanSpec, PlayerSpec, format_gan_summary, run_gan_bench
    from curvlib.bench.gan.players import METHODS

    boom = PlayerSpec("sgd", 50.0)  # SGDA at lr 50: the critic's loss overflows within the epoch
    monkeypatch.setitem(METHODS, "boom", (boom, boom))
    summary = run_gan_bench(GanSpec(methods=("boom",), small=True, epochs=2, batch_size=32, threads=1), tmp_path,
                            plots=False)
    v = summary["methods"]["boom"]
    assert v["status"] == "diverged" and v["final_fid"] is None
    run = json.loads((tmp_path / "runs" / "boom-seed0.json").read_text())
    assert len(run["epochs"]) == 2  # stopped after the epoch it diverged in
    line = next(s for s in format_gan_summary(summary).splitlines() if s.startswith("boom"))
    assert " - " in line and line.endswith("diverged")
    json.loads((tmp_path / "summary.json").read_text())  # strict JSON: no NaN or Infinity
