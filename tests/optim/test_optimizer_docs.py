"""The Python examples of docs/optimizer.md run as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "optimizer.md"


def test_optimizer_doc_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2
    rng_state = torch.get_rng_state()
    try:
        for block in blocks:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # excluded BatchNorm parameters, batch coupling
                exec(compile(block, str(DOC), "exec"), {"__name__": "__doc__"})
    finally:
        torch.set_rng_state(rng_state)


def test_optimizer_doc_yaml_example_is_a_valid_config(tmp_path):
    from curvlib.precond import PreconditionerConfig

    (block,) = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    f = tmp_path / "precond.yaml"
    f.write_text(block)
    cfg = PreconditionerConfig.from_file(f)
    assert cfg.coarse_space == {"kind": "residual"} and cfg.invert_every == 100
