"""``curvlib.two_level``: a two-level preconditioner from a first level, a curvature and a coarse space."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel

from curvlib.coarse.base import CoarseSpace
from curvlib.coarse.basis import Partition
from curvlib.coarse.two_level import Mode, TwoLevelPreconditioner
from curvlib.errors import ConfigError
from curvlib.linalg import DenseOperator
from curvlib.plugins import load_registry
from curvlib.plugins.hookspecs import KindOrigin

__all__ = ["two_level"]


def two_level(
    first_level: Any,
    curvature: Any,
    coarse_space: str | Mapping[str, Any] | BaseModel | CoarseSpace = "residual",
    damping: float = 1e-3,
    mode: Mode = "multiplicative",
    registry: Any = None,
    *,
    partition: Partition | None = None,
    rcond: float | None = None,
    tko_diagonal: Literal["heuristic", "tikhonov"] = "heuristic",
    **options: Any,
) -> TwoLevelPreconditioner:
    """A two-level preconditioner ζ ≈ (F + λI)⁻¹u: a first level plus a coarse correction (§4.2).

    Example::

        F = curvlib.curvature("fisher", model, loss_fn, (X, y), mc_samples=1, generator=g)
        pre = curvlib.two_level(first_level=inv, curvature=F, coarse_space="residual", damping=1e-3)
        zeta = pre @ F.gradient_vector()             # [p]
        pre.error_reduction(F.gradient_vector())     # 𝔈(β*) − 𝔈(0) ≤ 0, (4.46)
        pre.info                                     # N, dropped columns, rank, condition number
        curvlib.two_level(inv, F, {"kind": "krylov", "seed": "residual"}, damping=1e-3)
        curvlib.two_level(inv, F, "taylor", damping=1e-3, order=3)

    Args:
        first_level: M ≈ F•⁻¹, any curvlib :class:`~curvlib.linalg.LinearOperator` (a KFAC
            inverse from ``damped_inverse``, a
            :class:`~curvlib.precond.references.BlockNaturalGradient`, an operator expression),
            a dense symmetric ``[p, p]`` tensor (wrapped in a
            :class:`~curvlib.linalg.DenseOperator`), or ``None`` for zero.
        curvature: the exact curvature operator F of the same batch (``curvlib.curvature``).
        coarse_space: a registered kind (``"nicolaides"``, ``"spectral"``, ``"krylov"``,
            ``"residual"``, ``"taylor"``, or a plugin's), a mapping ``{"kind": ..., **options}``,
            an options model with a ``kind`` field, or a :class:`~curvlib.coarse.base.CoarseSpace`.
        damping: λ > 0 of F• = F + λI (4.2).
        mode: ``"multiplicative"`` (4.17, default), ``"additive"`` (4.19) or ``"previous"``
            (Tselepidis et al., (4.20) with (4.47)).
        registry: a :class:`curvlib.plugins.Registry` (default: ``load_registry()``).
        partition: the groups of R₀ᵀ (default: one per layer; see
            :meth:`~curvlib.coarse.basis.Partition.parameter_tensors`).
        rcond: relative eigenvalue cut-off of the coarse solve (default 10·N·eps).
        tko_diagonal: diagonal blocks of F̄• in ``"previous"`` mode (``"heuristic"`` π-split
            or ``"tikhonov"``).
        **options: the coarse space's options (validated by its pydantic model).

    Raises:
        UnknownKindError: unknown coarse space kind (the message lists the known ones).
        ConfigError: invalid options, mode or damping.
    """
    if isinstance(coarse_space, CoarseSpace):
        if options:
            raise ConfigError(
                f"two_level: options ({', '.join(sorted(options))}) given with a CoarseSpace instance; set them on it"
            )
        space = coarse_space
    else:
        if registry is None:
            registry = load_registry()
        spec, opts = registry.coarse_spaces.resolve(coarse_space, **options)
        space = spec.factory(opts)
        if not isinstance(space, CoarseSpace):
            raise KindOrigin.of(spec).error(None, f"the factory built {type(space).__name__}; expected a curvlib.coarse.CoarseSpace")
        space.origin = KindOrigin.of(spec)  # named in every message about its bases
    if isinstance(first_level, torch.Tensor):
        first_level = DenseOperator(first_level, symmetric=True)
    return TwoLevelPreconditioner(
        first_level, curvature, space, damping, mode, partition=partition, rcond=rcond, tko_diagonal=tko_diagonal
    )
