"""curvlib: pluggable Kronecker-factored curvature approximations and natural-gradient
preconditioners for PyTorch.

Subpackages follow the layering of DESIGN.md §2 (imports point downward only):
``linalg`` (pure tensor kernels), ``capture`` (layer adapters and hooks),
``curvatures`` (exact matrix-free curvature operators), ``approximators`` /
``damping`` / ``coarse`` (the plug-in families), and the side pillars ``plugins``,
``config``, ``errors``.
"""

from curvlib import approximators, coarse, damping, errors, linalg, optim, plugins, precond
from curvlib.approximators import BlockDiagonalApproximation, approximate, approximation_error
from curvlib.coarse.api import two_level
from curvlib.capture.adapters import BatchCouplingWarning, ExcludedParametersWarning, LayerAdapter
from curvlib.capture.layout import LayerBlock
from curvlib.curvatures.api import curvature
from curvlib.curvatures.data import DataCurvatureOperator, kfac_factors_over
from curvlib.curvatures.objective import Objective
from curvlib.curvatures.operator import CurvatureBlock, CurvatureOperator, HessianOperator, NoStatisticsError
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.damping import BlockDiagonalInverse, damped_inverse
from curvlib.errors import CurvlibError, NumericalWarning, PerformanceWarning
from curvlib.optim import NaturalGradient
from curvlib.precond import Preconditioner, PreconditionerConfig, build_preconditioner
from curvlib.precond.references import block_natural_gradient, exact_natural_gradient

__version__ = "0.1.0"

__all__ = [
    "NaturalGradient",
    "Preconditioner",
    "PreconditionerConfig",
    "block_natural_gradient",
    "build_preconditioner",
    "coarse",
    "exact_natural_gradient",
    "optim",
    "precond",
    "two_level",
    "BlockDiagonalApproximation",
    "BlockDiagonalInverse",
    "approximate",
    "approximation_error",
    "approximators",
    "damped_inverse",
    "damping",
    "BatchCouplingWarning",
    "CurvatureBlock",
    "CurvatureOperator",
    "DataCurvatureOperator",
    "CurvlibError",
    "ExcludedParametersWarning",
    "HessianOperator",
    "LayerAdapter",
    "LayerBlock",
    "LayerStatistics",
    "NoStatisticsError",
    "Objective",
    "NumericalWarning",
    "PerformanceWarning",
    "__version__",
    "curvature",
    "kfac_factors_over",
    "errors",
    "linalg",
    "plugins",
]
