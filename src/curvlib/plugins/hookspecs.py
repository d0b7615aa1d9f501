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

Besides the hooks, this module holds the *contract* of what the registered kinds build and
declare (docs/plugin_guide.md, "What curvlib checks"):

- :class:`KindOrigin` — which kind of which family made an object, and the plugin and
  distribution that registered it (``"curvlib"`` for the built-ins); every error about a
  kind's output names it (:meth:`KindOrigin.error`, a
  :class:`~curvlib.errors.PluginOutputError`);
- :class:`BlockDeclaration` / :class:`BlockRequirement` — what the blocks of an approximator
  kind are, and what a damping (or a coarse space, of the first level's blocks) needs, declared
  before any data is seen so that :func:`curvlib.build_preconditioner` rejects an incompatible
  combination at construction.  ``None`` (the default of every base class) means "not
  declared": such a kind is checked where it is first used;
- :class:`CheckedApproximation` — the capability of a block-diagonal approximation made by a
  registered approximator kind (:func:`curvlib.approximate`'s result): who made it, the layer
  of each block, and the one check of its blocks deferred to the inversion.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import pluggy
from pydantic import BaseModel

from curvlib.errors import PluginOutputError

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

    Call ``registry.add(kind, approximator_class, options=OptionsModel)``.  The factory builds
    a :class:`~curvlib.approximators.BlockApproximator` whose ``fit`` returns a
    :class:`~curvlib.approximators.LayerFit` (checked by :func:`curvlib.approximate`); its
    ``blocks`` (a :class:`BlockDeclaration`) says what the blocks are.
    """


@hookspec
def curvlib_register_dampings(registry: FamilyRegistrar) -> None:
    """Register dampings: objects that turn a Kronecker sum into an applied,
    regularized inverse (Tikhonov, the π-split heuristic, Levenberg–Marquardt, …).

    Call ``registry.add(kind, damping_class, options=OptionsModel)``.  The factory builds a
    :class:`~curvlib.damping.Damping` whose ``invert`` returns a
    :class:`~curvlib.damping.BlockInverse` (checked by :func:`curvlib.damped_inverse`); its
    ``requires`` (a :class:`BlockRequirement`) says which blocks it inverts.
    """


@hookspec
def curvlib_register_coarse_spaces(registry: FamilyRegistrar) -> None:
    """Register coarse spaces of two-level preconditioners (Nicolaides, spectral,
    Krylov, residual, Taylor, …).

    Call ``registry.add(kind, coarse_space_class, options=OptionsModel)``.  The factory builds
    a :class:`~curvlib.coarse.CoarseSpace` whose ``basis`` returns a
    :class:`~curvlib.coarse.CoarseBasis` over the context's partition (checked by
    :meth:`~curvlib.coarse.CoarseSpace.checked_basis`); its ``first_level_needs`` (a
    :class:`BlockRequirement`) says what it needs of the first level's blocks.
    """


@hookspec
def curvlib_register_curvatures(registry: FamilyRegistrar) -> None:
    """Register curvature kinds (``fisher``, ``empirical_fisher``, ``ggn``, ``hessian``, …):
    factories that build a curvature operator from a model, a loss and a batch.

    Call ``registry.add(kind, curvature_factory, options=OptionsModel)``; the metadata
    ``per_layer_statistics=True`` (or ``False`` for a kind with matrix-free products only)
    lets :func:`curvlib.build_preconditioner` check it against the preconditioner before any
    data.  The statistics of its operators are checked by :func:`curvlib.approximate`.
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


# --------------------------------------------------------------------------- the contract of the kinds

#: family -> the noun of one of its kinds in messages.
FAMILY_NOUNS: dict[str, str] = {
    "approximators": "approximator",
    "dampings": "damping",
    "coarse_spaces": "coarse space",
    "curvatures": "curvature",
    "layers": "layer",
    "optimizers": "optimizer",
}


@dataclass(frozen=True)
class KindOrigin:
    """Which registered kind made an object, and who provides it.

    Attributes:
        family: the family (``"approximators"``, ``"dampings"``, ``"coarse_spaces"``,
            ``"curvatures"``, ``"layers"``).
        kind: the kind's registered name.
        distribution: the distribution that registered it (``"curvlib"`` for the built-ins,
            ``"<local>"`` for a plugin object registered with ``Registry.register`` directly,
            ``"<unregistered>"`` when the object was not made through a registry).
        plugin: the plugin (entry-point) name that registered it.
    """

    family: str
    kind: str
    distribution: str = "<unregistered>"
    plugin: str = "<unregistered>"

    @classmethod
    def of(cls, spec: Any) -> KindOrigin:
        """The origin of a registry's :class:`~curvlib.plugins.PluginSpec`."""
        return cls(spec.family, spec.kind, spec.distribution, spec.plugin)

    @classmethod
    def lookup(cls, registry: Any, family: str, kind: str) -> KindOrigin:
        """The origin of ``kind`` in ``registry``'s ``family`` (``"<unregistered>"`` when it has no such kind)."""
        fam = registry.family(family)
        return cls.of(fam.get(kind)) if kind in fam else cls(family, kind)

    def __str__(self) -> str:
        noun = FAMILY_NOUNS.get(self.family, self.family)
        return f"{noun} kind {self.kind!r} (distribution {self.distribution!r}, plugin {self.plugin!r})"

    def state_dict(self) -> dict[str, str]:
        """Plain strings (``torch.load(weights_only=True)`` compatible)."""
        return {"family": self.family, "kind": self.kind, "distribution": self.distribution, "plugin": self.plugin}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any] | None) -> KindOrigin | None:
        """Inverse of :meth:`state_dict` (``None`` gives ``None``)."""
        return None if data is None else cls(**{k: str(v) for k, v in dict(data).items()})

    def error(self, layer: str | None, problem: str) -> PluginOutputError:
        """The :class:`~curvlib.errors.PluginOutputError` for ``problem`` (what was expected and
        what came) in this kind's output for ``layer`` (a layer block's name; ``None``: no layer)."""
        where = "" if layer is None else f" for layer {layer!r}"
        return PluginOutputError(f"{self}{where}: {problem}")


