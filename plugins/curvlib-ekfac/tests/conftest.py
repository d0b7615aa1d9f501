"""Test configuration of curvlib-ekfac: curvlib's deterministic hypothesis profile (also
when these tests run on their own, outside curvlib's suite)."""

from __future__ import annotations

from curvlib.testing.strategies import load_profile

load_profile()
