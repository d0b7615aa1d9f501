"""``build_preconditioner``: configuration + plugin registry -> :class:`Preconditioner`.

Before any data is seen, :func:`check_compatibility` checks that the kinds chosen for the
families work together — every rule below whose two sides are declared (a kind that does not
declare what it needs or makes is checked where it is first used, as before):

1. **curvature → preconditioner.**  Every ``preconditioner`` needs the curvature's per-layer
   statistics (captured activations and back-propagated columns): ``kronecker`` fits its
   approximator to them, ``block_natural_gradient`` and ``exact_natural_gradient`` solve with
   C = scale·JJᵀ by Woodbury (4.50)/(4.52).  ``hessian`` has products only.  Declared by
   :data:`BUILTIN_CURVATURE_STATISTICS`, or a plugin curvature's registration metadata
   ``per_layer_statistics=True/False``.
2. **approximator → damping** (``kronecker``).  The blocks the approximator declares
   (:meth:`~curvlib.approximators.BlockApproximator.declared_blocks`) must be ones the damping
   inverts (:meth:`~curvlib.damping.Damping.block_requirement`): ``heuristic`` (and
   ``levenberg_marquardt`` wrapping it) needs Kronecker-factored blocks of at most two terms —
   not ``exact_block`` (a shift-solvable block), not ``deflation``/``lanczos`` with
   ``rank`` > 2; ``tikhonov`` inverts Kronecker-factored and shift-solvable blocks.
3. **coarse space → damping and approximator.**  What the coarse space needs of every
   first-level block (:meth:`~curvlib.coarse.CoarseSpace.first_level_requirement`) must be
   offered by the damping's inverse of the approximator's blocks for at least one possible
   number of terms (:meth:`~curvlib.damping.Damping.inverse_capabilities`): ``spectral``
   with ``source="first_level"`` needs an eigenbasis or damped factors, which ``tikhonov``
   gives for one-term blocks only (not for ``deflation``, ``lanczos``, ``kfac_corrected`` or
   ``exact_block``) and ``heuristic`` for one or two terms.

(The rules within one configuration — a coarse space only with ``preconditioner="kronecker"``,
``coarse_mode`` only with a coarse space, T2 a multiple of T1, a natural-gradient reference
only with a damping that has a ``value`` — are checked by
:class:`~curvlib.precond.config.PreconditionerConfig` and
:func:`~curvlib.precond.config.resolve_config`.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from curvlib.approximators.base import BlockApproximator
from curvlib.coarse.base import CoarseSpace
from curvlib.damping.base import Damping
from curvlib.errors import ConfigError
from curvlib.linalg import KroneckerFactored
from curvlib.plugins import load_registry
from curvlib.plugins.hookspecs import BlockDeclaration, BlockRequirement, KindOrigin, describe_capabilities
from curvlib.precond.config import PreconditionerConfig, ResolvedConfig, ResolvedKind, resolve_config
from curvlib.precond.preconditioner import Preconditioner

__all__ = ["BUILTIN_CURVATURE_STATISTICS", "build_preconditioner", "check_compatibility"]

#: Whether curvlib's own curvature kinds give per-layer statistics (exact factory class -> bool).
BUILTIN_CURVATURE_STATISTICS: dict[str, bool] = {
    "curvlib.curvatures.kinds:FisherCurvature": True,
    "curvlib.curvatures.kinds:EmpiricalFisherCurvature": True,
    "curvlib.curvatures.kinds:GGNCurvature": True,
    "curvlib.curvatures.kinds:HessianCurvature": False,
}


def build_preconditioner(
    model: nn.Module,
    loss_fn: nn.Module,
    config: PreconditionerConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    generator: torch.Generator | None = None,
    registry: Any = None,
    process_group: Any = "auto",
) -> Preconditioner:
    """Build the preconditioner a configuration describes.

    Example::

        cfg = curvlib.PreconditionerConfig(curvature={"kind": "fisher", "mc_samples": 1},
                approximator={"kind": "kfac_corrected"}, damping={"kind": "heuristic", "value": 1e-3},
                coarse_space={"kind": "residual"}, update_every=10, invert_every=100, ema=0.95)
        pre = curvlib.build_preconditioner(model, loss_fn, cfg)   # or a dict, or "precond.yaml"
        info = pre.update((X, y))          # refresh / invert when due (step 0: both)
        direction = pre.apply(grads)       # list shaped like pre.params(), or the flat [p] vector

    Every ``kind`` is looked up in ``registry`` (third-party kinds work the same way as
    curvlib's) and its options are validated against the kind's pydantic model; then the
    kinds are checked to work together (:func:`check_compatibility`, the module docstring).

    Args:
        model: the network.
        loss_fn: its loss module (``nn.CrossEntropyLoss``, ``nn.MSELoss``,
            ``nn.BCEWithLogitsLoss``, ``nn.BCELoss``).
        config: a :class:`PreconditionerConfig`, a mapping of its fields, the path of a
            YAML/JSON file holding one, or ``None`` for the defaults.
        generator: the ``torch.Generator`` of the Monte Carlo targets (default: one on the
            model's device, seeded from torch's global RNG).
        registry: a :class:`curvlib.plugins.Registry` (default: :func:`curvlib.plugins.load_registry`).
        process_group: ``"auto"`` (a DDP model's group, else the initialised default group
            of more than one rank, else one process), a ``torch.distributed`` process group,
            or ``None`` (one process); see :mod:`curvlib.distributed` and docs/distributed.md.

    Raises:
        ConfigError: an invalid configuration; each line names the field path
            (``approximator.rank: ...``); or kinds that do not work together (the message
            names both kinds, their distributions and the rule).
        UnknownKindError: an unknown kind (``damping.kind: unknown damping kind 'x'; known kinds: ...``).
        PluginOutputError: a kind's factory built an object of the wrong family type.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"build_preconditioner: expected model to be an nn.Module, got {type(model).__name__}")
    cfg = PreconditionerConfig.coerce(config)
    if registry is None:
        registry = load_registry()
    resolved = resolve_config(cfg, registry)
    check_compatibility(resolved)
    pre = Preconditioner(model, loss_fn, resolved, generator=generator, registry=registry, process_group=process_group)
    for rule, damping in zip(resolved.groups, pre._dampings):  # named in every message about its inverses
        if damping is not None and rule.own_damping:
            damping.origin = KindOrigin.of(rule.damping.spec)
    return pre


# --------------------------------------------------------------------------- compatibility


def _key(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _build(rk: ResolvedKind, base: type, what: str) -> Any:
    """The object a resolved kind's factory builds, checked to be a ``base`` (an approximator
    or a coarse space is built per refresh later; building one here costs nothing)."""
    obj = rk.spec.factory(rk.options)
    if not isinstance(obj, base):
        raise KindOrigin.of(rk.spec).error(None, f"the factory built {type(obj).__name__}; expected a {what}")
    return obj


def _curvature_statistics(rk: ResolvedKind) -> bool | None:
    """Whether the curvature kind gives per-layer statistics (``None``: not declared)."""
    declared = BUILTIN_CURVATURE_STATISTICS.get(_key(rk.spec.factory)) if isinstance(rk.spec.factory, type) else None
    if declared is None:
        declared = rk.spec.metadata.get("per_layer_statistics")
    return None if declared is None else bool(declared)


def _reject(a: ResolvedKind, b: ResolvedKind | None, rule: str) -> ConfigError:
    first = f"{a.field} = {KindOrigin.of(a.spec)}"
    second = "" if b is None else f" and {b.field} = {KindOrigin.of(b.spec)}"
    return ConfigError(f"incompatible kinds: {first}{second}: {rule}")


def _blocks_fit(declared: BlockDeclaration, required: BlockRequirement) -> str | None:
    """Why blocks as ``declared`` can never be what ``required`` asks (``None``: they can)."""
    if not any(issubclass(c, r) for c in declared.capabilities for r in required.any_of):
        return f"the approximator returns {declared}"
    kronecker = any(issubclass(c, KroneckerFactored) for c in declared.capabilities)
    if kronecker and required.max_terms is not None and declared.terms is not None and declared.terms[0] > required.max_terms:
        return f"the approximator returns {declared}"
    return None


def _check_blocks(approximator_kind: ResolvedKind, damping_kind: ResolvedKind) -> tuple[Any, Any, Any]:
    """Rule 2: the approximator's declared blocks are ones the damping inverts; returns the
    approximator and damping objects and the declaration."""
    approximator = _build(approximator_kind, BlockApproximator, "curvlib.approximators.BlockApproximator")
    damping = damping_kind.spec.factory(damping_kind.options)
    declared = approximator.declared_blocks()
    required = damping.block_requirement() if isinstance(damping, Damping) else None
    if declared is not None and required is not None:
        why = _blocks_fit(declared, required)
        if why is not None:
            raise _reject(damping_kind, approximator_kind,
                          f"the damping inverts {required} ({required.reason}), but {why}")
    return approximator, damping, declared


def check_compatibility(resolved: ResolvedConfig) -> None:
    """Reject a configuration whose kinds cannot work together, before any data is seen
    (the rules of the module docstring; undeclared kinds are skipped).

    Raises:
        ConfigError: the message names both kinds (with their distributions) and the rule.
        PluginOutputError: an approximator or coarse space factory built the wrong type.
    """
    cfg = resolved.config
    statistics = _curvature_statistics(resolved.curvature)
    if statistics is False:
        if cfg.preconditioner == "kronecker":
            raise _reject(
                resolved.curvature, resolved.approximator,
                "the approximator fits each layer block from the curvature's per-layer statistics, and this curvature "
                "gives matrix-free products only; use 'fisher', 'empirical_fisher' or 'ggn'",
            )
        raise ConfigError(
            f"incompatible kinds: curvature = {KindOrigin.of(resolved.curvature.spec)} and "
            f"preconditioner={cfg.preconditioner!r}: (F + λI)⁻¹ by Woodbury ((4.50), (4.52)) needs the per-sample "
            "Jacobian statistics C = scale·JJᵀ, and this curvature gives matrix-free products only; use 'fisher', "
            "'empirical_fisher' or 'ggn'"
        )
    if cfg.preconditioner != "kronecker":
        return  # the references use the curvature and the damping's λ only
    for rule in resolved.groups[:-1]:  # each rule's approximator with its damping (rule 2)
        if not rule.fallback:
            try:
                _check_blocks(rule.approximator, rule.damping)
            except ConfigError as exc:
                raise ConfigError(f"{rule.label}: {exc}") from None
    _check_blocks(resolved.approximator, resolved.damping)
    if resolved.coarse_space is None:
        return
    space = _build(resolved.coarse_space, CoarseSpace, "curvlib.coarse.CoarseSpace")
    needs = space.first_level_requirement()
    if needs is None:
        return
    for rule in resolved.groups:  # rule 3 for every group in the coarse space
        if rule.coarse:
            try:
                _check_first_level(resolved.coarse_space, needs, rule.approximator, rule.damping)
            except ConfigError as exc:
                raise ConfigError(f"{rule.label}: {exc}" if resolved.config.rules else str(exc)) from None


def _check_first_level(coarse: ResolvedKind, needs: Any, approximator_kind: ResolvedKind,
                       damping_kind: ResolvedKind) -> None:
    """Rule 3: the damping's inverses of the approximator's blocks offer what the coarse space needs."""
    approximator, damping, declared = _check_blocks(approximator_kind, damping_kind)
    if declared is None or not isinstance(damping, Damping):
        return
    kronecker = any(issubclass(c, KroneckerFactored) for c in declared.capabilities)
    counts: tuple[int | None, ...] | None = declared.term_counts() if kronecker else (None,)
    if counts is None:
        return  # unbounded number of terms: decided at the first inversion
    offers = [damping.inverse_capabilities(declared.capabilities, n) for n in counts]
    if any(o is None for o in offers):
        return
    if not any(issubclass(c, r) for o in offers for c in o for r in needs.any_of):
        given = "; ".join(f"{n} term(s): {describe_capabilities(o)}" if n is not None else describe_capabilities(o)
                          for n, o in zip(counts, offers))
        raise ConfigError(
            f"incompatible kinds: coarse_space = {KindOrigin.of(coarse.spec)} needs first-level blocks "
            f"that are {describe_capabilities(needs.any_of)} ({needs.reason}), but damping = "
            f"{KindOrigin.of(damping_kind.spec)} builds inverses of the {declared} of approximator = "
            f"{KindOrigin.of(approximator_kind.spec)} that are not ({given}); use the 'heuristic' damping, a "
            "one-term approximator, or source='auto'"
        )
