"""curvlib: pluggable Kronecker-factored curvature approximations and natural-gradient
preconditioners for PyTorch.

Subpackages follow the layering of DESIGN.md §2 (imports point downward only):
``linalg`` (pure tensor kernels), ``capture`` (layer adapters and hooks),
``curvatures`` (exact matrix-free curvature operators), ``approximators`` /
``damping`` / ``coarse`` (the plug-in families), and the side pillars ``plugins``,
``config``, ``errors``.
"""

from curvlib import errors, linalg, plugins
from curvlib.errors import CurvlibError, NumericalWarning, PerformanceWarning

__version__ = "0.1.0"

__all__ = ["CurvlibError", "NumericalWarning", "PerformanceWarning", "errors", "linalg", "plugins", "__version__"]
