"""``PreconditionerConfig``: one strict, frozen description of a preconditioner (DESIGN.md §5).

A configuration names one kind per plug-in family, each as a mapping
``{"kind": ..., **options}`` (a bare kind name is accepted and becomes ``{"kind": name}``):

==================  ===================================  =====================================
field               family (plugin registry)             default
==================  ===================================  =====================================
``curvature``       ``curvatures``                       ``{"kind": "fisher", "mc_samples": 1}``
``approximator``    ``approximators``                    ``{"kind": "kfac"}``
``damping``         ``dampings``                         ``{"kind": "heuristic", "value": 1e-3}``
``coarse_space``    ``coarse_spaces`` (``None``: one     ``None``
                    level)
==================  ===================================  =====================================

plus the schedule and the way the pieces are combined:

- ``coarse_mode``: ``"multiplicative"`` (4.17, default), ``"additive"`` (4.19) or
  ``"previous"`` (the additive correction with the approximate coarse operator (4.20) of
  Tselepidis et al.); only with a ``coarse_space``;
- ``preconditioner``: ``"kronecker"`` (block-diagonal Kronecker approximation, damped and
  inverted, with the optional coarse correction), ``"block_natural_gradient"`` ((4.52):
  (F_ii + λI)⁻¹ per layer) or ``"exact_natural_gradient"`` ((4.50): (F + λI)⁻¹), the last
  two using the damping's ``value`` as λ;
- ``update_every`` = T1 ≥ 1: curvature statistics are captured and the approximation
  refreshed every T1 steps (§3.1.2);
- ``invert_every`` = T2 ≥ 1, a multiple of T1: the damped inverse (factor
  eigendecompositions) is rebuilt every T2 steps;
- ``ema`` = γ ∈ [0, 1] (or ``None``: no average): the EMA decay of §3.1.2,
  ρ = min(1 − 1/k, γ) at the k-th refresh; passed to the approximator unless its own
  mapping sets ``ema`` (and only if its options model has an ``ema`` field);
- ``rules``: an ordered list of :class:`LayerRule` (first match wins) giving the layers they
  match their own approximator, damping and T1/T2; the top-level ``approximator``,
  ``damping``, ``update_every`` and ``invert_every`` act as the default rule for every layer
  no rule matches (docs/composition.md);
- ``distributed_inversion``: under ``torch.distributed``, ``"broadcast"`` (default: each
  layer inverted by one rank, the inverse broadcast), ``"direction"`` (the owner applies its
  layers' inverses and the directions are all-reduced each step; not with a coarse space) or
  ``"replicated"`` (every rank inverts every layer); see :mod:`curvlib.distributed`;
- ``uncovered``: what happens to a trainable parameter no layer adapter covers —
  ``"fallback"`` (default: the optimizer's first-order fallback updates it) or
  ``"per_sample"`` (it gets its own block of the ``parameter`` layer kind, per-sample
  gradients by recomputing its module one sample at a time: every trainable parameter in
  the curvature, see :mod:`curvlib.capture.adapters.parameter`);
- ``background_inversion``: ``False`` (default) inverts at the inversion step, before that
  step's direction; ``True`` inverts in a worker thread — on a side CUDA stream when the
  factors are on a GPU — while training goes on, and installs the new inverse at the next
  step (:meth:`~curvlib.precond.Preconditioner.wait_inversion`): the direction of an
  inversion step uses the previous inverse.  The first inversion, and one after the layers
  changed, are made in place.  ``"kronecker"`` without a coarse space, one process
  (docs/optimizer.md, "Background inversion").

Every field is strictly typed (``update_every="2"`` or ``update_every=True`` is refused, not
converted; ``ema`` takes an int or a float) and the configuration is immutable all the way
down: the four kind mappings are stored as read-only :class:`~curvlib.config.FrozenDict`
(nested lists as tuples), so ``config.approximator["rank"] = 3`` raises ``TypeError``;
:meth:`PreconditionerConfig.to_dict` (``model_dump``) gives plain, mutable dicts and lists.

The options of each kind are validated against the kind's own pydantic model when the
configuration is resolved against a plugin registry (:func:`resolve_config`, called by
:func:`curvlib.build_preconditioner`); errors name the field path, e.g.
``approximator.rank: Input should be greater than or equal to 1 (got 0)``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, Field, field_validator, model_validator

from curvlib.config import FrozenDict, StrictModel, format_validation_error, load_config_mapping, thaw
from curvlib.errors import ConfigError, UnknownKindError

__all__ = [
    "LayerRule",
    "PreconditionerConfig",
    "ResolvedRule",
    "ResolvedKind",
    "ResolvedConfig",
    "resolve_config",
    "KIND_FIELDS",
]

#: config field -> plugin family it is resolved in.
KIND_FIELDS: dict[str, str] = {
    "curvature": "curvatures",
    "approximator": "approximators",
    "damping": "dampings",
    "coarse_space": "coarse_spaces",
}


def _kind_mapping(value: Any, field: str) -> dict[str, Any]:
    """A bare kind name or a mapping with a string ``kind`` -> a plain dict."""
    if isinstance(value, str):
        return {"kind": value}
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a kind name or a mapping {{'kind': ..., **options}}, got {type(value).__name__}")
    data = dict(value)
    kind = data.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"expected a mapping with a non-empty string 'kind', got {value!r}")
    return data


class LayerRule(StrictModel):
    """One rule of :attr:`PreconditionerConfig.rules`: which layers it matches, and what they get.

    Matchers (every one optional; a layer matches when it passes all that are given):

    - ``match``: a glob (:func:`fnmatch.fnmatchcase`) on the layer block's qualified name
      (``"decoder.*"``, ``"*.attn.*"``; a grouped convolution's groups are ``"<module>:group<j>"``);
    - ``types``: module class names (``["Linear", "Conv2d"]``), matched against the class of
      the layer's module and its bases (``"_ConvNd"`` matches every convolution);
    - ``min_params`` / ``max_params``: bounds on the block's parameter count p_i = d_a·d_g;
    - ``predicate``: a Python callable ``predicate(name, module) -> bool`` (Python only: not
      in files, and a config holding one is not serialisable).

    Settings (``None``: the default rule's, i.e. the top-level field):

    - ``approximator``, ``damping``: kind mappings as for the top-level fields;
    - ``update_every``, ``invert_every``: the layers' own T1 and T2 (T2 a multiple of T1);
    - ``fallback``: ``True`` leaves the matched layers out of the curvature — their
      parameters are updated by the optimizer's fallback (Adam or SGD), like parameters no
      layer adapter covers; no other setting may be given then;
    - ``coarse``: with a ``coarse_space``, whether the matched layers are in it (their rows
      of the coarse basis R₀ᵀ; the others stay one-level).  When some rule says ``True``, the
      coarse space covers exactly the layers of the rules that say ``True``; otherwise every
      layer but those of the rules that say ``False``.
    """

    match: str | None = Field(None, min_length=1, description="glob on the layer's qualified name")
    types: tuple[str, ...] | None = Field(None, min_length=1, description="module class names (or base class names)")
    min_params: int | None = Field(None, ge=0, description="at least this many parameters in the block")
    max_params: int | None = Field(None, ge=0, description="at most this many parameters in the block")
    predicate: Any = Field(None, description="predicate(name, module) -> bool (Python only)")
    approximator: FrozenDict | None = None
    damping: FrozenDict | None = None
    update_every: int | None = Field(None, ge=1, description="T1 of the matched layers")
    invert_every: int | None = Field(None, ge=1, description="T2 of the matched layers")
    fallback: bool = Field(False, description="leave the matched layers to the fallback optimizer")
    coarse: bool | None = Field(None, description="whether the matched layers are in the coarse space")

    @field_validator("approximator", "damping", mode="before")
    @classmethod
    def _kind_optional(cls, value: Any, info: pydantic.ValidationInfo) -> dict[str, Any] | None:
        return None if value is None else _kind_mapping(value, info.field_name)

    @field_validator("predicate")
    @classmethod
    def _callable(cls, value: Any) -> Any:
        if value is not None and not callable(value):
            raise ValueError(f"expected a callable predicate(name, module) -> bool, got {type(value).__name__}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LayerRule:
        if self.min_params is not None and self.max_params is not None and self.min_params > self.max_params:
            raise ValueError(f"min_params = {self.min_params} > max_params = {self.max_params}: the rule matches nothing")
        if self.fallback:
            given = [k for k in ("approximator", "damping", "update_every", "invert_every", "coarse")
                     if getattr(self, k) is not None]
            if given:
                raise ValueError(f"fallback=True leaves the layers to the fallback optimizer; {given} would not be used")
        return self

    @property
    def matchers(self) -> dict[str, Any]:
        """The matchers given (name -> value)."""
        return {k: getattr(self, k) for k in ("match", "types", "min_params", "max_params", "predicate")
                if getattr(self, k) is not None}

    def describe(self) -> str:
        """The matchers in one line (``match='decoder.*', types=['Linear']``; ``everything``)."""
        parts = []
        for k, v in self.matchers.items():
            if k == "predicate":
                v = getattr(v, "__name__", type(v).__name__)
                parts.append(f"predicate={v}")
            else:
                parts.append(f"{k}={list(v) if isinstance(v, tuple) else v!r}")
        return ", ".join(parts) or "every layer"

    def matches(self, name: str, module: Any, num_params: int) -> bool:
        """Whether a layer block (its qualified ``name``, primary ``module`` and p_i) matches."""
        if self.match is not None and not fnmatch.fnmatchcase(name, self.match):
            return False
        if self.types is not None and not {c.__name__ for c in type(module).__mro__} & set(self.types):
            return False
        if self.min_params is not None and num_params < self.min_params:
            return False
        if self.max_params is not None and num_params > self.max_params:
            return False
        if self.predicate is not None:
            try:
                chosen = self.predicate(name, module)
            except Exception as exc:
                raise ConfigError(f"the predicate of a rule raised on layer {name!r}: {type(exc).__name__}: {exc}") from exc
            if not isinstance(chosen, bool):
                raise ConfigError(f"the predicate of a rule returned {type(chosen).__name__} on layer {name!r}; "
                                  "expected True or False")
            return chosen
        return True


class PreconditionerConfig(StrictModel):
    """The configuration of a :class:`~curvlib.precond.Preconditioner` (see the module docstring).

    Construct it from keyword arguments, a mapping (:meth:`coerce`) or a YAML/JSON file
    (:meth:`from_file`).  Invalid values raise :class:`~curvlib.errors.ConfigError`, one
    line per problem, each naming its field.

    Example::

        cfg = PreconditionerConfig(curvature={"kind": "fisher", "mc_samples": 1},
                                   approximator={"kind": "kfac_corrected"},
                                   damping={"kind": "heuristic", "value": 1e-3},
                                   coarse_space={"kind": "residual"},
                                   update_every=10, invert_every=100, ema=0.95)
    """

    curvature: FrozenDict = Field(
        default_factory=lambda: {"kind": "fisher", "mc_samples": 1},
        description="curvature kind and options (the matrix approximated: fisher, empirical_fisher, ggn, ...)",
    )
    approximator: FrozenDict = Field(
        default_factory=lambda: {"kind": "kfac"}, description="block approximator kind and options"
    )
    damping: FrozenDict = Field(
        default_factory=lambda: {"kind": "heuristic", "value": 1e-3}, description="damping kind and options (λ = value)"
    )
    coarse_space: FrozenDict | None = Field(None, description="coarse space kind and options; None: one level")
    coarse_mode: Literal["multiplicative", "additive", "previous"] = "multiplicative"
    preconditioner: Literal["kronecker", "block_natural_gradient", "exact_natural_gradient"] = "kronecker"
    update_every: int = Field(1, ge=1, description="T1: steps between curvature refreshes")
    invert_every: int = Field(1, ge=1, description="T2: steps between inversions (a multiple of T1)")
    ema: float | None = Field(0.95, ge=0.0, le=1.0, description="γ of the EMA ρ = min(1 − 1/k, γ); None: no average")
    rules: tuple[LayerRule, ...] = Field(
        (), description="per-layer rules, first match wins; the top-level fields are the default rule"
    )
    distributed_inversion: Literal["broadcast", "direction", "replicated"] = Field(
        "broadcast",
        description="under torch.distributed: each layer inverted by one rank and the inverse broadcast, or the "
                    "owner's direction all-reduced at every step, or every rank inverting every layer",
    )

    uncovered: Literal["fallback", "per_sample"] = Field(
        "fallback",
        description="a trainable parameter no layer adapter covers: left to the fallback optimizer, or its own block "
                    "from per-sample gradients (the 'parameter' layer kind)",
    )
    background_inversion: bool = Field(
        False,
        description="each inversion after the first runs in a worker thread (on a side CUDA stream on a GPU) while "
                    "training goes on, and is installed at the next step (Preconditioner.wait_inversion)",
    )

    @field_validator("curvature", "approximator", "damping", mode="before")
    @classmethod
    def _kind_required(cls, value: Any, info: pydantic.ValidationInfo) -> dict[str, Any]:
        return _kind_mapping(value, info.field_name)

    @field_validator("coarse_space", mode="before")
    @classmethod
    def _kind_optional(cls, value: Any, info: pydantic.ValidationInfo) -> dict[str, Any] | None:
        return None if value is None else _kind_mapping(value, info.field_name)

    @model_validator(mode="after")
    def _cross_field(self) -> PreconditionerConfig:
        if self.invert_every % self.update_every != 0:
            raise ValueError(
                f"invert_every (T2 = {self.invert_every}) must be a multiple of update_every "
                f"(T1 = {self.update_every}): the inverse is rebuilt from a fresh refresh"
            )
        if self.coarse_space is not None and self.preconditioner != "kronecker":
            raise ValueError(
                f"coarse_space ({self.coarse_space['kind']!r}) needs preconditioner='kronecker', "
                f"got preconditioner={self.preconditioner!r}"
            )
        if self.coarse_space is not None and self.distributed_inversion == "direction":
            raise ValueError(
                "distributed_inversion='direction' keeps each layer's inverse on one rank, and the coarse correction "
                f"({self.coarse_space['kind']!r}) applies the first level to every layer on every rank; use 'broadcast'"
            )
        if self.background_inversion and (self.preconditioner != "kronecker" or self.coarse_space is not None):
            raise ValueError(
                "background_inversion runs the block-diagonal Kronecker inversion in a worker thread; it needs "
                f"preconditioner='kronecker' without a coarse_space (got preconditioner={self.preconditioner!r}, "
                f"coarse_space={None if self.coarse_space is None else self.coarse_space['kind']!r}): the two-level "
                "operator and the natural-gradient references are built with the inverse at the refresh"
            )
        self._check_rules()
        if self.coarse_space is None and self.coarse_mode != "multiplicative":
            raise ValueError(
                f"coarse_mode={self.coarse_mode!r} needs a coarse_space (coarse_space is None: one level)"
            )
        return self

    def _check_rules(self) -> None:
        if not self.rules:
            return
        if self.preconditioner != "kronecker":
            raise ValueError(f"rules compose the block-diagonal Kronecker preconditioner; preconditioner="
                             f"{self.preconditioner!r} has no per-layer approximator")
        if self.coarse_space is not None and self.coarse_mode == "previous":
            raise ValueError("coarse_mode='previous' damps F̄•'s diagonal blocks like one first level does; with rules "
                             "(several dampings) use 'multiplicative' or 'additive'")
        members = self._coarse_members()
        if not self.rules[-1].matchers:  # a last rule without matchers: the default rule matches nothing
            members = members[:-1]
        if self.coarse_space is not None and not any(members):
            raise ValueError("no rule puts any layer in the coarse space: every rule says coarse=False and the default "
                             "rule is left out")
        for i, rule in enumerate(self.rules):
            if rule.coarse is not None and self.coarse_space is None:
                raise ValueError(f"rules[{i}]: coarse={rule.coarse} needs a coarse_space (coarse_space is None: one level)")
            t1 = self.update_every if rule.update_every is None else rule.update_every
            t2 = self.invert_every if rule.invert_every is None else rule.invert_every
            if t2 % t1 != 0:
                raise ValueError(f"rules[{i}]: invert_every (T2 = {t2}) must be a multiple of update_every (T1 = {t1})")
            if not rule.matchers and i < len(self.rules) - 1:
                raise ValueError(f"rules[{i}] has no matcher, so it matches every layer and rules[{i + 1}:] can never "
                                 "match; give it a matcher (match, types, min_params, max_params, predicate) or move it last")

    def _coarse_members(self) -> list[bool]:
        """For each rule, then the default rule: whether its layers are in the coarse space
        (:class:`LayerRule` ``coarse``)."""
        if self.coarse_space is None:
            return [False] * (len(self.rules) + 1)
        if any(r.coarse is True for r in self.rules):
            return [r.coarse is True for r in self.rules] + [False]
        return [r.coarse is not False and not r.fallback for r in self.rules] + [True]

    # -- construction ---------------------------------------------------------------
    @classmethod
    def coerce(cls, config: PreconditionerConfig | Mapping[str, Any] | str | os.PathLike[str] | None) -> PreconditionerConfig:
        """A config from a config (returned as is), a mapping, a YAML/JSON file path, or ``None`` (defaults)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, (str, os.PathLike)):
            return cls.from_file(config)
        if isinstance(config, Mapping):
            bad = [k for k in config if not isinstance(k, str)]
            if bad:
                raise ConfigError(f"PreconditionerConfig: field names must be strings, got {bad!r}")
            return cls(**dict(config))
        raise ConfigError(
            f"expected a PreconditionerConfig, a mapping, a YAML/JSON file path or None; got {type(config).__name__}"
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> PreconditionerConfig:
        """Read a configuration from a YAML (``.yaml``/``.yml``) or JSON (``.json``) file.

        The file holds one mapping with the fields of this class.  Other suffixes are
        parsed as YAML (a superset of JSON), with YAML 1.2 floats (``1e-3`` is a number).
        See :func:`curvlib.config.load_config_mapping` for what is refused: a missing path
        or a directory, a file that is not UTF-8 text, a syntax error (with its line), a
        key given twice, a top level that is not a mapping.

        Raises:
            ConfigError: the file cannot be used (see above) or its values are invalid (the
                message names the fields and the file).
        """
        data = load_config_mapping(path, who="PreconditionerConfig.from_file")
        try:
            return cls(**data)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {str(path)!r})") from exc

    def to_dict(self) -> dict[str, Any]:
        """A plain, mutable mapping (JSON/YAML-serialisable when the options are) that :meth:`coerce` accepts."""
        return self.model_dump()


# --------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class ResolvedKind:
    """One family's choice, resolved in a registry.

    Attributes:
        field: the config field (``"approximator"``, ...).
        kind: the kind name.
        spec: the :class:`~curvlib.plugins.PluginSpec`.
        options: the validated options model instance.
        data: the options as a plain dict, without ``kind`` (what is passed on as
            keyword arguments; includes the inherited ``ema``/``interval``).
    """

    field: str
    kind: str
    spec: Any
    options: BaseModel
    data: dict[str, Any]


@dataclass(frozen=True)
class ResolvedRule:
    """The settings one group of layers gets: a rule of :attr:`PreconditionerConfig.rules`
    (``index`` its position) or the default rule (``index`` ``None``: the top-level fields),
    with the rule's unset fields taken from the default.

    Attributes:
        index: the rule's index in ``config.rules``; ``None`` for the default rule.
        rule: the :class:`LayerRule` (``None`` for the default rule).
        approximator, damping: the resolved kinds (``None`` for a fallback rule).
        update_every, invert_every: T1 and T2 of the group.
        fallback: the matched layers are left to the fallback optimizer.
        own_damping: the rule sets its damping; ``False``: it shares the default rule's
            damping object (the same λ, adapted once per step when adaptive).
        coarse: its layers are in the coarse space (:class:`LayerRule` ``coarse``).
    """

    index: int | None
    rule: LayerRule | None
    approximator: ResolvedKind | None
    damping: ResolvedKind | None
    update_every: int
    invert_every: int
    fallback: bool = False
    own_damping: bool = False
    coarse: bool = False

    @property
    def label(self) -> str:
        """``"rules[i]"`` or ``"default"`` (in messages and reports)."""
        return "default" if self.index is None else f"rules[{self.index}]"


@dataclass(frozen=True)
class ResolvedConfig:
    """A :class:`PreconditionerConfig` with every kind resolved and validated.

    ``groups`` holds one :class:`ResolvedRule` per rule of ``config.rules``, in order, then
    the default rule (the top-level fields) last; without rules, the default rule alone.
    """

    config: PreconditionerConfig
    curvature: ResolvedKind
    approximator: ResolvedKind
    damping: ResolvedKind
    coarse_space: ResolvedKind | None
    groups: tuple[ResolvedRule, ...] = ()

    @property
    def lam(self) -> float | None:
        """The damping's ``value`` (λ), if its options have one."""
        v = self.damping.options.model_dump().get("value")
        return None if v is None else float(v)


def _resolve_kind(registry: Any, field: str, data: Mapping[str, Any], inherited: Mapping[str, Any]) -> ResolvedKind:
    family = registry.family(KIND_FIELDS[field])
    options = thaw(data)  # plain dicts and lists: the kind's (strict) options model validates them
    kind = options.pop("kind")
    try:
        spec = family.get(kind)
    except UnknownKindError as exc:
        raise UnknownKindError(f"{field}.kind: {exc}") from None
    fields = spec.options.model_fields
    for name, value in inherited.items():
        if name in fields and name not in options:
            options[name] = value
    try:
        model = spec.options.model_validate(options)
    except pydantic.ValidationError as exc:
        raise ConfigError(
            f"invalid options for {field} kind {kind!r}:\n" + format_validation_error(exc, prefix=field)
        ) from exc
    return ResolvedKind(field=field, kind=kind, spec=spec, options=model, data=options)


def _resolve_rule(registry: Any, config: PreconditionerConfig, i: int, rule: LayerRule,
                  default_approximator: ResolvedKind, default_damping: ResolvedKind) -> ResolvedRule:
    """Rule i with the default's settings where it sets none; errors prefixed ``rules[i].``."""
    t1 = config.update_every if rule.update_every is None else rule.update_every
    t2 = config.invert_every if rule.invert_every is None else rule.invert_every
    if rule.fallback:
        return ResolvedRule(i, rule, None, None, t1, t2, fallback=True)
    try:
        approx = default_approximator if rule.approximator is None else _resolve_kind(
            registry, "approximator", rule.approximator, {"ema": config.ema})
        damp = default_damping if rule.damping is None else _resolve_kind(registry, "damping", rule.damping,
                                                                         {"interval": t1})
    except UnknownKindError as exc:
        raise UnknownKindError(f"rules[{i}].{exc}") from None
    except ConfigError as exc:
        text = str(exc).replace("\napproximator.", f"\nrules[{i}].approximator.").replace(
            "\ndamping.", f"\nrules[{i}].damping.")
        raise ConfigError(f"rules[{i}]: {text}") from None
    if rule.damping is not None and damp.spec.factory(damp.options).adaptive:
        raise ConfigError(f"rules[{i}].damping: {damp.kind!r} adapts λ from the whole step's reduction ratio; an "
                          "adaptive damping can only be the default rule's (the top-level damping, which rules without a damping "
                          "share)")
    return ResolvedRule(i, rule, approx, damp, t1, t2, own_damping=rule.damping is not None)


def resolve_config(config: PreconditionerConfig, registry: Any) -> ResolvedConfig:
    """Resolve every ``kind`` of ``config`` in ``registry`` and validate its options.

    Inherited options: the approximator gets ``ema`` = ``config.ema`` and the damping gets
    ``interval`` = ``config.update_every`` (the Levenberg–Marquardt λ is adapted at each
    curvature refresh) when their options models have those fields and their mappings do
    not set them.

    Raises:
        UnknownKindError: a kind is not registered; the message starts with the field path
            (``approximator.kind: ...``) and lists the known kinds.
        ConfigError: invalid options; one line per problem, ``<field>.<option>: <why> (got ...)``.
        ConfigError: ``preconditioner`` is a natural-gradient reference and the damping has
            no ``value`` (λ).
    """
    curv = _resolve_kind(registry, "curvature", config.curvature, {})
    approx = _resolve_kind(registry, "approximator", config.approximator, {"ema": config.ema})
    damp = _resolve_kind(registry, "damping", config.damping, {"interval": config.update_every})
    coarse = None
    if config.coarse_space is not None:
        coarse = _resolve_kind(registry, "coarse_space", config.coarse_space, {})
    groups = [_resolve_rule(registry, config, i, rule, approx, damp) for i, rule in enumerate(config.rules)]
    groups.append(ResolvedRule(None, None, approx, damp, config.update_every, config.invert_every, own_damping=True))
    groups = [dataclasses.replace(g, coarse=c) for g, c in zip(groups, config._coarse_members())]
    resolved = ResolvedConfig(config=config, curvature=curv, approximator=approx, damping=damp, coarse_space=coarse,
                              groups=tuple(groups))
    if config.preconditioner != "kronecker" and resolved.lam is None:
        raise ConfigError(
            f"preconditioner={config.preconditioner!r} uses the damping's value as λ of (F + λI)⁻¹, but damping "
            f"kind {damp.kind!r} has no 'value' option"
        )
    return resolved
