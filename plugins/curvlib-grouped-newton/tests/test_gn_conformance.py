"""curvlib's conformance kit on the ``grouped_direction`` coarse space, as installed."""

from __future__ import annotations

from gn_reference import single_thread  # noqa: F401  (autouse fixture; importing gn_reference loads the hypothesis profile)

from curvlib.testing.conformance import CoarseSpaceConformance


class _Installed:
    registry_kind_installed = True  # found through the `curvlib` entry point of the installed distribution
    distribution = "curvlib-grouped-newton"
    bad_options = ({"direction": "momentum"}, {"direction": 1})


class TestGroupedDirectionConformance(_Installed, CoarseSpaceConformance):
    kind = "grouped_direction"  # u = the vector being preconditioned (the gradient)


class TestGroupedDirectionGradientConformance(_Installed, CoarseSpaceConformance):
    kind = "grouped_direction"
    options = {"direction": "gradient"}  # u = the curvature's captured gradient
