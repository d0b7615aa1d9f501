"""Hook specifications of curvlib's plugin system (one module, one hook per family).

A plugin is any importable object (usually a module) named by an entry point in the
``curvlib`` group.  It implements one or more of the hooks below, decorated with
:data:`hookimpl`.  Each hook receives a typed *registrar* for its family and calls
``registry.add(kind, factory, options=OptionsModel)`` once per kind it provides.
Nothing is returned; curvlib's own built-ins go through exactly the same path.

Example (a third-party ``my_plugin.py``)::

    from curvlib.plugins import hookimpl

    @hookimpl
    def curvlib_register_dampings(registry):
        registry.add("my_damping", MyDamping, options=MyDampingOptions)

and in that distribution's ``pyproject.toml``::

    [project.entry-points.curvlib]
    my_plugin = "my_plugin"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pluggy
from pydantic import BaseModel

PROJECT_NAME = "curvlib"
ENTRY_POINT_GROUP = "curvlib"

#: Entry-point name -> module of curvlib's own plugins.  Must equal the
#: ``[project.entry-points.curvlib]`` table of pyproject.toml (a test checks it).
BUILTIN_PLUGIN_MODULES: dict[str, str] = {
    "builtin_layers": "curvlib.capture.plugin",
    "builtin_curvatures": "curvlib.curvatures.plugin",
    "builtin_approximators": "curvlib.approximators.plugin",
    "builtin_dampings": "curvlib.damping.plugin",
    "builtin_coarse_spaces": "curvlib.coarse.plugin",
}


class FamilyRegistrar(Protocol):
    """What every ``curvlib_register_<family>`` hook receives: a registrar bound to one family
    and one plugin (implemented by :class:`curvlib.plugins.registry.FamilyRegistrar`)."""

    family: str

    def add(self, kind: str, factory: Callable[..., Any], *, options: type[BaseModel] | None = None,
            description: str = "", **metadata: Any) -> None:
        """Register ``kind`` with its ``factory`` and pydantic ``options`` model."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def curvlib_register_approximators(registry: FamilyRegistrar) -> None:
    """Register block approximators: objects that fit a Kronecker sum Σ_k A_k ⊗ B_k
    to one layer block of a curvature operator (KFAC, KPSVD, …).

    Call ``registry.add(kind, approximator_class, options=OptionsModel)``.
    """


@hookspec
def curvlib_register_dampings(registry: FamilyRegistrar) -> None:
    """Register dampings: objects that turn a Kronecker sum into an applied,
    regularized inverse (Tikhonov, the π-split heuristic, Levenberg–Marquardt, …).

    Call ``registry.add(kind, damping_class, options=OptionsModel)``.
    """


@hookspec
def curvlib_register_coarse_spaces(registry: FamilyRegistrar) -> None:
    """Register coarse spaces of two-level preconditioners (Nicolaides, spectral,
    Krylov, residual, Taylor, …).

    Call ``registry.add(kind, coarse_space_class, options=OptionsModel)``.
    """


@hookspec
def curvlib_register_curvatures(registry: FamilyRegistrar) -> None:
    """Register curvature kinds (``fisher``, ``empirical_fisher``, ``ggn``, ``hessian``, …):
    factories that build a curvature operator from a model, a loss and a batch.

    Call ``registry.add(kind, curvature_factory, options=OptionsModel)``.
    """


@hookspec
def curvlib_register_layers(registry: FamilyRegistrar) -> None:
    """Register layer adapters: map a ``torch.nn`` module type to the layer matrix
    W̄ = [W, b] and capture its per-sample statistics.

    Call ``registry.add(kind, adapter_class, options=OptionsModel, module_types=(nn.Linear,))``.
    """


@hookspec
def curvlib_register_optimizers(registry: FamilyRegistrar) -> None:
    """Register whole optimizers (``torch.optim.Optimizer`` subclasses) that ``curvlib bench``
    runs by name like its built-in methods (``curvlib bench --methods <kind>``).

    Call ``registry.add(kind, factory, options=OptionsModel, needs_batch=bool,
    default_lr=float, description=...)``.  ``factory(options)`` (``options`` the validated
    model) returns a builder whose
    ``build(model, loss_fn, *, lr, generator, registry) -> torch.optim.Optimizer``
    makes the optimizer of ``model``'s trainable parameters: ``lr`` is the benchmark's
    learning rate (``--lr``; ``default_lr`` when the user gives none), ``generator`` a
    seeded ``torch.Generator`` for any random draw, ``registry`` the plugin registry.
    ``needs_batch=True``: the benchmark calls ``optimizer.step(batch=(X, y))`` after the
    backward pass (as for :class:`curvlib.optim.NaturalGradient`); else ``step()``.
    """


HOOK_FAMILIES: dict[str, str] = {
    "curvlib_register_approximators": "approximators",
    "curvlib_register_dampings": "dampings",
    "curvlib_register_coarse_spaces": "coarse_spaces",
    "curvlib_register_curvatures": "curvatures",
    "curvlib_register_layers": "layers",
    "curvlib_register_optimizers": "optimizers",
}
"""Hook name -> family name, in the order families are registered."""
