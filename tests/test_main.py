"""``python -m curvlib`` is the ``curvlib`` console script (``curvlib.cli:main``): the same
commands, output and exit codes, run in a fresh interpreter as a user runs it."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curvlib.cli import main
from curvlib.plugins import DISABLE_EXTERNAL_ENV


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # external plugins off: the listing then depends on curvlib alone, in both interpreters
    env = {**os.environ, DISABLE_EXTERNAL_ENV: "1"}
    return subprocess.run([sys.executable, "-m", "curvlib", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_python_m_curvlib_plugins_list_matches_the_console_script(tmp_path, monkeypatch):
    proc = _run(["plugins", "list"], tmp_path)
    assert proc.returncode == 0, f"`python -m curvlib plugins list` failed (rc {proc.returncode}):\n{proc.stderr}"
    assert "approximators (" in proc.stdout and "coarse_spaces (" in proc.stdout
    assert any(line.split()[:1] == ["kfac"] for line in proc.stdout.splitlines())

    monkeypatch.setenv(DISABLE_EXTERNAL_ENV, "1")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plugins", "list"]) == 0
    assert proc.stdout == buf.getvalue()


def test_python_m_curvlib_help_names_the_curvlib_program(tmp_path):
    proc = _run(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: curvlib ")
    assert "plugins" in proc.stdout and "bench" in proc.stdout


def test_python_m_curvlib_without_a_command_is_a_usage_error(tmp_path):
    proc = _run([], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: curvlib ") and "required" in proc.stderr


@pytest.mark.parametrize("args", [["bench", "--help"], ["bench", "--list-problems"]])
def test_python_m_curvlib_bench_runs(tmp_path, args):
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "mnist_autoencoder" in proc.stdout
