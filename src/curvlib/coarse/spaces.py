"""The built-in coarse spaces of two-level KFAC (thesis §4.2.3).

Each builds the block-diagonal basis R₀ᵀ = diag(V_1, …, V_S) (4.23) over the context's
partition (the layers by default).  M denotes the first level (KFAC: F•KFAC⁻¹), F• = F + λI
the damped curvature (4.2), u the vector being preconditioned, ζ_KFAC = M u (4.6) and
r = u − F•ζ_KFAC the residual (4.15).

===========  ==============================================================  ==========
kind         V_g                                                             N_g
===========  ==============================================================  ==========
nicolaides   [1, …, 1]ᵀ                                   (4.25)–(4.26)      1
spectral     v_A,min ⊗ v_G,min = vec(v_G,min v_A,minᵀ)    (4.27)–(4.30)      1
krylov       [v, M_gg v, …, M_gg^{N_g−1} v], v = a seed   (4.31)–(4.32)      iterations + 1
residual     (M r)[g]                                      (4.34)            1
taylor       [w_1[g], …, w_q[g]], w_1 = M r, w_{j+1} = M F• w_j  (4.38)–(4.40)  q
===========  ==============================================================  ==========

M_gg = R_g M R_gᵀ is the first level's block on group g ([F•KFAC]_ii⁻¹ for the layer
partition).  The residual and Taylor spaces extract group g's rows of M r, so that
M r = R₀ᵀ[1, …, 1]ᵀ lies in the coarse space for any partition (the property (4.34) is
built for).  Columns are returned exactly as the formulas give them (not normalised);
the coarse solve of :mod:`curvlib.coarse.coarse_operator` equilibrates them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import AliasChoices, Field

from curvlib.coarse.base import CoarseContext, CoarseSpace, kfc_factors
from curvlib.coarse.basis import CoarseBasis
from curvlib.config import NoOptions, StrictModel
from curvlib.errors import ConfigError
from curvlib.linalg import (
    BlockDiagonalOperator,
    DampedKroneckerFactors,
    FactorEigenbasis,
    KroneckerEigen,
    eigh_safe,
    vec,
)
from curvlib.plugins.hookspecs import BlockRequirement

__all__ = [
    "KrylovCoarseSpace",
    "KrylovOptions",
    "NicolaidesCoarseSpace",
    "NicolaidesOptions",
    "ResidualCoarseSpace",
    "ResidualOptions",
    "SpectralCoarseSpace",
    "SpectralOptions",
    "TaylorCoarseSpace",
    "TaylorOptions",
    "first_level_eigen",
    "first_level_factors",
]


# --------------------------------------------------------------------------- options
class NicolaidesOptions(NoOptions):
    """The Nicolaides coarse space takes no options."""


class ResidualOptions(NoOptions):
    """The residual coarse space takes no options."""


class SpectralOptions(StrictModel):
    """Options of the ``spectral`` coarse space.

    Attributes:
        source: where the factor eigenvectors come from. ``"auto"``: the first level's
            eigendecompositions when it exposes them (``first_level.blocks[i].eigen``, a
            :class:`~curvlib.linalg.KroneckerEigen`), else the eigenvectors of its damped
            factors (``first_level.blocks[i].damped_factors``), else the KFAC factors of the
            current batch (:func:`~curvlib.coarse.base.kfc_factors` + ``eigh_safe``);
            ``"first_level"``: require the first level's; ``"statistics"``: always the batch's.
    """

    source: Literal["auto", "first_level", "statistics"] = "auto"


class KrylovOptions(StrictModel):
    """Options of the ``krylov`` coarse space (4.31)–(4.32).

    Attributes:
        seed: the starting vector v_g: ``"nicolaides"`` (v_g = 1, KRY-NICO) or
            ``"residual"`` (v_g = (M r)[g], the residual space's column, KRY-RESIDU).
        iterations: N_g − 1 ≥ 1 inverse-power iterates M_gg^k v_g (default 1: N_g = 2, (4.32)).
    """

    seed: Literal["nicolaides", "residual"] = "nicolaides"
    iterations: int = Field(1, ge=1, le=64)


class TaylorOptions(StrictModel):
    """Options of the ``taylor`` coarse space (4.35)–(4.40).

    Attributes:
        order: q ≥ 1, the number of vectors w_1 … w_q (also accepted as ``q``); q = 1 is
            the residual space.
    """

    order: int = Field(2, ge=1, le=64, validation_alias=AliasChoices("order", "q"))


# --------------------------------------------------------------------------- spaces
class NicolaidesCoarseSpace(CoarseSpace):
    """Nicolaides coarse space: V_g = [1, …, 1]ᵀ for every group, N = S (4.25)–(4.26)."""

    kind = "nicolaides"
    Options = NicolaidesOptions

    def basis(self, ctx: CoarseContext) -> CoarseBasis:
        cols = [torch.ones(n, 1, dtype=ctx.dtype, device=ctx.device) for n in ctx.partition.sizes]
        return CoarseBasis(ctx.partition, cols)


def _first_level_block(first_level: Any, i: int) -> Any:
    """Layer i's block of a block-diagonal first level, or ``None``."""
    if isinstance(first_level, BlockDiagonalOperator) and 0 <= i < len(first_level.blocks):
        return first_level.blocks[i]
    return None


def first_level_eigen(first_level: Any, i: int) -> KroneckerEigen | None:
    """The eigendecomposition the first level computed for layer i, when its block declares
    one (:class:`~curvlib.linalg.FactorEigenbasis`); ``None`` otherwise."""
    block = _first_level_block(first_level, i)
    return block.eigen if isinstance(block, FactorEigenbasis) else None


def first_level_factors(first_level: Any, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The damped Kronecker factors ``(A [d_a, d_a], G [d_g, d_g])`` the first level inverts
    for layer i, when its block declares them (:class:`~curvlib.linalg.DampedKroneckerFactors`,
    e.g. the π-split inverse of the ``heuristic`` damping); ``None`` otherwise."""
    block = _first_level_block(first_level, i)
    return block.damped_factors if isinstance(block, DampedKroneckerFactors) else None


def _factor_eigvecs(first_level: Any, i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Smallest-eigenvalue eigenvectors of the first level's damped factors of layer i
    (decomposed with ``eigh_safe``), or ``None`` without factors.

    Only for first levels whose blocks declare damped factors but no eigenbasis: the
    built-in dampings declare an eigenbasis, so nothing is decomposed twice for them.
    """
    factors = first_level_factors(first_level, i)
    if factors is None:
        return None
    _, Q_a = eigh_safe(factors[0])
    _, Q_g = eigh_safe(factors[1])
    return Q_a[:, 0], Q_g[:, 0]


class SpectralCoarseSpace(CoarseSpace):
    """Spectral coarse space: V_i = the eigenvector of the smallest eigenvalue of the damped
    KFAC block [F•KFAC]_ii (4.27), N = ℓ.

    For (Ā + π√λI) ⊗ (G + π⁻¹√λI) (4.28)–(4.29), and equally for Ā ⊗ G + λI, that
    eigenvector is V_i = v_Ā,min ⊗ v_G,min (4.30), which in the column-major vec convention
    is vec(v_G,min v_Ā,minᵀ) — the vec of a rank-one ``[g_dim, a_dim]`` matrix (a
    mis-ordered reshape would not be one; DESIGN.md §10).  The damping shifts eigenvalues
    but not eigenvectors or their order, so the undamped factors' decompositions serve.
    Needs the layer partition.

    Where the eigenvectors come from (option ``source``): the first level's
    ``blocks[i].eigen`` (a :class:`~curvlib.linalg.KroneckerEigen`, reused as is); else its
    ``blocks[i].damped_factors``, decomposed on each basis construction; else the batch's KFAC factors.  The
    basis's ``meta["eigen_source"]`` says which, per layer.

    On data with always-zero inputs (MNIST's border pixels) or dead ReLUs, the smallest
    eigenvalue of Ā or G is 0 and V_i lies in the null space of F_ii and of the gradient:
    the correction is then (numerically) zero.
    """

    kind = "spectral"
    Options = SpectralOptions

    def first_level_requirement(self) -> BlockRequirement | None:
        """With ``source="first_level"``: an eigenbasis or the damped factors of every first-level
        block; otherwise nothing (``"auto"`` falls back to the batch's KFAC factors)."""
        if self.options.source != "first_level":
            return None
        return BlockRequirement(
            (FactorEigenbasis, DampedKroneckerFactors),
            reason="spectral (source='first_level') takes v_A,min ⊗ v_G,min (4.30) from the first level's "
                   "eigenbasis or damped factors",
        )

    def _eigenvectors(self, ctx: CoarseContext, i: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        source = self.options.source
        if ctx.layer_eigen is not None and source != "statistics":
            v_a, v_g = ctx.layer_eigen(i)
            return v_a, v_g, "given"
        if source != "statistics" and ctx.first_level is not None:
            eig = first_level_eigen(ctx.first_level, i)
            if eig is not None:
                ia, ig = int(torch.argmin(eig.eval_a)), int(torch.argmin(eig.eval_b))
                return eig.evec_a[:, ia], eig.evec_b[:, ig], "first_level"
            cached = _factor_eigvecs(ctx.first_level, i)
            if cached is not None:
                return cached[0], cached[1], "first_level_factors"
        if source == "first_level":
            raise ConfigError(
                "spectral coarse space (source='first_level'): the first level exposes no eigendecomposition "
                "for layer {i} (expected first_level.blocks[i].eigen, a KroneckerEigen)".format(i=i)
            )
        A, G = kfc_factors(ctx.curvature.statistics(i))
        e_a, Q_a = eigh_safe(A)
        e_g, Q_g = eigh_safe(G)
        return Q_a[:, 0], Q_g[:, 0], "statistics"

    def basis(self, ctx: CoarseContext) -> CoarseBasis:
        layers = ctx.group_layers("the spectral coarse space")
        cols, sources = [], []
        for i in layers:
            v_a, v_g, src = self._eigenvectors(ctx, i)
            v_a = v_a.to(dtype=ctx.dtype, device=ctx.device)
            v_g = v_g.to(dtype=ctx.dtype, device=ctx.device)
            cols.append(vec(torch.outer(v_g, v_a)).unsqueeze(1))  # (4.30): v_A ⊗ v_G
            sources.append(src)
        return CoarseBasis(ctx.partition, cols, meta={"eigen_source": sources})


class ResidualCoarseSpace(CoarseSpace):
    """Residual coarse space: V_g = (M r)[g], r = u − F•ζ_KFAC (4.34), N = S.

    M r ∈ span R₀ᵀ (take β = 1), so the two-level step contains ζ_KFAC + M r, one step
    of the iterative refinement of F•ζ = u preconditioned by M.
    """

    kind = "residual"
    Options = ResidualOptions

    @property
    def depends_on_input(self) -> bool:
        return True

    def basis(self, ctx: CoarseContext) -> CoarseBasis:
        w = ctx.apply_first(ctx.residual.unsqueeze(1))  # M r [p, 1]
        cols = [ctx.partition.take(w, g) for g in range(len(ctx.partition))]
        return CoarseBasis(ctx.partition, cols)


class KrylovCoarseSpace(CoarseSpace):
    """Krylov coarse space: V_g = [v_g, M_gg v_g, …, M_gg^{N_g−1} v_g] (4.31), inverse-power
    iterates of the first level's block on group g from a Nicolaides or residual seed."""

    kind = "krylov"
    Options = KrylovOptions

    @property
    def depends_on_input(self) -> bool:
        return self.options.seed == "residual"

    def basis(self, ctx: CoarseContext) -> CoarseBasis:
        if ctx.first_level is None:
            raise ConfigError("the krylov coarse space needs a first level (its inverse-power iterates use M)")
        part = ctx.partition
        if self.options.seed == "nicolaides":
            seeds = [torch.ones(n, 1, dtype=ctx.dtype, device=ctx.device) for n in part.sizes]
        else:
            w = ctx.apply_first(ctx.residual.unsqueeze(1))
            seeds = [part.take(w, g) for g in range(len(part))]
        iterates = [seeds]
        for _ in range(self.options.iterations):
            iterates.append(ctx.block_apply_first(iterates[-1]))
        cols = [torch.cat([it[g] for it in iterates], 1) for g in range(len(part))]
        return CoarseBasis(part, cols)


class TaylorCoarseSpace(CoarseSpace):
    """Taylor coarse space of order q: V_g = [w_1[g], …, w_q[g]] with w_1 = M r and
    w_{j+1} = M F• w_j (4.38)–(4.40), N = qS.  q = 1 is the residual space.

    The spaces are nested in q (each V_g gains a column), so the error 𝔈(β*) of (4.41)
    never increases with q.
    """

    kind = "taylor"
    Options = TaylorOptions

    @property
    def depends_on_input(self) -> bool:
        return True

    def basis(self, ctx: CoarseContext) -> CoarseBasis:
        w = ctx.apply_first(ctx.residual.unsqueeze(1))  # w_1 = M r [p, 1]
        ws = [w]
        for _ in range(self.options.order - 1):
            w = ctx.apply_first(ctx.apply_damped(w))  # w_{j+1} = M F• w_j (4.40)
            ws.append(w)
        W = torch.cat(ws, 1)  # [p, q]
        cols = [ctx.partition.take(W, g) for g in range(len(ctx.partition))]
        return CoarseBasis(ctx.partition, cols)
