"""``curvlib bench`` under hostile input: bad ``--out``, ``--config`` and names end in one line
``curvlib: error: ...`` and exit code 2; Ctrl-C keeps what finished and exits 130; the summary
is rewritten atomically after every run; a real bug keeps its traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import curvlib.bench.job as job
import curvlib.bench.record as record
from curvlib.cli import main

FAST = ["--problem", "digits_autoencoder", "--small", "--threads", "1", "--warmup-steps", "0",
        "--progress", "none", "--no-plots", "--steps", "2"]
THREE = ["--methods", "sgd", "adam", "adamw"]


def _usage_error(capsys, argv: list[str], *needles: str) -> str:
    """Run ``argv``; check exit code 2 and one ``curvlib: error:`` line naming ``needles``."""
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("curvlib: error: "), err
    assert "Traceback" not in err + captured.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# -- --out --------------------------------------------------------------------------------------


def test_out_is_an_existing_file(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    _usage_error(capsys, ["bench", *FAST, "--methods", "sgd", "--out", str(target)],
                 str(target), "not a directory")
    assert target.read_text() == "keep me\n"


def test_out_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "sub"  # a directory under a file: refused even to root
    _usage_error(capsys, ["bench", *FAST, "--methods", "sgd", "--out", str(out)], str(out), "cannot create")


def test_out_unwritable_directory(tmp_path, capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        _usage_error(capsys, ["bench", *FAST, "--methods", "sgd", "--out", str(locked / "res")], str(locked / "res"))
    finally:
        locked.chmod(0o700)


# -- --config -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "needles"),
    [
        ("missing.yaml", None, ["missing.yaml", "no such file"]),
        ("dup.yaml", "steps: 2\nseed: 1\nsteps: 3\n", ["duplicate key 'steps'", "dup.yaml", "line 3", "line 1"]),
        ("dup.json", '{"steps": 2, "steps": 3}', ["duplicate key 'steps'", "dup.json"]),
        ("nested_dup.yaml", "methods:\n  - {name: sgd, lr: 0.1, lr: 0.2}\n", ["duplicate key 'lr'", "line 2"]),
        ("binary.yaml", b"\x89PNG\r\n\x1a\n\xff\xfe", ["binary.yaml", "not UTF-8"]),
        ("syntax.yaml", "steps: 2\nmethods: [sgd,\n", ["syntax.yaml", "could not parse", "line 3"]),
        ("syntax.json", '{"steps": 2,}', ["syntax.json", "could not parse", "line 1"]),
        ("list.yaml", "- sgd\n- adam\n", ["list.yaml", "mapping", "list"]),
        ("strict_int.yaml", 'steps: "5"\n', ["steps", "'5'"]),
        ("strict_bool.yaml", "small: 1\n", ["small", "boolean"]),
        ("strict_seed.json", '{"seed": 1.0}', ["seed", "integer"]),
        ("unknown.yaml", "stepz: 3\n", ["stepz"]),
    ],
)
def test_bad_config_files(tmp_path, capsys, name, content, needles):
    cfg = tmp_path / name
    if isinstance(content, bytes):
        cfg.write_bytes(content)
    elif content is not None:
        cfg.write_text(content)
    argv = ["bench", "--problem", "digits_autoencoder", "--methods", "sgd", "--warmup-steps", "0",
            "--progress", "none", "--no-plots", "--config", str(cfg), "--out", str(tmp_path / "out")]
    _usage_error(capsys, argv, *needles)
    assert not (tmp_path / "out" / "runs").exists()


def test_config_is_a_directory(tmp_path, capsys):
    _usage_error(capsys, ["bench", *FAST, "--methods", "sgd", "--config", str(tmp_path)], str(tmp_path), "directory")


def test_yaml_scientific_notation_is_a_float(tmp_path, capsys):
    cfg = tmp_path / "bench.yaml"
    cfg.write_text("methods:\n  - {name: sgd, lr: 1e-3}\n  - {name: adam, lr: 2E-3}\ntarget_margin: 5e-2\n")
    out = tmp_path / "out"
    assert main(["bench", *FAST, "--config", str(cfg), "--out", str(out)]) == 0, capsys.readouterr().err
    sgd = json.loads((out / "runs" / "digits_autoencoder__sgd.json").read_text())
    adam = json.loads((out / "runs" / "digits_autoencoder__adam.json").read_text())
    assert sgd["hyperparameters"]["lr"] == 1e-3 and adam["hyperparameters"]["lr"] == 2e-3
    assert json.loads((out / "summary.json").read_text())["target_margin"] == 0.05


# -- names --------------------------------------------------------------------------------------


def test_unknown_method_and_problem(tmp_path, capsys):
    _usage_error(capsys, ["bench", *FAST, "--methods", "sgd", "kfca", "--out", str(tmp_path)], "unknown method 'kfca'")
    _usage_error(capsys, ["bench", *FAST[2:], "--problem", "nope", "--methods", "sgd", "--out", str(tmp_path)],
                 "unknown problem(s) ['nope']", "digits_autoencoder")
    assert not (tmp_path / "runs").exists()


# -- incremental, atomic summary ----------------------------------------------------------------


def test_summary_is_rewritten_atomically_after_every_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    seen: list[dict] = []
    original_train = job.train

    def train(*args, **kwargs):
        summary = out / "summary.json"
        seen.append(json.loads(summary.read_text()) if summary.exists() else {})
        return original_train(*args, **kwargs)

    replaced: list[tuple[Path, Path]] = []
    original_replace = record.os.replace

    def replace(src, dst):
        replaced.append((Path(src), Path(dst)))
        return original_replace(src, dst)

    monkeypatch.setattr(job, "train", train)
    monkeypatch.setattr(record.os, "replace", replace)
    assert main(["bench", *FAST, *THREE, "--out", str(out)]) == 0, capsys.readouterr().err
    # before run k, the summary holds the k - 1 finished runs
    assert seen[0] == {}
    for k, summary in enumerate(seen[1:], start=1):
        runs = summary["problems"]["digits_autoencoder"]["runs"]
        assert [r["method"] for r in runs] == ["sgd", "adam", "adamw"][:k]
        assert (summary["runs_finished"], summary["runs_planned"]) == (k, 3)
    final = json.loads((out / "summary.json").read_text())
    assert (final["runs_finished"], final["runs_planned"]) == (3, 3)
    # every summary write went through a temporary file in the same directory
    summary_writes = [(src, dst) for src, dst in replaced if dst.name in ("summary.json", "summary.txt")]
    assert len(summary_writes) >= 2 * 3
    assert all(src.parent == dst.parent and src != dst for src, dst in summary_writes)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# -- Ctrl-C ----------------------------------------------------------------------------------


def test_interrupt_keeps_finished_runs_and_their_summary(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    calls = []
    original_train = job.train

    def train(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_train(*args, **kwargs)

    monkeypatch.setattr(job, "train", train)
    rc = main(["bench", *FAST, *THREE, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 130, captured.err
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == [f"curvlib bench: interrupted after 1 of 3 runs; results so far in {out}"]
    assert json.loads((out / "runs" / "digits_autoencoder__sgd.json").read_text())["status"] == "ok"
    assert not (out / "runs" / "digits_autoencoder__adam.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["runs_finished"], summary["runs_planned"]) == (1, 3)
    assert [r["method"] for r in summary["problems"]["digits_autoencoder"]["runs"]] == ["sgd"]
    assert (out / "summary.txt").read_text().startswith("digits_autoencoder")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_interrupt_before_any_run_finishes(tmp_path, capsys, monkeypatch):
    def train(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "train", train)
    out = tmp_path / "out"
    assert main(["bench", *FAST, *THREE, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted after 0 of 3 runs" in err and "Traceback" not in err
    assert not (out / "runs").exists() and not (out / "summary.json").exists()


def test_interrupt_outside_the_job_exits_130(monkeypatch, capsys):
    import curvlib.cli as cli

    def load_registry(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_registry", load_registry)
    assert main(["plugins", "list"]) == 130
    err = capsys.readouterr().err
    assert "curvlib: interrupted" in err and "Traceback" not in err


# -- real bugs stay visible ---------------------------------------------------------------------


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def train(*args, **kwargs):
        raise ZeroDivisionError("a bug, not a usage error")

    monkeypatch.setattr(job, "train", train)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["bench", *FAST, "--methods", "sgd", "--out", str(tmp_path / "out")])


def test_a_real_sigint_in_a_fresh_process(tmp_path):
    """The console command as a user runs it: SIGINT after the first run finished."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    env = {**os.environ, "CURVLIB_DISABLE_EXTERNAL_PLUGINS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "curvlib", "bench", *FAST[:-2], "--steps", "1500", "--eval-every", "1500", *THREE, "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        deadline = time.monotonic() + 240
        first = out / "runs" / "digits_autoencoder__sgd.json"
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.exists(), proc.communicate(timeout=60)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode == 0:
        pytest.skip("the job finished before the signal arrived (a very fast machine)")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    match = re.search(r"curvlib bench: interrupted after (\d) of 3 runs; results so far in (.+)$", stderr.strip())
    assert match, stderr
    finished = int(match.group(1))
    assert 1 <= finished < 3 and match.group(2) == str(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs_finished"] == finished == len(list((out / "runs").glob("*.json")))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
