"""The optimization methods ``curvlib bench`` compares, by name, and their settings.

A *method* is a name the user types (``--methods sgd adam kfac kfac+residual``) resolved
against the plugin registry into a :class:`Method`: a first-order baseline (SGD, Adam,
AdamW) or a natural-gradient optimizer (:class:`curvlib.optim.NaturalGradient`) with one
:class:`curvlib.precond.PreconditionerConfig`.

=======================  =====================================================================
name                     what runs
=======================  =====================================================================
``sgd``                  ``torch.optim.SGD``, momentum β = 0.9 (thesis §3.3.2)
``adam``                 ``torch.optim.Adam``, (β₁, β₂) = (0.9, 0.999) (thesis §3.3.2)
``adamw``                ``torch.optim.AdamW``, (β₁, β₂) = (0.9, 0.999), decoupled weight decay
                         (:data:`DEFAULT_WEIGHT_DECAY`: 0.01) on the weight matrices, kernels
                         and embeddings (parameters with ≥ 2 dimensions), none on biases and
                         normalization scales
``kfac``                 approximator ``kfac``, heuristic (π-split) damping (2.95)–(2.96)
``kfac_tikhonov``        approximator ``kfac``, Tikhonov damping (A ⊗ G + λI)⁻¹ (4.54), §4.4.2
``<kind>``               any registered approximator kind — ``kpsvd``, ``deflation``,
                         ``lanczos``, ``kfac_corrected``, ``exact_block``, or a third party's —
                         with heuristic damping
``<kind>_tikhonov``      the same approximator with Tikhonov damping
``<kind>_reduce``        the same approximator with the approximator option
                         ``weight_sharing="reduce"`` (KFAC-reduce, Eschenhagen et al. 2023: the
                         positions of a weight-shared layer — a convolution's patches, a
                         transformer's tokens — summed before the factors are formed) instead
                         of ``"expand"`` (positions as extra samples); for kinds whose options
                         have ``weight_sharing``. Combines with the others:
                         ``kfac_reduce_tikhonov``, ``kfac_reduce+residual``
``<kind>+<coarse>``      two-level: approximator ``<kind>`` with the registered coarse space
                         ``<coarse>`` (``residual``, ``nicolaides``, ``spectral``, ``krylov``,
                         ``taylor``, …), multiplicative correction (4.17)
``<kind>+previous``      the two-level method of Tselepidis et al. (thesis's "PREVIOUS",
                         (4.19)–(4.20)): the Nicolaides coarse space with
                         ``coarse_mode="previous"`` (additive, approximate coarse operator)
``block_ng``             block-diagonal natural gradient (4.51)–(4.52), Tikhonov damping
``exact_ng``             exact natural gradient through Woodbury (4.50), Tikhonov damping
``kron_inverse``         exact blocks with the ``kron_inverse`` damping: C⊗D fitted to (F_ii + λI)⁻¹ (ALS)
``<file>.yaml``          a composed preconditioner (docs/composition.md): a
                         ``PreconditionerConfig`` file (``.yaml``, ``.yml`` or ``.json``) whose
                         ``rules``, default ``approximator`` (with its options) and ``damping``
                         kind are used; the curvature, the default rule's λ, T1/T2 and EMA, the
                         learning rate and the KL clip are the bench's hyperparameters, as for
                         every method (each rule keeps the settings the file gives it)
``<optimizer>``          any registered kind of the ``optimizers`` family (a third party's
                         ``torch.optim.Optimizer``, e.g. ``grouped_newton``), built by its
                         factory: ``factory(options).build(model, loss_fn, *, lr, generator,
                         registry)``; its learning rate defaults to the kind's ``default_lr``
                         metadata, ``needs_batch`` says whether ``step`` takes ``batch=(X, y)``
=======================  =====================================================================

A name that is none of these raises :class:`~curvlib.errors.UnknownKindError` listing the
valid names (:func:`available_methods`). Nothing here hard-codes the approximator kinds:
a third-party approximator installed as a plugin is a method under its own name, and so is
a third-party optimizer (the ``optimizers`` family). Of the :class:`Hyperparameters`, such an
optimizer receives ``lr`` and ``optimizer_options`` (validated against the kind's options
model); the others (momentum, damping, …) are the natural-gradient and baseline settings and
are not passed to it — its own knobs go in ``optimizer_options``. A grid search searches the
learning rate only for it.

Hyperparameters (:class:`Hyperparameters`) default per method family
(:data:`DEFAULT_LR`, :data:`DEFAULT_DAMPING`); ``curvlib bench --grid`` replaces the
learning rate and the damping by a grid search (:mod:`curvlib.bench.grid`). The optimizer
a method builds from them is :func:`curvlib.bench.training_step.build_training_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field

from curvlib.config import FrozenDict, StrictModel
from curvlib.errors import ConfigError, UnknownKindError

__all__ = [
    "COARSE_SEPARATOR",
    "DEFAULT_DAMPING",
    "DEFAULT_KL_CLIP",
    "DEFAULT_LR",
    "DEFAULT_SCHEDULE",
    "DEFAULT_WEIGHT_DECAY",
    "FIRST_ORDER",
    "Hyperparameters",
    "Method",
    "REDUCE_SUFFIX",
    "TIKHONOV_SUFFIX",
    "available_methods",
    "resolve_method",
]

Family = Literal["sgd", "adam", "adamw", "natural_gradient", "optimizer"]

#: The first-order baselines.
FIRST_ORDER: tuple[str, ...] = ("sgd", "adam", "adamw")

#: Separator of a two-level method name, ``<approximator>+<coarse space>``.
COARSE_SEPARATOR = "+"

#: Suffix selecting Tikhonov damping instead of the heuristic π-split (§4.4.2).
TIKHONOV_SUFFIX = "_tikhonov"

#: Suffix selecting KFAC-reduce: the approximator option ``weight_sharing="reduce"``.
REDUCE_SUFFIX = "_reduce"

#: Learning rate used when neither the user nor a grid search gives one: picked from short
#: grid searches (:mod:`curvlib.bench.grid`) on the default problem (``mnist_autoencoder``,
#: ``small=True``, batch 512) — a starting point, not a tuned optimum for other problems.
#: For natural gradient it is the largest step α_max, the KL clipping (:data:`DEFAULT_KL_CLIP`)
#: shortening it (appendix 3.E).
#: AdamW takes Adam's.
DEFAULT_LR: dict[str, float] = {"sgd": 0.3, "adam": 3e-3, "adamw": 3e-3, "natural_gradient": 1.0}

#: Weight decay of each family unless set: none, except AdamW's decoupled decay, whose
#: ``torch.optim.AdamW`` default 0.01 is kept (applied to parameters with ≥ 2 dimensions only).
DEFAULT_WEIGHT_DECAY: dict[str, float] = {"adamw": 1e-2}

#: Damping λ used when neither the user nor a grid search gives one: the best of the
#: 3 × 3 × 3 (lr × λ × KL clip) grid on the default problem for KFAC (final training loss
#: after 200 steps 0.198 with λ = 1e-3 against 0.238 with λ = 1e-2).
DEFAULT_DAMPING = 1e-3

#: KL clipping constant c of the natural-gradient methods (appendix 3.E; §3.3.2 searches
#: c in {10⁻², 10⁻³}).
DEFAULT_KL_CLIP = 1e-3

#: T1 (curvature refresh) and T2 (inversion) of the natural-gradient methods unless set.
#: The thesis's §3.3.2 runs use T1 = T2 = 100 over many epochs; the default benchmark is a
#: few hundred steps, so the curvature is refreshed every 10 steps and inverted every 20.
DEFAULT_SCHEDULE: dict[str, int] = {"update_every": 10, "invert_every": 20}

#: Momentum of each family (thesis §3.3.2: β = 0.9 for SGD; none for natural gradient).
DEFAULT_MOMENTUM: dict[str, float] = {"sgd": 0.9, "adam": 0.0, "adamw": 0.0, "natural_gradient": 0.0,
                                      "optimizer": 0.0}

#: Learning rate of a plugin optimizer whose kind gives no ``default_lr`` metadata.
DEFAULT_OPTIMIZER_LR = 1e-3


# --------------------------------------------------------------------------- hyperparameters


class Hyperparameters(StrictModel):
    """The settings of one method on one problem (every field is recorded in the run's JSON).

    Attributes:
        lr: learning rate α.
        momentum: heavy-ball β (SGD, natural gradient); unused by Adam and AdamW (β₁ = 0.9).
        weight_decay: L2 coefficient (§4.3 uses 1e-3 for every optimizer); for AdamW the
            decoupled decay (default :data:`DEFAULT_WEIGHT_DECAY`).
        damping: λ of the natural-gradient methods (its meaning is the damping kind's).
        damping_kind: ``"heuristic"`` or ``"tikhonov"`` (or any registered damping kind);
            ``None``: the method's own choice.
        kl_clip: c of the KL clipping of appendix 3.E (natural gradient; default
            :data:`DEFAULT_KL_CLIP`); 0: off.
        curvature: the curvature kind the factors estimate (``"fisher"``: true Fisher,
            targets sampled from the model, as in the thesis's experiments).
        mc_samples: Monte Carlo targets per input for ``"fisher"``.
        update_every: T₁, steps between curvature refreshes (:data:`DEFAULT_SCHEDULE`
            for the natural-gradient methods; ``None``: the ``PreconditionerConfig`` default).
        invert_every: T₂, steps between inversions, a multiple of T₁.
        ema: γ of the moving average of §3.1.2; ``None``: the default.
        approximator_options: extra options of the approximator kind (e.g. ``{"power_iters": 20}``).
        coarse_options: extra options of the coarse space kind.
        fallback: the optimizer natural gradient uses for parameters outside any layer
            (batch-norm scales, …): ``"sgd"`` or ``"adam"``.
        optimizer_options: options of a plugin optimizer kind (``optimizers`` family), validated
            against the kind's options model (e.g. ``{"cubic": 1e3, "period": 10}``).
        distributed_inversion: ``PreconditionerConfig.distributed_inversion`` (``curvlib bench
            --nproc``); ``None``: the default.
        background_inversion: ``PreconditionerConfig.background_inversion``; ``None``: the default.
    """

    lr: float = Field(gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    damping: float | None = Field(None, gt=0)
    damping_kind: str | None = None
    kl_clip: float | None = Field(None, ge=0)
    curvature: str = "fisher"
    mc_samples: int = Field(1, ge=1)
    update_every: int | None = Field(None, ge=1)
    invert_every: int | None = Field(None, ge=1)
    ema: float | None = Field(None, ge=0, le=1)
    approximator_options: FrozenDict = Field(default_factory=FrozenDict)
    coarse_options: FrozenDict = Field(default_factory=FrozenDict)
    fallback: Literal["sgd", "adam"] = "sgd"
    optimizer_options: FrozenDict = Field(default_factory=FrozenDict)
    distributed_inversion: Literal["broadcast", "direction", "replicated"] | None = None
    background_inversion: bool | None = None


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """A resolved method name.

    Attributes:
        name: the name as given (``"kfac+residual"``).
        family: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"natural_gradient"`` or ``"optimizer"``
            (a kind of the ``optimizers`` plugin family).
        description: one line for tables and ``--list-methods``.
        approximator: the approximator kind (Kronecker natural gradient only; the
            ``block_ng``/``exact_ng`` references use the curvature itself).
        damping_kind: the damping kind the method uses unless overridden.
        coarse_space: the coarse space kind of a two-level method, else ``None``.
        coarse_mode: ``"multiplicative"`` (4.17) or ``"additive"`` (4.19).
        preconditioner: ``"kronecker"``, ``"block_natural_gradient"`` or
            ``"exact_natural_gradient"``.
        optimizer: the ``optimizers`` kind (family ``"optimizer"`` only).
        default_lr: that kind's default learning rate (its ``default_lr`` metadata).
        needs_batch: that kind's ``step`` takes ``batch=(X, y)`` (its ``needs_batch`` metadata).
        approximator_options: options of the approximator the name fixes (``_reduce``:
            ``{"weight_sharing": "reduce"}``), as ``(option, value)`` pairs; the
            hyperparameters' ``approximator_options`` may add others but not contradict these.
        rules: the ``PreconditionerConfig.rules`` of a composed method (a config file), as
            plain mappings.
        damping_options: options of the method's damping kind other than λ (a composed
            method's file: ``{"block_size": 16}`` of ``inverse_free``), as ``(option, value)``
            pairs; used while the damping kind is the method's own.
    """

    name: str
    family: Family
    description: str
    approximator: str | None = None
    damping_kind: str | None = None
    coarse_space: str | None = None
    coarse_mode: str = "multiplicative"
    preconditioner: str = "kronecker"
    optimizer: str | None = None
    default_lr: float | None = None
    needs_batch: bool = False
    approximator_options: tuple[tuple[str, Any], ...] = ()
    rules: tuple[Any, ...] = ()
    damping_options: tuple[tuple[str, Any], ...] = ()

    @property
    def is_natural_gradient(self) -> bool:
        return self.family == "natural_gradient"

    def default_hyperparameters(self, **overrides: Any) -> Hyperparameters:
        """The method's defaults (:data:`DEFAULT_LR`, …) with ``overrides`` (``None`` values ignored)."""
        if self.family == "optimizer":
            lr = self.default_lr if self.default_lr is not None else DEFAULT_OPTIMIZER_LR
        else:
            lr = DEFAULT_LR[self.family]
        values: dict[str, Any] = {
            "lr": lr,
            "momentum": DEFAULT_MOMENTUM[self.family],
            "weight_decay": DEFAULT_WEIGHT_DECAY.get(self.family, 0.0),
        }
        if self.is_natural_gradient:
            values["damping"] = DEFAULT_DAMPING
            values["damping_kind"] = self.damping_kind
            values["kl_clip"] = DEFAULT_KL_CLIP
            values.update(DEFAULT_SCHEDULE)
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        T1, T2 = values.get("update_every"), values.get("invert_every")
        if T1 is not None and T2 is not None and "invert_every" not in given and T2 % T1:
            # a T1 of the user's with the default T2: the next multiple of T1 (T2 must be one)
            values["invert_every"] = -(-T2 // T1) * T1
        return Hyperparameters(**values)

    def preconditioner_config(self, hp: Hyperparameters) -> dict[str, Any]:
        """The keyword arguments of ``PreconditionerConfig`` for ``hp`` (natural gradient only)."""
        if not self.is_natural_gradient:
            raise ConfigError(f"method {self.name!r} ({self.family}) has no preconditioner")
        damping: dict[str, Any] = {"kind": hp.damping_kind or self.damping_kind or "heuristic"}
        if damping["kind"] == self.damping_kind:
            damping.update(self.damping_options)
        if hp.damping is not None:
            damping["value"] = hp.damping
        curvature: dict[str, Any] = {"kind": hp.curvature}
        if hp.curvature == "fisher":
            curvature["mc_samples"] = hp.mc_samples
        config: dict[str, Any] = {"curvature": curvature, "damping": damping, "preconditioner": self.preconditioner}
        if self.approximator is not None:
            fixed = dict(self.approximator_options)
            clash = {k: v for k, v in hp.approximator_options.items() if k in fixed and v != fixed[k]}
            if clash:
                raise ConfigError(f"method {self.name!r} sets approximator options {fixed}; "
                                  f"approximator_options {clash} contradict them")
            config["approximator"] = {"kind": self.approximator, **fixed, **hp.approximator_options}
        elif hp.approximator_options:
            raise ConfigError(f"method {self.name!r} uses no approximator; got approximator_options "
                              f"{hp.approximator_options}")
        if self.coarse_space is not None:
            config["coarse_space"] = {"kind": self.coarse_space, **hp.coarse_options}
            config["coarse_mode"] = self.coarse_mode
        if self.rules:
            config["rules"] = [dict(r) for r in self.rules]
        for key in ("update_every", "invert_every", "ema", "distributed_inversion", "background_inversion"):
            value = getattr(hp, key)
            if value is not None:
                config[key] = value
        return config


_FIXED: dict[str, Method] = {
    "sgd": Method("sgd", "sgd", "SGD with momentum 0.9"),
    "adam": Method("adam", "adam", "Adam, betas (0.9, 0.999)"),
    "adamw": Method("adamw", "adamw", "AdamW, betas (0.9, 0.999), decoupled weight decay (tensors with >= 2 dims)"),
    "block_ng": Method(
        "block_ng", "natural_gradient", "block-diagonal natural gradient (4.51)-(4.52), Tikhonov damping",
        damping_kind="tikhonov", preconditioner="block_natural_gradient",
    ),
    "exact_ng": Method(
        "exact_ng", "natural_gradient", "exact natural gradient via Woodbury (4.50), Tikhonov damping",
        damping_kind="tikhonov", preconditioner="exact_natural_gradient",
    ),
    "kron_inverse": Method(
        "kron_inverse", "natural_gradient",
        "C⊗D fitted to (F_ii + λI)⁻¹ by alternating least squares (docs/beyond_kfac.md), on the exact blocks",
        approximator="exact_block", damping_kind="kron_inverse",
    ),
}

#: The two-level method of Tselepidis et al. (thesis Table 4.1, "PREVIOUS"): not a coarse
#: space of its own but the Nicolaides space with the additive correction and the
#: approximate coarse operator (4.19)-(4.20), ``coarse_mode="previous"``.
_PREVIOUS = ("previous", "nicolaides", "previous")


def _kinds(registry: Any, family: str) -> list[str]:
    return list(registry.family(family).kinds())


def available_methods(registry: Any) -> list[str]:
    """Every method name ``curvlib bench`` accepts with this ``registry``, in display order.

    Two-level names are listed for the ``kfac`` approximator only; any
    ``<approximator>+<coarse space>`` pair of registered kinds is accepted.
    """
    approximators = _kinds(registry, "approximators")
    coarse = _kinds(registry, "coarse_spaces")
    names = list(FIRST_ORDER)
    if "kfac" in approximators:
        names += ["kfac", "kfac_tikhonov"]
        if _has_weight_sharing(registry, "kfac"):
            names.append(f"kfac{REDUCE_SUFFIX}")
    names += [k for k in approximators if k != "kfac"]
    if "kfac" in approximators:
        names += [f"kfac{COARSE_SEPARATOR}{c}" for c in coarse]
        if _PREVIOUS[1] in coarse and _PREVIOUS[0] not in coarse:
            names.append(f"kfac{COARSE_SEPARATOR}{_PREVIOUS[0]}")
    names += ["block_ng", "exact_ng"]
    if "exact_block" in approximators and "kron_inverse" in _kinds(registry, "dampings"):
        names.append("kron_inverse")
    taken = set(names)
    names += [k for k in _kinds(registry, "optimizers") if k not in taken]
    return names


def _unknown(name: str, registry: Any, why: str) -> UnknownKindError:
    approximators = ", ".join(_kinds(registry, "approximators")) or "(none registered)"
    coarse = _kinds(registry, "coarse_spaces")
    coarse_txt = ", ".join(coarse + ([_PREVIOUS[0]] if _PREVIOUS[1] in coarse else [])) or "(none registered)"
    optimizers = ", ".join(_kinds(registry, "optimizers")) or "(none registered)"
    return UnknownKindError(
        f"unknown method {name!r}: {why}. Valid methods: {', '.join(available_methods(registry))}; "
        f"also <approximator>{TIKHONOV_SUFFIX}, <approximator>{REDUCE_SUFFIX} and "
        f"<approximator>{COARSE_SEPARATOR}<coarse space> "
        f"(approximators: {approximators}; coarse spaces: {coarse_txt}; optimizers: {optimizers})"
    )


#: The file suffixes that make a method name a composed preconditioner's config file.
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _composed(path: str) -> Method:
    """The method of a ``PreconditionerConfig`` file (the module docstring's ``<file>.yaml``)."""
    from curvlib.precond.config import PreconditionerConfig

    cfg = PreconditionerConfig.from_file(path)
    if cfg.preconditioner != "kronecker" or cfg.coarse_space is not None:
        raise ConfigError(f"method {path!r}: a composed method is a one-level Kronecker preconditioner with rules; "
                          f"the file sets preconditioner={cfg.preconditioner!r}"
                          + ("" if cfg.coarse_space is None else f" and coarse_space={cfg.coarse_space['kind']!r}"))
    data = cfg.to_dict()
    approximator = dict(data["approximator"])
    kind = approximator.pop("kind")
    approximator.pop("ema", None)  # the bench's ema
    rules = tuple({k: v for k, v in r.items() if v is not None and v is not False} for r in data["rules"])
    damping_data = dict(data["damping"])
    damping = damping_data.pop("kind")
    damping_data.pop("value", None)  # the bench's λ
    desc = _describe(kind, damping, ()) + f", composed by {len(rules)} rule(s) from {path}"
    if damping_data:
        desc += f", damping options {damping_data}"
    return Method(path, "natural_gradient", desc, approximator=kind, damping_kind=damping,
                  approximator_options=tuple(sorted(approximator.items())), rules=rules,
                  damping_options=tuple(sorted(damping_data.items())))


def resolve_method(name: str, registry: Any) -> Method:
    """The :class:`Method` called ``name`` (see the module docstring for the grammar).

    Raises:
        UnknownKindError: ``name`` is not a valid method; the message lists the valid ones.
    """
    if not isinstance(name, str) or not name.strip():
        raise _unknown(str(name), registry, "a method name must be a non-empty string")
    name = name.strip()
    if name in _FIXED:
        return _FIXED[name]
    if name.lower().endswith(CONFIG_SUFFIXES):
        return _composed(name)
    approximators = set(_kinds(registry, "approximators"))
    coarse = set(_kinds(registry, "coarse_spaces"))
    if name in approximators:
        # a kind may name the damping its blocks need (EKFAC's exact-like block: tikhonov)
        damping = registry.approximators.get(name).metadata.get("default_damping", "heuristic")
        return Method(name, "natural_gradient", _describe(name, damping, ()), approximator=name, damping_kind=damping)
    if name in set(_kinds(registry, "optimizers")):
        spec = registry.optimizers.get(name)
        default_lr = spec.metadata.get("default_lr")
        return Method(
            name, "optimizer",
            f"optimizer {name!r} ({spec.distribution})" + (f": {spec.description}" if spec.description else ""),
            optimizer=name, default_lr=None if default_lr is None else float(default_lr),
            needs_batch=bool(spec.metadata.get("needs_batch", False)),
        )
    if COARSE_SEPARATOR in name:
        base_name, _, coarse_name = name.partition(COARSE_SEPARATOR)
        base = resolve_method(base_name, registry) if base_name else None
        if base is None or base.approximator is None or base.preconditioner != "kronecker" \
                or base.coarse_space is not None:
            raise _unknown(name, registry, f"{base_name!r} is not an approximator method")
        mode = "multiplicative"
        if coarse_name == _PREVIOUS[0] and coarse_name not in coarse:
            coarse_name, mode = _PREVIOUS[1], _PREVIOUS[2]
            desc = f"{base.description}, two-level of Tselepidis et al. (nicolaides, (4.19)-(4.20))"
        else:
            desc = f"{base.description}, two-level with coarse space {coarse_name!r}"
        if coarse_name not in coarse:
            raise _unknown(name, registry, f"coarse space {coarse_name!r} is not registered")
        return replace(base, name=name, description=desc, coarse_space=coarse_name, coarse_mode=mode)
    for suffix in (TIKHONOV_SUFFIX, REDUCE_SUFFIX):
        if name.endswith(suffix) and len(name) > len(suffix):
            return _with_suffix(name, suffix, registry)
    raise _unknown(name, registry, "not a baseline, an approximator kind, an optimizer kind or a two-level name")


def _has_weight_sharing(registry: Any, kind: str) -> bool:
    """Whether the options of approximator ``kind`` have a ``weight_sharing`` field."""
    return "weight_sharing" in registry.approximators.get(kind).options.model_fields


def _with_suffix(name: str, suffix: str, registry: Any) -> Method:
    """``<base>_tikhonov`` (Tikhonov damping (4.54)) or ``<base>_reduce`` (KFAC-reduce) of the
    one-level approximator method ``<base>``."""
    base_name = name[: -len(suffix)]
    try:
        base = resolve_method(base_name, registry)
    except UnknownKindError:
        raise _unknown(name, registry, f"{base_name!r} is not an approximator method") from None
    if base.approximator is None or base.preconditioner != "kronecker" or base.coarse_space is not None:
        raise _unknown(name, registry, f"{base_name!r} is not an approximator method")
    damping, options = base.damping_kind, base.approximator_options
    if suffix == TIKHONOV_SUFFIX:
        damping = "tikhonov"
    else:
        if not _has_weight_sharing(registry, base.approximator):
            raise _unknown(name, registry, f"approximator {base.approximator!r} has no weight_sharing option")
        if dict(options).get("weight_sharing") == "reduce":
            raise _unknown(name, registry, f"{base_name!r} already reduces")
        options = (*options, ("weight_sharing", "reduce"))
    return replace(base, name=name, damping_kind=damping, approximator_options=options,
                   description=_describe(base.approximator, damping, options))


def _describe(approximator: str, damping_kind: str | None, options: tuple[tuple[str, Any], ...]) -> str:
    """``"approximator 'kfac'[, weight sharing reduce (KFAC-reduce)], <damping>"``."""
    parts = [f"approximator {approximator!r}"]
    if dict(options).get("weight_sharing") == "reduce":
        parts.append("weight sharing reduce (KFAC-reduce)")
    parts.append("Tikhonov damping (4.54)" if damping_kind == "tikhonov" else f"{damping_kind} damping")
    return ", ".join(parts)
