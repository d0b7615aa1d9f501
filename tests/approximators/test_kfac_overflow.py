"""KFAC factors that overflow from finite statistics never enter the EMA (a reported
failure: inputs × 1e20 gave inf factors that were blended in and kept forever)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlib
from curvlib.errors import NumericalError, NumericalWarning


def _F(scale):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(8, 3) * scale, torch.randint(0, 2, (8,))
    return curvlib.curvature("ggn", model, nn.CrossEntropyLoss(), (X, y))


def test_overflowing_factors_keep_the_previous_fit():
    clean = curvlib.approximate(_F(1.0), "kfac")
    huge = _F(1e20)  # finite float32 inputs whose outer products overflow
    assert bool(torch.isfinite(huge.statistics(0).uses[0].a.dense()).all())  # the statistics are finite
    with pytest.warns(NumericalWarning, match="non-finite KFAC factors"):
        kept = curvlib.approximate(huge, "kfac", previous=clean)
    assert kept[0] is clean[0]
    assert all(bool(torch.isfinite(M).all()) for fit in kept for A, G in fit.terms for M in (A, G))
    with pytest.raises(NumericalError, match="non-finite KFAC factors"):
        curvlib.approximate(huge, "kfac")
