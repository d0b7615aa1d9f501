"""curvlib-grouped-newton: seed 004 ("Adapting Newton's method to neural networks through a
summary of higher-order derivatives") as a curvlib plugin.

- :mod:`~curvlib_grouped_newton.coarse`: the ``grouped_direction`` coarse space (registered
  through the ``curvlib`` entry-point group), R₀ᵀ = U = diag(u_1, …, u_S), so that the
  coarse operator R₀HR₀ᵀ of the ``hessian`` curvature is the summary Hessian H̄ (§4.1);
- :mod:`~curvlib_grouped_newton.partition`: the partition of the parameters (one group per
  tensor by default, named partitions, user groups);
- :mod:`~curvlib_grouped_newton.summary`: ḡ, H̄ = UᵀHU and the order-3 diagonal D̄ by nested
  directional derivatives (appendix A);
- :mod:`~curvlib_grouped_newton.cubic`: the anisotropic Nesterov cubic regularization
  (§4.2, appendix D);
- :mod:`~curvlib_grouped_newton.rates`: the learning rates η of Method 4.1;
- :mod:`~curvlib_grouped_newton.optimizer`: :class:`GroupedNewton`, a ``torch.optim``
  optimizer with the schedule of appendix F.
"""

from curvlib_grouped_newton.coarse import GroupedDirectionCoarseSpace, GroupedDirectionOptions
from curvlib_grouped_newton.cubic import CubicSolution, cubic_model, cubic_scales, solve_anisotropic_cubic
from curvlib_grouped_newton.optimizer import GroupedNewton, GroupedNewtonOptions
from curvlib_grouped_newton.partition import NAMED_PARTITIONS, resolve_partition
from curvlib_grouped_newton.rates import GroupedRates, learning_rates, solve_summary
from curvlib_grouped_newton.summary import GroupedSummary, directional_derivatives, grouped_summary

__version__ = "0.1.0"

__all__ = [
    "CubicSolution",
    "GroupedDirectionCoarseSpace",
    "GroupedDirectionOptions",
    "GroupedNewton",
    "GroupedNewtonOptions",
    "GroupedRates",
    "GroupedSummary",
    "NAMED_PARTITIONS",
    "__version__",
    "cubic_model",
    "cubic_scales",
    "directional_derivatives",
    "grouped_summary",
    "learning_rates",
    "resolve_partition",
    "solve_anisotropic_cubic",
    "solve_summary",
]
