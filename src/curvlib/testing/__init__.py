"""Tools for testing curvlib and its plugins — the kit plugin authors reuse (DESIGN.md §6).

- :mod:`curvlib.testing.compare`: :func:`assert_close`, :func:`assert_symmetric`,
  :func:`assert_psd` — comparisons that fail with a readable report; tolerances from the
  dtype (:func:`default_tolerances`);
- :mod:`curvlib.testing.references`: dense float64 ground truth computed another way
  (per-sample gradients from ``torch.func``, dense Fisher/empirical Fisher/GGN/Hessian in
  curvlib's flat order, Z(M) by index loops, the dense block of ``LayerStatistics``);
- :mod:`curvlib.testing.strategies` (needs ``hypothesis``): SPD matrices, Kronecker
  factors, ``LayerStatistics`` of Linear and conv layers, small networks with a batch;
- :mod:`curvlib.testing.conformance` (needs ``pytest`` and ``hypothesis``; one module per
  family): the mixins a plugin's tests subclass — :class:`ApproximatorConformance`,
  :class:`DampingConformance`, :class:`CoarseSpaceConformance`,
  :class:`CurvatureConformance`, :class:`LayerAdapterConformance` (also importable from
  here; loaded on first use).
"""

from __future__ import annotations

from typing import Any

from curvlib.testing import references
from curvlib.testing.compare import assert_close, assert_psd, assert_symmetric, default_tolerances, max_error_report

__all__ = [
    "ApproximatorConformance",
    "CoarseSpaceConformance",
    "CurvatureConformance",
    "DampingConformance",
    "LayerAdapterConformance",
    "OperatorConformance",
    "assert_close",
    "assert_psd",
    "assert_symmetric",
    "default_tolerances",
    "max_error_report",
    "references",
]

_CONFORMANCE = {
    "ApproximatorConformance",
    "CoarseSpaceConformance",
    "CurvatureConformance",
    "DampingConformance",
    "LayerAdapterConformance",
    "OperatorConformance",
}


def __getattr__(name: str) -> Any:
    # the conformance mixins import pytest and hypothesis (test extras): load them on demand
    if name in _CONFORMANCE:
        from curvlib.testing import conformance

        return getattr(conformance, name)
    raise AttributeError(f"module 'curvlib.testing' has no attribute {name!r}")
