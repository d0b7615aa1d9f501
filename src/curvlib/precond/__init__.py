"""The ``precond`` layer (DESIGN.md §2): a configuration and a plugin registry -> a
:class:`Preconditioner` (first level + optional coarse level, or a natural-gradient reference).

- :class:`PreconditionerConfig` (:mod:`curvlib.precond.config`): the strict, frozen
  configuration, from keywords, a mapping or a YAML/JSON file;
- :func:`build_preconditioner` (:mod:`curvlib.precond.builder`): resolves every kind in the
  registry and validates its options;
- :class:`Preconditioner` (:mod:`curvlib.precond.preconditioner`): ``update(batch)`` on the
  T1/T2 schedule, ``apply(grad)``, ``state_dict()``/``load_state_dict()``;
- the reference preconditioners (:mod:`curvlib.precond.references`): exact and block-diagonal
  natural gradient by Woodbury (4.50), (4.52).
"""

from curvlib.precond.builder import build_preconditioner
from curvlib.precond.config import LayerRule, PreconditionerConfig, ResolvedConfig, ResolvedKind, ResolvedRule, resolve_config
from curvlib.precond.preconditioner import LayerGroup, NotReadyError, Preconditioner, UpdateInfo, preserved_buffers
from curvlib.precond.references import (
    BlockNaturalGradient,
    ExactNaturalGradient,
    block_natural_gradient,
    exact_natural_gradient,
)

__all__ = [
    "BlockNaturalGradient",
    "ExactNaturalGradient",
    "block_natural_gradient",
    "exact_natural_gradient",
    "LayerGroup",
    "LayerRule",
    "NotReadyError",
    "Preconditioner",
    "PreconditionerConfig",
    "ResolvedConfig",
    "ResolvedKind",
    "ResolvedRule",
    "UpdateInfo",
    "build_preconditioner",
    "preserved_buffers",
    "resolve_config",
]
