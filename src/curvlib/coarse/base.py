"""What a coarse space is built from and what it implements: the :class:`CoarseContext`
(the curvature, the damping, the first level, the partition and the vector u, with the
products F•X = FX + λX (4.55) and M·X and the cached ζ_KFAC (4.6) and r_KFAC (4.15)), the
:class:`CoarseSpace` interface that plugins implement (a rule ctx -> R₀ᵀ (4.23)), and
:func:`kfc_factors`, the per-layer KFAC/KFC factors (3.29) the spaces and the ``previous``
mode read from the curvature's statistics.

The basis R₀ᵀ itself and the partition it is block-diagonal over are in
:mod:`curvlib.coarse.basis`.

What curvlib checks in a coarse space's basis (:meth:`CoarseSpace.checked_basis`, the one
place the two-level preconditioner receives it, for every kind): a :class:`CoarseBasis` over
the context's partition (so V_g ``[p_g, N_g]`` for every group g, R₀ᵀ ``[p, N]``), in the
curvature's dtype and on its device — else :class:`~curvlib.errors.PluginOutputError` naming
the kind, its distribution and the group (a layer, for the default partition).  Non-finite
columns are the documented fallback of :mod:`curvlib.coarse.two_level`: dropped, with a
:class:`~curvlib.errors.NumericalWarning` naming the same (:meth:`CoarseSpace.nonfinite_message`).
What a kind needs of the first level is declared on its own class, curvlib's as a plugin's, by
:attr:`CoarseSpace.first_level_needs` or :meth:`CoarseSpace.first_level_requirement`
(``spectral`` with ``source="first_level"``: an eigenbasis or the damped factors of every
first-level block), and checked by :func:`curvlib.build_preconditioner` before any data is seen.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel

from curvlib.coarse.basis import CoarseBasis, Partition
from curvlib.config import NoOptions, validate_options
from curvlib.curvatures.factors import kfac_factors
from curvlib.errors import ConfigError
from curvlib.linalg import BlockDiagonalOperator
from curvlib.plugins.hookspecs import BlockRequirement, KindOrigin

__all__ = [
    "CoarseContext",
    "CoarseSpace",
    "kfc_factors",
]


# --------------------------------------------------------------------------- KFAC factors
def kfc_factors(stats: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """KFAC factors of one layer from its :class:`~curvlib.curvatures.statistics.LayerStatistics`:
    the leading term of :func:`curvlib.curvatures.factors.kfac_factors` (expand setting; KFC
    (3.29) for convolutions),

        A = (1/m) Σ_b Σ_t ā_{b,t} ā_{b,t}ᵀ  ``[a_dim, a_dim]``,
        G = (scale/T) Σ_{b,c} Σ_t g_{b,c,t} g_{b,c,t}ᵀ  ``[g_dim, g_dim]``,

    so that A ⊗ G equals the block C_ii = scale · Σ_{b,c} Σ_{t,t'} ā ā'ᵀ ⊗ g g'ᵀ (3.28)
    for a single sample and position.  (The split of the scale between A and G does not
    matter to anything computed from them here: eigenvectors, and the π-split (2.96),
    which is invariant to A -> sA, G -> G/s.)  For a weight tied in transposed form the
    term of the untransposed uses.  Used by the ``spectral`` coarse space when the first
    level exposes no eigendecomposition, and by the ``previous`` mode.
    """
    return kfac_factors(stats, "expand")[0]


# --------------------------------------------------------------------------- on a curvature
class _OnCurvature:
    """``dtype`` and ``device`` of an object built on ``self.curvature``: the curvature's."""

    @property
    def dtype(self) -> torch.dtype:
        return self.curvature.dtype

    @property
    def device(self) -> torch.device:
        return self.curvature.device


# --------------------------------------------------------------------------- context
@dataclass
class CoarseContext(_OnCurvature):
    """What a coarse space may use to build its basis, with cached intermediate vectors.

    Attributes:
        curvature: the exact curvature operator F (a :class:`~curvlib.linalg.LinearOperator`
            with ``layers``).
        damping: λ of F• = F + λI (4.2).
        first_level: the first-level approximate inverse M ≈ F•⁻¹ (KFAC: F•KFAC⁻¹), a
            :class:`~curvlib.linalg.LinearOperator`, or ``None`` for a zero first level.
        partition: the groups of the coarse basis.
        u: the vector being preconditioned ``[p]`` (``None`` for spaces that do not use it).
        layer_eigen: ``i -> (v_A [a_dim], v_G [g_dim])``, the eigenvectors of the smallest
            eigenvalues of layer i's damped KFAC factors (the ``spectral`` space).
    """

    curvature: Any
    damping: float
    first_level: Any
    partition: Partition
    u: torch.Tensor | None = None
    layer_eigen: Any = None
    _cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def p(self) -> int:
        return self.partition.p

    @property
    def layer_slices(self) -> list[slice]:
        return [L.slice for L in self.curvature.layers]

    # -- products ----------------------------------------------------------------------
    def apply_first(self, X: torch.Tensor) -> torch.Tensor:
        """M·X for ``X [p, k]`` (zero when there is no first level)."""
        if self.first_level is None:
            return torch.zeros_like(X)
        return self.first_level.matmat(X)

    def apply_damped(self, X: torch.Tensor) -> torch.Tensor:
        """F•X = F X + λX for ``X [p, k]`` (4.55): λ added once."""
        return self.curvature.matmat(X) + self.damping * X

    def block_apply_first(self, pieces: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """R_g M R_gᵀ v_g for each group: ``pieces[g] [p_g, k_g]`` -> ``[p_g, k_g]``.

        For KFAC (block-diagonal M whose blocks lie inside the groups) this is the block
        inverse [F•KFAC]_gg⁻¹ v_g of (4.31), computed with one product of M; otherwise M is
        applied to each zero-padded piece (one product of Σ_g k_g columns).
        """
        if self.first_level is None:
            return [torch.zeros_like(v) for v in pieces]
        part = self.partition
        if isinstance(self.first_level, BlockDiagonalOperator) and part.nests(list(self.first_level.slices)):
            # no block of M couples two groups: one product of the stacked pieces
            K = max(v.shape[1] for v in pieces)
            X = pieces[0].new_zeros(self.p, K)
            for g, v in enumerate(pieces):
                part.put(X, g, torch.cat([v, v.new_zeros(v.shape[0], K - v.shape[1])], 1))
            Y = self.apply_first(X)
            return [part.take(Y, g)[:, : v.shape[1]] for g, v in enumerate(pieces)]
        # general M: column block g of X is R_gᵀ v_g, zero elsewhere
        offsets = [0]
        for v in pieces:
            offsets.append(offsets[-1] + v.shape[1])
        X = pieces[0].new_zeros(self.p, offsets[-1])
        for g, v in enumerate(pieces):
            Z = v.new_zeros(self.p, v.shape[1])
            part.put(Z, g, v)
            X[:, offsets[g] : offsets[g + 1]] = Z
        Y = self.apply_first(X)
        return [part.take(Y[:, offsets[g] : offsets[g + 1]], g) for g in range(len(pieces))]

    # -- cached vectors of u -----------------------------------------------------------
    def _need_u(self, what: str) -> torch.Tensor:
        if self.u is None:
            raise ConfigError(f"CoarseContext.{what}: this coarse space needs the vector u being preconditioned")
        return self.u

    @property
    def zeta_first(self) -> torch.Tensor:
        """ζ_KFAC = M u ``[p]`` (4.6)."""
        if "zeta_first" not in self._cache:
            u = self._need_u("zeta_first")
            self._cache["zeta_first"] = self.apply_first(u.unsqueeze(1)).squeeze(1)
        return self._cache["zeta_first"]

    @property
    def residual(self) -> torch.Tensor:
        """r_KFAC = u − F•ζ_KFAC ``[p]`` (4.15), F• = F + λI applied once."""
        if "residual" not in self._cache:
            u = self._need_u("residual")
            z = self.zeta_first
            self._cache["residual"] = u - self.apply_damped(z.unsqueeze(1)).squeeze(1)
        return self._cache["residual"]

    def group_layers(self, what: str) -> list[int]:
        """The layer index of each group; raises unless every group is exactly one layer."""
        idx = self.partition.is_layer_partition(self.layer_slices)
        if idx is None:
            raise ConfigError(f"{what} is defined per layer block: it needs the layer partition "
                              "(every group exactly one layer's slice)")
        return idx


# --------------------------------------------------------------------------- interface
class CoarseSpace(abc.ABC):
    """A rule that builds the coarse basis R₀ᵀ (4.23) from a :class:`CoarseContext`.

    Subclasses set :attr:`kind` and :attr:`Options` (a strict pydantic model) and
    implement :meth:`basis`.  Registered through ``curvlib_register_coarse_spaces``;
    the registry calls ``factory(options_model_instance)``.
    """

    kind: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    #: What every block of the first level must offer, e.g.
    #: ``BlockRequirement((FactorEigenbasis, DampedKroneckerFactors), reason="...")``; ``None``:
    #: nothing (or not declared).  A kind whose need depends on its options overrides
    #: :meth:`first_level_requirement`.
    first_level_needs: ClassVar[BlockRequirement | None] = None
    #: Who made this coarse space (kind, plugin, distribution), named in every message about its
    #: bases; set by whoever builds it from a registry (:func:`curvlib.two_level`).  ``None``:
    #: not made through a registry.
    origin: KindOrigin | None = None

    def __init__(self, options: BaseModel | None = None, **kwargs: Any) -> None:
        if options is None:
            options = validate_options(self.Options, kwargs, where=f"coarse space {self.kind!r}")
        elif kwargs:
            raise ConfigError(f"coarse space {self.kind!r}: pass either an options model or keyword options, not both")
        elif not isinstance(options, self.Options):
            raise ConfigError(f"coarse space {self.kind!r}: expected {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    @property
    def depends_on_input(self) -> bool:
        """Whether the basis changes with the vector u (then each right-hand side gets its own)."""
        return False

    @abc.abstractmethod
    def basis(self, ctx: CoarseContext) -> CoarseBasis:
        """The coarse basis R₀ᵀ over ``ctx.partition``."""

    # -- declarations and checks ---------------------------------------------------------
    def first_level_requirement(self) -> BlockRequirement | None:
        """What every first-level block must offer: :attr:`first_level_needs` by default;
        ``None``: nothing (or not declared).  A kind whose need depends on its options
        overrides it (as ``spectral`` does for ``source="first_level"``)."""
        return type(self).first_level_needs

    def _origin(self) -> KindOrigin:
        return self.origin or KindOrigin("coarse_spaces", self.kind)

    def checked_basis(self, ctx: CoarseContext) -> CoarseBasis:
        """:meth:`basis`, checked (module docstring): what the two-level preconditioner calls.

        Raises:
            PluginOutputError: not a :class:`CoarseBasis` over ``ctx.partition`` in the
                curvature's dtype and on its device.
        """
        basis = self.basis(ctx)
        part = ctx.partition
        if not isinstance(basis, CoarseBasis):
            what = "None" if basis is None else f"a {type(basis).__name__}"
            raise self._origin().error(None, f"basis() returned {what}; expected a curvlib.coarse.CoarseBasis")
        if basis.partition is not part and not _same_groups(basis.partition, part):
            got, want = basis.partition, part
            where = next((g for g in range(min(len(got), len(want))) if got.sizes[g] != want.sizes[g]), None)
            detail = "" if where is None else (
                f"; group {where} ({want.names[where]!r}) has {got.sizes[where]} rows, expected {want.sizes[where]}")
            raise self._origin().error(
                None if where is None else want.names[where],
                f"basis() returned a basis over {len(got)} groups of p = {got.p} rows; expected the context's "
                f"partition, {len(want)} groups of p = {want.p} (sizes {want.sizes[:8]}{'…' if len(want) > 8 else ''})"
                f"{detail}",
            )
        if basis.dtype != ctx.dtype or basis.device != torch.device(ctx.device):
            raise self._origin().error(
                None, f"basis() returned columns in {basis.dtype} on {basis.device}; expected {ctx.dtype} on "
                      f"{ctx.device}, the curvature's")
        return basis

    def nonfinite_message(self, basis: CoarseBasis, finite: torch.Tensor) -> str:
        """The warning when columns of ``basis`` are not finite (``finite [N]``, bool): the kind,
        its distribution, and the groups (layers) they belong to."""
        bad = (~finite).nonzero().flatten().tolist()
        groups = sorted({g for k in bad for g in range(len(basis.columns)) if basis.offsets[g] <= k < basis.offsets[g + 1]})
        names = [basis.partition.names[g] for g in groups]
        return (f"two-level: the {self._origin()} returned {len(bad)} coarse column(s) with non-finite entries "
                f"(groups {names}); expected finite columns — they were dropped")

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({opts})"


def _same_groups(a: Partition, b: Partition) -> bool:
    """Whether two partitions have the same groups, in the same order."""
    if a.p != b.p or a.sizes != b.sizes:
        return False
    for x, y in zip(a.groups, b.groups):
        if isinstance(x, slice) != isinstance(y, slice):
            return False
        if isinstance(x, slice) and (x.start, x.stop) != (y.start, y.stop):
            return False
        if not isinstance(x, slice) and not torch.equal(x, y):
            return False
    return True
