"""The damping family: a curvature block Σ_k A_k⊗B_k (or an exact block) -> an applied,
regularized inverse.

- :class:`Damping` / :class:`BlockInverse` (:mod:`curvlib.damping.base`): the interfaces;
- kinds: :class:`TikhonovDamping` (``tikhonov``, (4.54)), :class:`HeuristicDamping`
  (``heuristic``, (2.95)–(2.96), §3.2.5), :class:`LevenbergMarquardtDamping`
  (``levenberg_marquardt``) with :func:`quadratic_model_change` and :func:`reduction_ratio`;
- :func:`damped_inverse` -> :class:`BlockDiagonalInverse` (:mod:`curvlib.damping.api`).
"""

from curvlib.damping.api import BlockDiagonalInverse, damped_inverse
from curvlib.damping.base import BlockInverse, Damping, InverseInfo
from curvlib.damping.heuristic import HeuristicDamping, HeuristicOptions, PiSplitInverse, TwoTermHeuristicInverse
from curvlib.damping.inverse_free import (
    InverseFactorsDamping,
    InverseFactorsOptions,
    InverseFreeDamping,
    InverseFreeInverse,
    InverseFreeOptions,
)
from curvlib.damping.kron_inverse import KronInverseDamping, KronInverseOptions, KroneckerApproximateInverse
from curvlib.damping.levenberg_marquardt import (
    LevenbergMarquardtDamping,
    LevenbergMarquardtOptions,
    quadratic_model_change,
    reduction_ratio,
)
from curvlib.damping.tikhonov import (
    DenseTikhonovInverse,
    EigenTikhonovInverse,
    ExactBlockTikhonovInverse,
    PCGTikhonovInverse,
    TikhonovDamping,
    TikhonovOptions,
)

__all__ = [
    "BlockDiagonalInverse",
    "BlockInverse",
    "Damping",
    "DenseTikhonovInverse",
    "EigenTikhonovInverse",
    "ExactBlockTikhonovInverse",
    "HeuristicDamping",
    "HeuristicOptions",
    "InverseFactorsDamping",
    "InverseFactorsOptions",
    "InverseFreeDamping",
    "InverseFreeInverse",
    "InverseFreeOptions",
    "InverseInfo",
    "KronInverseDamping",
    "KronInverseOptions",
    "KroneckerApproximateInverse",
    "LevenbergMarquardtDamping",
    "LevenbergMarquardtOptions",
    "PCGTikhonovInverse",
    "PiSplitInverse",
    "TikhonovDamping",
    "TikhonovOptions",
    "TwoTermHeuristicInverse",
    "damped_inverse",
    "quadratic_model_change",
    "reduction_ratio",
]
