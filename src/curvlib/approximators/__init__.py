"""Block approximators: one Kronecker sum Σ_k A_k ⊗ B_k per layer block of a curvature
operator (DESIGN.md §3), and the errors of §3.3.1.

- :mod:`~curvlib.approximators.base` — the interface (:class:`BlockApproximator`,
  :class:`LayerFit`, :class:`FitInfo`) and the EMA helpers of §3.1.2;
- :mod:`~curvlib.approximators.kfac` — ``kfac`` (3.19), KFC (3.29)–(3.30), §5.2.3;
- :mod:`~curvlib.approximators.svd_based` — ``kpsvd`` (3.22), ``deflation``
  (§3.2.3.1), ``lanczos`` (§3.2.3.2), ``kfac_corrected`` (3.26);
- :mod:`~curvlib.approximators.lowrank` — ``kfac_lowrank`` (A⊗G plus low rank, Woodbury);
- :mod:`~curvlib.approximators.tensor` — ``kpsvd_tensor`` (one factor per mode of the weight tensor);
- :mod:`~curvlib.approximators.tnt` — ``tnt`` (tensor normal training's mode covariances);
- :mod:`~curvlib.approximators.singd` — ``singd`` (SINGD's inverse factors, a running update);
- :mod:`~curvlib.approximators.exact` — ``exact_block`` (:class:`ExactBlock`, (4.52));
- :mod:`~curvlib.approximators.api` — :func:`approximate`, :class:`BlockDiagonalApproximation`,
  :func:`approximation_error`.
"""

from curvlib.approximators.api import (
    ApproximationError,
    BlockDiagonalApproximation,
    approximate,
    approximation_error,
)
from curvlib.approximators.base import (
    ApproximatorOptions,
    BlockApproximator,
    FitInfo,
    LayerFit,
    align_signs,
    ema_rho,
    ema_terms,
)
from curvlib.approximators.exact import ExactBlock, ExactBlockApproximator, ExactBlockOptions, pair_gram
from curvlib.approximators.kfac import KFACApproximator, KFACOptions, kfac_factors
from curvlib.approximators.lowrank import KFACLowRankApproximator, KFACLowRankOptions, KroneckerLowRank
from curvlib.approximators.singd import SINGDApproximator, SINGDBlock, SINGDOptions
from curvlib.approximators.tensor import KPSVDTensorApproximator, KPSVDTensorOptions, MultiKronecker, MultiKroneckerSum
from curvlib.approximators.tnt import TNTApproximator, TNTOptions, mode_covariances
from curvlib.approximators.svd_based import (
    DeflationApproximator,
    DeflationOptions,
    IterativeOptions,
    KFACCorrectedApproximator,
    KFACCorrectedOptions,
    KPSVDApproximator,
    KPSVDOptions,
    LanczosApproximator,
    LanczosOptions,
    z_operator,
)

__all__ = [
    "ApproximationError",
    "ApproximatorOptions",
    "BlockApproximator",
    "BlockDiagonalApproximation",
    "DeflationApproximator",
    "DeflationOptions",
    "ExactBlock",
    "ExactBlockApproximator",
    "ExactBlockOptions",
    "FitInfo",
    "IterativeOptions",
    "KFACApproximator",
    "KFACCorrectedApproximator",
    "KFACCorrectedOptions",
    "KFACLowRankApproximator",
    "KFACLowRankOptions",
    "KFACOptions",
    "KPSVDApproximator",
    "KPSVDTensorApproximator",
    "KPSVDTensorOptions",
    "KPSVDOptions",
    "LanczosApproximator",
    "LanczosOptions",
    "KroneckerLowRank",
    "LayerFit",
    "MultiKronecker",
    "MultiKroneckerSum",
    "SINGDApproximator",
    "SINGDBlock",
    "SINGDOptions",
    "TNTApproximator",
    "TNTOptions",
    "align_signs",
    "approximate",
    "approximation_error",
    "ema_rho",
    "ema_terms",
    "kfac_factors",
    "mode_covariances",
    "pair_gram",
    "z_operator",
]
