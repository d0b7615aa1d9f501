"""The plugin registry: an object (never a module-level global) holding every kind of
every family, with the distribution that provides it.

``Registry.load()`` discovers plugins through the ``curvlib`` entry-point group,
curvlib's own built-ins included (they are declared in curvlib's ``pyproject.toml``
exactly as a third party declares its own).  A plugin that fails to import (an
exception, or ``sys.exit()`` called on import), implements a misspelt hook, or registers
a kind that is already registered in the same family is recorded in
:attr:`Registry.failures` with its entry-point name and distribution while the others
still load.  On a collision the first registration wins: curvlib's built-ins are always
registered first, then external distributions in name order; the colliding plugin is
left out entirely (none of its kinds) and its failure is a :class:`PluginCollisionError`
naming the family, the kind and both distributions (looking the kind up warns with a
:class:`~curvlib.errors.PluginWarning` saying which one is used).  ``KeyboardInterrupt``
during an import propagates, with a note naming the plugin.  Setting the environment
variable ``CURVLIB_DISABLE_EXTERNAL_PLUGINS=1`` loads only curvlib's own plugins.
"""

from __future__ import annotations

import importlib
import importlib.metadata as importlib_metadata
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import pluggy
from pydantic import BaseModel

from curvlib.config import NoOptions, validate_options
from curvlib.errors import (
    PluginCollisionError,
    PluginError,
    PluginLoadError,
    PluginWarning,
    UnknownKindError,
    warn,
)
from curvlib.plugins import hookspecs
from curvlib.plugins.hookspecs import BUILTIN_PLUGIN_MODULES, ENTRY_POINT_GROUP, HOOK_FAMILIES, PROJECT_NAME

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "DISABLE_EXTERNAL_ENV",
    "FAMILIES",
    "Family",
    "FamilyRegistrar",
    "PluginFailure",
    "PluginSpec",
    "Registry",
]

FAMILIES: tuple[str, ...] = tuple(HOOK_FAMILIES.values())
BUILTIN_DISTRIBUTION = "curvlib"
DISABLE_EXTERNAL_ENV = "CURVLIB_DISABLE_EXTERNAL_PLUGINS"
_TRUTHY = {"1", "true", "yes", "on"}


