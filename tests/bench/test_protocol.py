"""``curvlib bench --protocol thesis|thesis-full``: the thesis's protocol (§3.3.2, §4.3) as the
bottom layer of the settings, under a config file and the command line."""

from __future__ import annotations

import json

import pytest

from curvlib.bench.grid import THESIS_GRID_3_3_2, THESIS_KL_CLIPS
from curvlib.cli import bench_config_from_args, build_parser, main


def _config(argv):
    return bench_config_from_args(build_parser().parse_args(["bench", *argv]))


def test_thesis_protocol_sets_the_schedule_the_grid_and_early_stopping():
    cfg = _config(["--protocol", "thesis"])
    assert (cfg.update_every, cfg.invert_every, cfg.ema) == (100, 100, 0.95)
    assert (cfg.steps, cfg.eval_every, cfg.seeds, cfg.patience) == (1000, 20, 3, 10)
    assert cfg.grid.lr == (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0) and cfg.grid.damping == (1e-3, 1e-2, 1e-1)
    assert cfg.grid.kl_clip == THESIS_KL_CLIPS and cfg.grid.steps == 100
    full = _config(["--protocol", "thesis-full"])
    assert full.grid.lr == THESIS_GRID_3_3_2 == full.grid.damping
    plain = _config([])
    assert plain.grid is None and plain.update_every != 100


def test_options_and_config_files_go_on_top_of_the_protocol(tmp_path):
    cfg = _config(["--protocol", "thesis", "--steps", "50", "--grid-steps", "5", "--update-every", "10"])
    assert (cfg.steps, cfg.grid.steps, cfg.update_every, cfg.invert_every) == (50, 5, 10, 100)
    assert cfg.grid.damping == (1e-3, 1e-2, 1e-1)  # merged key by key
    epochs = _config(["--protocol", "thesis", "--epochs", "2"])
    assert epochs.epochs == 2 and epochs.steps is None
    file = tmp_path / "c.yaml"
    file.write_text("seeds: 1\ngrid: {lr: [0.1]}\n")
    from_file = _config(["--protocol", "thesis", "--config", str(file)])
    assert from_file.seeds == 1 and from_file.grid.lr == (0.1,) and from_file.grid.kl_clip == THESIS_KL_CLIPS


def test_a_tiny_protocol_run_grid_searches_then_trains(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["bench", "--protocol", "thesis", "--problem", "digits_autoencoder", "--small", "--methods", "kfac",
               "--steps", "4", "--eval-every", "2", "--seeds", "1", "--grid-lr", "0.1", "--grid-damping", "1e-3",
               "--grid-steps", "2", "--threads", "1", "--warmup-steps", "0", "--progress", "plain", "--no-plots",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    run = json.loads(next((out / "runs").glob("*kfac*.json")).read_text())
    hp = run["hyperparameters"]
    assert (hp["update_every"], hp["invert_every"], hp["ema"]) == (100, 100, 0.95)
    assert hp["kl_clip"] in THESIS_KL_CLIPS  # chosen by the grid among the protocol's c


def test_an_unknown_protocol_is_refused(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--protocol", "thesiss"])
    assert "invalid choice" in capsys.readouterr().err


def test_grid_shards_train_the_grid_together_and_the_final_run_only_chooses(tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ["bench", "--problem", "digits_autoencoder", "--small", "--methods", "adam", "kfac", "--steps", "4",
              "--eval-every", "2", "--grid-lr", "0.01,0.1,0.3", "--grid-damping", "1e-3", "--grid-steps", "2",
              "--grid-cache", str(cache), "--threads", "1", "--warmup-steps", "0", "--progress", "plain",
              "--no-plots"]
    for i in (1, 2):
        assert main([*common, "--grid-shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")]) == 0
        out = capsys.readouterr().out
        assert f"grid shard {i}/2 done" in out and not (tmp_path / f"s{i}" / "runs").exists()
        # 3 points per method: shard 1 trains points 0 and 2, shard 2 point 1
        assert f"grid shard {i}/2: {2 if i == 1 else 1} point(s) trained, 0 found in the cache" in out
    assert len(list(cache.glob("*.json"))) == 6
    assert main([*common, "--out", str(tmp_path / "final")]) == 0
    out = capsys.readouterr().out
    assert out.count("3 points, 3 from the cache") == 2  # the final run trained no grid point
    alone = tmp_path / "alone"
    k = common.index("--grid-cache")
    assert main([*common[:k], *common[k + 2:], "--out", str(alone)]) == 0  # one job, its own cache
    capsys.readouterr()
    for method in ("adam", "kfac"):
        a = json.loads((tmp_path / "final" / "grid" / f"digits_autoencoder__{method}.json").read_text())
        b = json.loads((alone / "grid" / f"digits_autoencoder__{method}.json").read_text())
        assert a["points"] == b["points"] and a["choice"]["lr"] == b["choice"]["lr"]  # same points as one job


def test_a_grid_shard_is_checked(tmp_path, capsys):
    base = ["bench", "--problem", "digits_autoencoder", "--small", "--grid-lr", "0.1", "--out", str(tmp_path)]
    assert main([*base, "--grid-shard", "3/2", "--grid-cache", str(tmp_path / "c")]) == 2
    assert "1 ≤ i ≤ n" in capsys.readouterr().err
    assert main([*base, "--grid-shard", "1/2"]) == 2
    assert "--grid-cache DIR" in capsys.readouterr().err
