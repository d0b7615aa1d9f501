"""curvlib's built-in curvatures plugin, registered through the ``curvlib`` entry-point group
exactly like a third-party plugin (see pyproject.toml).

Kinds: ``fisher`` (:class:`~curvlib.curvatures.kinds.FisherOptions`: ``mc_samples``),
``empirical_fisher``, ``ggn`` and ``hessian``.  Each factory is called with its validated
options and has ``build(model, loss_fn, batch, *, generator, registry) -> operator``.
"""

from __future__ import annotations

from curvlib.curvatures.kinds import BUILTIN_KINDS
from curvlib.plugins import hookimpl


@hookimpl
def curvlib_register_curvatures(registry):
    for kind, factory, options in BUILTIN_KINDS:
        registry.add(kind, factory, options=options)