def _normalize_dist(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


@dataclass(frozen=True)
class PluginSpec:
    """One registered kind of one family.

    ``factory`` builds the implementation (usually a class taking the validated
    options model); ``options`` is the pydantic model its options validate against;
    ``metadata`` carries family-specific data (e.g. ``module_types`` for layers).
    """

    family: str
    kind: str
    factory: Callable[..., Any]
    options: type[BaseModel]
    plugin: str
    distribution: str
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def make_options(self, **options: Any) -> BaseModel:
        """Validate ``options`` against this kind's model (raises :class:`ConfigError`)."""
        return validate_options(self.options, options, where=f"{self.family[:-1]} '{self.kind}'")


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded: its entry-point name, distribution and why.

    ``stage`` is ``"importing"`` (the entry point did not load) or ``"registering"`` (its
    hooks failed, or a kind collided); ``str()`` is one line, without the traceback.
    """

    plugin: str
    distribution: str
    error: BaseException
    traceback: str
    stage: str = "importing"

    def __str__(self) -> str:
        text = (
            f'Error {self.stage} plugin "{self.plugin}" (distribution {self.distribution}): '
            f"{type(self.error).__name__}: {self.error}"
        )
        return " ".join(line.strip() for line in text.splitlines() if line.strip())


class FamilyRegistrar:
    """What a ``curvlib_register_<family>`` hook receives.

    Bound to one family and one plugin, so every kind it adds is recorded with the
    plugin's name and distribution.
    """

    def __init__(self, family: Family, plugin: str, distribution: str) -> None:
        self.family = family.name
        self._family = family
        self._plugin = plugin
        self._distribution = distribution
        self.added: list[str] = []

    def add(
        self,
        kind: str,
        factory: Callable[..., Any],
        *,
        options: type[BaseModel] | None = None,
        description: str = "",
        **metadata: Any,
    ) -> None:
        """Register ``kind`` with its ``factory`` and pydantic ``options`` model.

        ``kind`` is a short lowercase identifier (``"kpsvd"``).  ``options`` defaults
        to a model accepting no options.  Extra keyword arguments are stored as
        family-specific metadata.
        """
        if not isinstance(kind, str) or not kind or kind != kind.strip() or kind.lower() != kind:
            raise PluginError(
                f"plugin {self._plugin!r} ({self._distribution}) registered an invalid "
                f"{self.family} kind {kind!r}: expected a non-empty lowercase identifier"
            )
        if not callable(factory):
            raise PluginError(
                f"plugin {self._plugin!r} registered {self.family} kind {kind!r} with a "
                f"non-callable factory {factory!r}"
            )
        opts = NoOptions if options is None else options
        if not (isinstance(opts, type) and issubclass(opts, BaseModel)):
            raise PluginError(
                f"plugin {self._plugin!r} registered {self.family} kind {kind!r} with "
                f"options={opts!r}; expected a pydantic BaseModel subclass"
            )
        doc = description or (getattr(factory, "__doc__", None) or "").strip().split("\n")[0]
        spec = PluginSpec(
            family=self.family,
            kind=kind,
            factory=factory,
            options=opts,
            plugin=self._plugin,
            distribution=self._distribution,
            description=doc,
            metadata=MappingProxyType(dict(metadata)),
        )
        self._family._add(spec)
        self.added.append(kind)


class Family:
    """The kinds of one family (a typed facade: nothing else touches pluggy)."""

    def __init__(self, name: str, registry: Registry) -> None:
        self.name = name
        self._registry = registry
        self._specs: dict[str, PluginSpec] = {}
        #: kind -> the collisions recorded while loading (the registered spec won)
        self._collisions: dict[str, list[PluginCollisionError]] = {}

    def _add(self, spec: PluginSpec) -> None:
        old = self._specs.get(spec.kind)
        if old is not None:
            error = PluginCollisionError(
                f"{self.name} kind {spec.kind!r} is registered twice: by plugin "
                f"{old.plugin!r} of distribution {old.distribution!r} and by plugin "
                f"{spec.plugin!r} of distribution {spec.distribution!r}; the first registration is kept"
            )
            error.family, error.kind = self.name, spec.kind  # type: ignore[attr-defined]
            error.winner, error.loser = old, spec  # type: ignore[attr-defined]
            raise error
        self._specs[spec.kind] = spec

    def kinds(self) -> list[str]:
        """Registered kinds, sorted."""
        return sorted(self._specs)

    def __contains__(self, kind: object) -> bool:
        return kind in self._specs

    def __iter__(self) -> Iterator[PluginSpec]:
        return iter(self._specs[k] for k in self.kinds())

    def __len__(self) -> int:
        return len(self._specs)

    def get(self, kind: str) -> PluginSpec:
        """The spec of ``kind``; :class:`UnknownKindError` lists the known kinds.

        A kind that another plugin also tried to register (a collision recorded while
        loading) is returned with a :class:`~curvlib.errors.PluginWarning` naming both.
        """
        try:
            spec = self._specs[kind]
        except KeyError:
            known = ", ".join(repr(k) for k in self.kinds()) or "(none)"
            msg = f"unknown {self.name[:-1].replace('_', ' ')} kind {kind!r}; known kinds: {known}"
            if self._registry.failures:
                msg += "; plugins that failed to load: " + ", ".join(
                    f"{f.plugin} ({f.distribution}: {type(f.error).__name__})" for f in self._registry.failures
                )
            raise UnknownKindError(msg) from None
        for collision in self._collisions.get(kind, ()):
            loser = collision.loser  # type: ignore[attr-defined]
            warn(
                f"{self.name} kind {kind!r}: using plugin {spec.plugin!r} of distribution {spec.distribution!r}; "
                f"plugin {loser.plugin!r} of distribution {loser.distribution!r} registers it too and was not "
                "loaded (see `curvlib plugins list`)",
                PluginWarning,
            )
        return spec

    def resolve(self, config: str | Mapping[str, Any] | BaseModel, /, **overrides: Any) -> tuple[PluginSpec, BaseModel]:
        """Look up a kind and validate its options.

        ``config`` is a kind name, a mapping ``{"kind": ..., **options}``, or a
        pydantic model with a ``kind`` field; ``overrides`` are merged on top.
        Returns the spec and the validated options model instance.
        """
        if isinstance(config, BaseModel):
            data = config.model_dump()
        elif isinstance(config, str):
            data = {"kind": config}
        elif isinstance(config, Mapping):
            data = dict(config)
        else:
            raise UnknownKindError(
                f"expected a kind name, a mapping with a 'kind' key or a model; got {type(config).__name__}"
            )
        data.update(overrides)
        if "kind" not in data:
            raise UnknownKindError(
                f"{self.name} configuration {data!r} has no 'kind'; known kinds: {', '.join(self.kinds())}"
            )
        kind = data.pop("kind")
        spec = self.get(kind)
        return spec, spec.make_options(**data)

    def create(self, config: str | Mapping[str, Any] | BaseModel, /, **overrides: Any) -> Any:
        """Resolve ``config`` and call the kind's factory with the validated options."""
        spec, options = self.resolve(config, **overrides)
        return spec.factory(options)


class Registry:
    """Every family's kinds, loaded from plugins.

    Attributes ``approximators``, ``dampings``, ``coarse_spaces``, ``curvatures``,
    ``layers`` and ``optimizers`` are :class:`Family` objects; :attr:`failures` lists plugins that did
    not load; :attr:`plugins` maps each loaded plugin name to its distribution.
    """

    approximators: Family
    dampings: Family
    coarse_spaces: Family
    curvatures: Family
    layers: Family
    optimizers: Family

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._families = {name: Family(name, self) for name in FAMILIES}
        for name, fam in self._families.items():
            setattr(self, name, fam)
        self.failures: list[PluginFailure] = []
        self.plugins: dict[str, str] = {}

    # -- loading ---------------------------------------------------------------
    @classmethod
    def load(
        cls,
        *,
        external: bool | None = None,
        group: str = ENTRY_POINT_GROUP,
        strict: bool = False,
    ) -> Registry:
        """A registry with curvlib's built-ins and (unless disabled) every external plugin.

        ``external=None`` reads the ``CURVLIB_DISABLE_EXTERNAL_PLUGINS`` environment
        variable.  ``strict=True`` raises the first plugin failure instead of recording it.
        """
        if external is None:
            external = os.environ.get(DISABLE_EXTERNAL_ENV, "").strip().lower() not in _TRUTHY
        reg = cls()
        eps = sorted(
            importlib_metadata.entry_points(group=group),
            key=lambda ep: (_dist_name(ep) != BUILTIN_DISTRIBUTION, _dist_name(ep), ep.name),
        )
        builtins = [ep for ep in eps if _normalize_dist(_dist_name(ep)) == BUILTIN_DISTRIBUTION]
        others = [ep for ep in eps if ep not in builtins] if external else []
        # Built-ins first, always: on a collision the first registration wins.
        for ep in builtins:
            reg._load_entry_point(ep, BUILTIN_DISTRIBUTION, strict=strict)
        if not builtins and group == ENTRY_POINT_GROUP:
            # Running from a source tree that was never installed: register the
            # built-ins directly so curvlib still works (pip install registers them
            # through entry points, the path a test checks).
            for name, modname in BUILTIN_PLUGIN_MODULES.items():
                reg._load_object(name, BUILTIN_DISTRIBUTION, lambda m=modname: importlib.import_module(m),
                                 strict=strict, target=modname)
        for ep in others:
            reg._load_entry_point(ep, _dist_name(ep), strict=strict)
        return reg

    def _load_entry_point(self, ep: importlib_metadata.EntryPoint, dist: str, *, strict: bool) -> None:
        self._load_object(ep.name, dist, ep.load, strict=strict, target=ep.value)

    def _load_object(self, name: str, dist: str, loader: Callable[[], Any], *, strict: bool, target: str) -> None:
        where = f'plugin "{name}" (distribution {dist}, entry point {name} = {target})'
        try:
            obj = _guarded(loader, where, "on import")
        except Exception as exc:  # a broken plugin must not break the others
            self._fail(name, dist, exc, strict, stage="importing")
            return
        try:
            _guarded(lambda: self.register(obj, name=name, distribution=dist), where, "while registering")
        except PluginCollisionError as exc:
            if strict:
                raise
            family, kind = getattr(exc, "family", None), getattr(exc, "kind", None)
            if family is not None and kind is not None:  # a kind collision (not a reused plugin name)
                self._families[family]._collisions.setdefault(kind, []).append(exc)
            self._fail(name, dist, exc, strict, stage="registering")
        except Exception as exc:
            self._fail(name, dist, exc, strict, stage="registering")

    def _fail(self, name: str, dist: str, exc: BaseException, strict: bool, *, stage: str) -> None:
        failure = PluginFailure(name, dist, exc, traceback.format_exc(), stage=stage)
        if strict:
            raise PluginLoadError(
                f'Error {stage} plugin "{name}" (distribution {dist}): {type(exc).__name__}: {exc}'
            ) from exc
        self.failures.append(failure)

    def register(self, plugin: object, *, name: str, distribution: str = "<local>") -> None:
        """Register one plugin object (a module or any object with hook implementations).

        Its hooks are called at once, each with a registrar bound to ``name`` and
        ``distribution``.  A misspelt hook (a ``@hookimpl`` whose name matches no
        specification) raises :class:`PluginError` and leaves nothing registered.
        """
        if name in self.plugins:
            raise PluginCollisionError(
                f"plugin name {name!r} is used twice: by distribution {self.plugins[name]!r} "
                f"and by distribution {distribution!r}"
            )
        try:
            self._pm.register(plugin, name=name)
        except ValueError as exc:  # pluggy: plugin object already registered under another name
            raise PluginError(f"plugin {name!r} ({distribution}) could not be registered: {exc}") from exc
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} ({distribution}) has an invalid hook: {exc}") from exc
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self._pm.unregister(plugin)
            raise PluginError(
                f"plugin {name!r} ({distribution}) implements a hook curvlib does not know "
                f"(misspelt?): {exc}. Known hooks: {', '.join(HOOK_FAMILIES)}"
            ) from exc
        added: list[tuple[str, str]] = []
        try:
            for hook_name, family in HOOK_FAMILIES.items():
                for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                    if impl.plugin is not plugin:
                        continue
                    registrar = FamilyRegistrar(self._families[family], name, distribution)
                    try:
                        impl.function(registry=registrar)
                    finally:
                        added.extend((family, k) for k in registrar.added)
        except BaseException:
            # leave nothing of a half-registered plugin behind
            for family, kind in added:
                self._families[family]._specs.pop(kind, None)
            self._pm.unregister(plugin)
            raise
        self.plugins[name] = distribution

    # -- queries ---------------------------------------------------------------
    def family(self, name: str) -> Family:
        """The :class:`Family` called ``name``."""
        try:
            return self._families[name]
        except KeyError:
            raise UnknownKindError(f"unknown family {name!r}; families: {', '.join(FAMILIES)}") from None

    def families(self) -> Iterable[Family]:
        return self._families.values()

    def distribution_version(self, distribution: str) -> str:
        try:
            return importlib_metadata.version(distribution)
        except importlib_metadata.PackageNotFoundError:
            return "?"


def _guarded(call: Callable[[], Any], where: str, when: str) -> Any:
    """``call()`` with a plugin's ``sys.exit()`` turned into a :class:`PluginLoadError`
    (it would otherwise end the process silently) and a note on ``KeyboardInterrupt``
    naming the plugin (which still propagates: the user pressed Ctrl-C)."""
    try:
        return call()
    except SystemExit as exc:
        raise PluginLoadError(f"{where} called sys.exit({exc.code!r}) {when}") from exc
    except KeyboardInterrupt as exc:
        if hasattr(exc, "add_note"):  # Python >= 3.11
            exc.add_note(f"(interrupted {'importing' if when == 'on import' else 'registering'} curvlib {where})")
        raise


def _dist_name(ep: importlib_metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "<unknown>"
    name = dist.metadata["Name"] if dist.metadata is not None else None
    return name or "<unknown>"
