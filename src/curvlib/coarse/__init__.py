"""Coarse spaces and two-level preconditioners (thesis §4.2).  (Exact and block-diagonal
natural gradient by Woodbury (§4.4.1), the reference preconditioners, are in
:mod:`curvlib.precond.references`.)

- :mod:`~curvlib.coarse.base`: :class:`Partition` of the parameter vector,
  :class:`CoarseBasis` R₀ᵀ = diag(V_1 … V_S) (4.23), :class:`CoarseContext`, the
  :class:`CoarseSpace` interface plugins implement;
- :mod:`~curvlib.coarse.spaces`: ``nicolaides``, ``spectral``, ``krylov``, ``residual``,
  ``taylor`` (registered by :mod:`~curvlib.coarse.plugin`);
- :mod:`~curvlib.coarse.two_level`: :class:`TwoLevelPreconditioner` (multiplicative,
  additive, Tselepidis–Kohler–Orvieto), exact matrix-free F_coarse, the error reduction (4.46);
- :mod:`~curvlib.coarse.api`: :func:`two_level`.
"""

from curvlib.coarse.api import two_level
from curvlib.coarse.base import CoarseBasis, CoarseContext, CoarseSpace, Partition, kfc_factors
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
from curvlib.coarse.two_level import (
    CoarseSolveInfo,
    TwoLevelPreconditioner,
    TwoLevelSolution,
    exact_coarse_operator,
    solve_coarse,
    tko_coarse_operator,
)

__all__ = [
    "CoarseBasis",
    "CoarseContext",
    "CoarseSolveInfo",
    "CoarseSpace",
    "KrylovCoarseSpace",
    "KrylovOptions",
    "NicolaidesCoarseSpace",
    "NicolaidesOptions",
    "Partition",
    "ResidualCoarseSpace",
    "ResidualOptions",
    "SpectralCoarseSpace",
    "SpectralOptions",
    "TaylorCoarseSpace",
    "TaylorOptions",
    "TwoLevelPreconditioner",
    "TwoLevelSolution",
    "exact_coarse_operator",
    "kfc_factors",
    "solve_coarse",
    "tko_coarse_operator",
    "two_level",
]
