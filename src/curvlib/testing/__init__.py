"""Tools for testing curvlib and its plugins: tolerances, readable comparisons,
hypothesis strategies (:mod:`curvlib.testing.strategies`, needs ``hypothesis``)."""

from curvlib.testing.compare import assert_close, default_tolerances, max_error_report

__all__ = ["assert_close", "default_tolerances", "max_error_report"]
