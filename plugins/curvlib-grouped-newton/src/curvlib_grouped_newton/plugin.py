"""The ``curvlib`` entry point of this distribution (``grouped_newton`` in pyproject.toml).

Registers one kind: the ``grouped_direction`` coarse space (seed 004 §4.1 as a coarse
basis, :mod:`curvlib_grouped_newton.coarse`).  The rest of the method is built from
curvlib's own kinds (the ``hessian`` curvature) plus what no curvlib family models: the
third-order summary (appendix A), the cubic-regularized solve (appendix D) and the
optimizer with the schedule of appendix F.
"""

from __future__ import annotations

from curvlib.plugins import hookimpl

from curvlib_grouped_newton.coarse import GroupedDirectionCoarseSpace, GroupedDirectionOptions


@hookimpl
def curvlib_register_coarse_spaces(registry) -> None:
    """Register the coarse space of seed 004."""
    registry.add(
        "grouped_direction",
        GroupedDirectionCoarseSpace,
        options=GroupedDirectionOptions,
        description="seed 004: one column per group, the direction u (gradient) restricted to it; "
        "R₀HR₀ᵀ is the summary Hessian H̄ = UᵀHU",
    )