def describe_capabilities(classes: tuple[type, ...]) -> str:
    """``"KroneckerFactored or ShiftSolvable"``: capability classes in messages."""
    return " or ".join(c.__name__ for c in classes) if classes else "(none)"


@dataclass(frozen=True)
class BlockDeclaration:
    """What every block an approximator kind returns is (declared before any data is seen).

    Attributes:
        capabilities: the capability classes of :mod:`curvlib.linalg.blocks` every block derives
            from (``(KroneckerFactored,)`` for a Kronecker sum, ``(ShiftSolvable,)`` for an exact
            or EKFAC block).
        terms: for Kronecker-factored blocks, ``(fewest, most)`` terms a block can have
            (``most = None``: no bound); ``None`` when the blocks have no terms.
        psd_factors: the factors of single-term blocks are PSD by construction (Gram matrices
            and averages of them, as KFAC's): the Cholesky check for indefinite single terms
            before an inversion (:meth:`CheckedApproximation.check_before_inversion`) is skipped.
    """

    capabilities: tuple[type, ...]
    terms: tuple[int, int | None] | None = None
    psd_factors: bool = False

    def term_counts(self) -> tuple[int, ...] | None:
        """Every possible number of terms, or ``None`` when unbounded or not Kronecker-factored."""
        if self.terms is None or self.terms[1] is None:
            return None
        return tuple(range(self.terms[0], self.terms[1] + 1))

    def __str__(self) -> str:
        caps = describe_capabilities(self.capabilities)
        if self.terms is None:
            return f"{caps} blocks"
        lo, hi = self.terms
        count = f"{lo}" if lo == hi else f"{lo} or more" if hi is None else f"{lo} to {hi}"
        return f"{caps} blocks of {count} Kronecker term(s)"


@dataclass(frozen=True)
class BlockRequirement:
    """What a damping needs of the blocks it inverts, or a coarse space of the first level's
    (inverse) blocks.

    Attributes:
        any_of: each block must derive from one of these capability classes.
        max_terms: for Kronecker-factored blocks, the most terms accepted (``None``: any).
        reason: why, with the equation (the message of a rejected combination quotes it).
    """

    any_of: tuple[type, ...]
    max_terms: int | None = None
    reason: str = ""

    def __str__(self) -> str:
        terms = "" if self.max_terms is None else f" of at most {self.max_terms} Kronecker term(s)"
        return f"{describe_capabilities(self.any_of)} blocks{terms}"


class CheckedApproximation(abc.ABC):
    """Capability of a block-diagonal approximation made by a registered approximator kind.

    :func:`curvlib.damped_inverse` uses it to name the layer of each block and the
    approximator in its messages, and runs :meth:`check_before_inversion` first: the checks
    of the approximator's output that cost a factorization are made there, once per
    approximation before its first inversion, where the factors are decomposed anyway — not
    at every refresh.
    """

    @property
    @abc.abstractmethod
    def origin(self) -> KindOrigin | None:
        """The approximator kind that made the blocks (``None``: unknown)."""

    @property
    @abc.abstractmethod
    def layer_names(self) -> tuple[str, ...]:
        """The layer of each block, in block order."""

    @abc.abstractmethod
    def check_before_inversion(self) -> None:
        """Raise :class:`~curvlib.errors.PluginOutputError` for a block that must not be
        inverted; warn (:class:`~curvlib.errors.NumericalWarning`) for one inverted by a
        documented fallback."""
