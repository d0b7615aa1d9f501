"""The curvlib plugin of this distribution: one hook, one kind.

Declared in this distribution's ``pyproject.toml`` as the entry point
``ekfac = "curvlib_ekfac.plugin"`` of the ``curvlib`` group; curvlib imports this module
when it loads its registry and calls the hook below with the approximators' registrar.
"""

from __future__ import annotations

from curvlib.plugins import hookimpl

from curvlib_ekfac.approximator import EKFACApproximator, EKFACOptions


@hookimpl
def curvlib_register_approximators(registry) -> None:
    """Register the ``ekfac`` approximator kind with its options model.

    ``default_damping`` tells front ends (``curvlib bench``) which damping suits the block:
    ``tikhonov`` (the π-split ``heuristic`` needs Kronecker factors).
    """
    registry.add(
        "ekfac",
        EKFACApproximator,
        options=EKFACOptions,
        description="EKFAC: KFAC's eigenbasis with the diagonal re-fitted to the block (George et al., 2018)",
        default_damping="tikhonov",
    )
