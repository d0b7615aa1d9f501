"""The canonical parameter-tensor partition on every kind of layer block."""

from __future__ import annotations

import torch

import curvlib
from curvlib.coarse import Partition
from curvlib.testing.models import tiny_mixed_model


def test_parameter_tensor_groups_hold_each_parameter_piece():
    """Each group is exactly the rows of vec(W̄) holding one parameter's piece: a unit vector
    on a group maps back to that parameter (and nothing else) through vector_to_params."""
    case = tiny_mixed_model()
    F = curvlib.curvature("ggn", case.model, case.loss_fn, (case.X, case.y))
    part = Partition.parameter_tensors(F)
    params = F.params()
    covered = torch.zeros(F.p, dtype=torch.bool)
    for k, name in enumerate(part.names):
        v = torch.zeros(F.p, dtype=torch.float64)
        v[part.groups[k]] = 1.0
        covered[part.groups[k]] = True
        back = F.vector_to_params(v)
        hit = [i for i, t in enumerate(back) if bool(t.ne(0).any())]
        assert len(hit) == 1, f"group {name} touches {len(hit)} parameters"
        assert int(back[hit[0]].ne(0).sum()) == part.sizes[k]
    assert bool(covered.all())
    assert any(".weight" in n for n in part.names) and len(part.names) >= len(params)
