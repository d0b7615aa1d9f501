"""The base every family's mixin shares: the kind under test, its options, its registry,
and the checks of its registration and options model."""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings

from curvlib.errors import ConfigError
from curvlib.plugins import ENTRY_POINT_GROUP, load_registry
from curvlib.testing.conformance._common import _expect


class _KindConformance:
    """What every family's mixin shares: the kind, its options, its registration."""

    #: the plugin family (set by each mixin)
    family: ClassVar[str] = ""
    #: the kind under test (set by the subclass)
    kind: ClassVar[str] = ""
    #: options of the kind, validated by its pydantic model
    options: ClassVar[Mapping[str, Any]] = {}
    #: option mappings the options model must reject (each merged over ``options``)
    bad_options: ClassVar[Sequence[Mapping[str, Any]]] = ()
    #: require the kind to come from an installed distribution's entry point
    registry_kind_installed: ClassVar[bool] = False
    #: the distribution expected to provide the kind (checked when given)
    distribution: ClassVar[str | None] = None
    #: hypothesis examples per check
    max_examples: ClassVar[int] = 4

    # -- the registry ------------------------------------------------------------------
    def make_registry(self) -> Any:
        """The registry the kind is looked up in (default: every installed plugin)."""
        return load_registry()

    @property
    def registry(self) -> Any:
        """:meth:`make_registry`, built once per test class."""
        cls = type(self)
        if "_conformance_registry" not in cls.__dict__:
            cls._conformance_registry = self.make_registry()
        return cls.__dict__["_conformance_registry"]

    def spec(self) -> Any:
        """The kind's :class:`~curvlib.plugins.PluginSpec`."""
        _expect(bool(self.kind), f"{type(self).__name__}: set the class attribute `kind` to the kind under test")
        return self.registry.family(self.family).get(self.kind)

    def create(self, **overrides: Any) -> Any:
        """The kind's object built from ``options`` merged with ``overrides`` (as curvlib builds it)."""
        spec, opts = self.registry.family(self.family).resolve({"kind": self.kind, **self.options, **overrides})
        return spec.factory(opts)

    def hypothesis_settings(self) -> settings:
        """hypothesis settings of the checks: ``max_examples`` on top of the loaded profile."""
        return settings(
            max_examples=self.max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )

    # -- checks ------------------------------------------------------------------------
    def test_kind_is_registered(self) -> None:
        """The kind is in the registry's family; with ``registry_kind_installed`` it comes
        from an entry point of an installed distribution (as a user gets it)."""
        family = self.registry.family(self.family)
        _expect(
            self.kind in family,
            f"expected {self.family} kind {self.kind!r} to be registered; registered kinds: {family.kinds()}"
            + (f"; plugins that failed to load: {[str(f) for f in self.registry.failures]}" if self.registry.failures else ""),
        )
        spec = family.get(self.kind)
        if self.distribution is not None:
            _expect(
                spec.distribution == self.distribution,
                f"expected {self.family} kind {self.kind!r} to come from distribution {self.distribution!r}, "
                f"it comes from {spec.distribution!r} (plugin {spec.plugin!r})",
            )
        if self.registry_kind_installed:
            installed = load_registry()
            _expect(
                self.kind in installed.family(self.family),
                f"expected {self.family} kind {self.kind!r} in load_registry() (entry-point group "
                f"{ENTRY_POINT_GROUP!r}); it is not: is the distribution installed? registered kinds: "
                f"{installed.family(self.family).kinds()}",
            )
            spec = installed.family(self.family).get(self.kind)
            try:
                eps = md.distribution(spec.distribution).entry_points
            except md.PackageNotFoundError:
                eps = ()
            names = [ep.name for ep in eps if ep.group == ENTRY_POINT_GROUP]
            _expect(
                spec.plugin in names,
                f"expected {self.family} kind {self.kind!r} to be registered by an entry point of group "
                f"{ENTRY_POINT_GROUP!r} of distribution {spec.distribution!r}; its plugin is {spec.plugin!r}, the "
                f"distribution's entry points in that group are {names}",
            )

    def test_options_reject_unknown_fields(self) -> None:
        """The options model forbids unknown fields (``extra="forbid"``)."""
        family = self.registry.family(self.family)
        family.resolve({"kind": self.kind, **self.options})  # the options given are valid
        try:
            family.resolve({"kind": self.kind, **self.options, "not_an_option_xyz": 1})
        except ConfigError as exc:
            _expect(
                "not_an_option_xyz" in str(exc),
                f"expected the ConfigError for an unknown option to name it ('not_an_option_xyz'); got: {exc}",
            )
        else:
            raise AssertionError(
                f"expected {self.family} kind {self.kind!r} to reject the unknown option 'not_an_option_xyz' "
                "with a ConfigError (options models derive from curvlib.config.StrictModel, extra='forbid'); "
                "it was accepted"
            )

    def _generic_bad_options(self) -> list[dict[str, Any]]:
        fields = getattr(self.spec().options, "model_fields", {})
        bad: list[dict[str, Any]] = []
        if "value" in fields:
            bad += [{"value": 0.0}, {"value": -1.0}, {"value": float("nan")}]
        if "ema" in fields:
            bad += [{"ema": 1.5}, {"ema": -0.1}]
        return bad

    def test_options_reject_bad_values(self) -> None:
        """Every mapping of ``bad_options`` (and out-of-range ``value``/``ema``) raises ConfigError."""
        family = self.registry.family(self.family)
        for bad in [*self._generic_bad_options(), *self.bad_options]:
            data = {"kind": self.kind, **self.options, **bad}
            try:
                family.resolve(data)
            except ConfigError:
                continue
            raise AssertionError(
                f"expected {self.family} kind {self.kind!r} to reject options {dict(bad)} with a ConfigError; "
                "they were accepted"
            )
