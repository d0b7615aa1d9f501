"""Coarse spaces and two-level preconditioners (thesis §4.2).  (Exact and block-diagonal
natural gradient by Woodbury (§4.4.1), the reference preconditioners, are in
:mod:`curvlib.precond.references`.)

- :mod:`~curvlib.coarse.basis`: :class:`Partition` of the parameter vector,
  :class:`CoarseBasis` R₀ᵀ = diag(V_1 … V_S) (4.23);
- :mod:`~curvlib.coarse.base`: :class:`CoarseContext`, the :class:`CoarseSpace` interface
  plugins implement, :func:`kfc_factors`;
- :mod:`~curvlib.coarse.spaces`: ``nicolaides``, ``spectral``, ``krylov``, ``residual``,
  ``taylor`` (registered by :mod:`~curvlib.coarse.plugin`);
- :mod:`~curvlib.coarse.coarse_operator`: exact matrix-free F_coarse = R₀F•R₀ᵀ (4.14), the
  approximate R₀F̄•R₀ᵀ of Tselepidis–Kohler–Orvieto (4.20), the equilibrated coarse solve;
- :mod:`~curvlib.coarse.two_level`: :class:`TwoLevelPreconditioner` (multiplicative,
  additive, Tselepidis–Kohler–Orvieto), the error reduction (4.46);
- :mod:`~curvlib.coarse.api`: :func:`two_level`.
"""

from curvlib.coarse.api import two_level
from curvlib.coarse.base import CoarseContext, CoarseSpace, kfc_factors
from curvlib.coarse.basis import CoarseBasis, Partition
from curvlib.coarse.coarse_operator import exact_coarse_operator, solve_coarse, tko_coarse_operator
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
from curvlib.coarse.two_level import CoarseSolveInfo, TwoLevelPreconditioner, TwoLevelSolution

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
