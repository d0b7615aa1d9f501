"""The README's commands and Python examples are what CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_python_examples_run():
    blocks = _blocks("python")
    assert blocks, "README has no python example"
    for block in blocks:
        namespace: dict = {"__name__": "__readme__"}
        exec(compile(block, "README.md", "exec"), namespace)


def test_ci_runs_exactly_the_readme_test_command():
    commands = [line for block in _blocks("bash") for line in block.splitlines() if line and not line.startswith("#")]
    test_cmds = [c for c in commands if "pytest" in c]
    assert len(test_cmds) == 1, test_cmds
    ci_lines = [l for l in (ROOT / ".ci" / "run").read_text().splitlines() if l and not l.startswith("#")]
    assert test_cmds[0] in ci_lines, (test_cmds[0], ci_lines)


def test_readme_commands_pin_torch_with_the_constraints_file():
    commands = [line for block in _blocks("bash") for line in block.splitlines() if "pip install" in line]
    assert len(commands) == 2
    for cmd in commands:
        for install in cmd.split("pip install")[1:]:
            assert install.lstrip().startswith("-c constraints.txt"), cmd
    assert (ROOT / "constraints.txt").read_text().split() == ["torch==2.13.0"]


def test_docs_python_examples_run():
    """Every ```python block of docs/*.md runs as written; the blocks of one page share a
    namespace, like cells of a notebook."""
    for page in sorted((ROOT / "docs").glob("*.md")):
        namespace: dict = {"__name__": "__docs__"}
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
            exec(compile(block, str(page), "exec"), namespace)
