"""curvlib's built-in coarse plugin, registered through the ``curvlib`` entry-point group
exactly like a third-party plugin (see pyproject.toml)."""

from __future__ import annotations

from curvlib.coarse.spaces import (
    KrylovCoarseSpace,
    KrylovOptions,
    NicolaidesCoarseSpace,
    NicolaidesOptions,
    ResidualCoarseSpace,
    ResidualOptions,
    SpectralCoarseSpace,
    SpectralOptions,
    TaylorCoarseSpace,
    TaylorOptions,
)
from curvlib.plugins import hookimpl


@hookimpl
def curvlib_register_coarse_spaces(registry) -> None:
    """Register the coarse spaces of thesis §4.2.3."""
    registry.add("nicolaides", NicolaidesCoarseSpace, options=NicolaidesOptions,
                 description="Nicolaides: one all-ones column per group (4.25)-(4.26)")
    registry.add("spectral", SpectralCoarseSpace, options=SpectralOptions,
                 description="smallest-eigenvalue eigenvector v_A ⊗ v_G of each damped KFAC block (4.27)-(4.30)")
    registry.add("krylov", KrylovCoarseSpace, options=KrylovOptions,
                 description="inverse-power iterates of the first-level blocks on a Nicolaides or residual seed (4.31)")
    registry.add("residual", ResidualCoarseSpace, options=ResidualOptions,
                 description="first-level-preconditioned residual, split by group (4.34)")
    registry.add("taylor", TaylorCoarseSpace, options=TaylorOptions,
                 description="Taylor coarse space of order q: M r, (M F•) M r, … split by group (4.38)-(4.40)")
