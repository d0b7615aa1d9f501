"""The README's example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from gn_reference import single_thread  # noqa: F401  (autouse fixture)

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
