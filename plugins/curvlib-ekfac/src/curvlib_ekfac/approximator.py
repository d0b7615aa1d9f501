"""``ekfac``: the eigenvalue-corrected Kronecker factorization (George et al., 2018).

For one layer block (curvlib's :class:`~curvlib.curvatures.statistics.LayerStatistics`)

    F_ii = scale · Σ_n vec(D_n) vec(D_n)ᵀ,      D_n = Σ_t g_{n,t} ā_{b,t}ᵀ ``[d_g, d_a]``

(n runs over the m·c (sample b, column c) pairs, t over the positions of the layer — one
for a Linear layer on ``[m, d_in]``, the output grid of a convolution, the tokens of a
Linear layer on a sequence; summed over every use of a weight used several times — so
D_n is the per-pair gradient of (3.27) (``stats.pair_gradients()``), summed over
positions *before* it is squared), EKFAC keeps KFAC's eigenbasis and re-fits its diagonal:

1. the KFAC/KFC factors A = (1/m) Σ_{b,t} ā āᵀ and G = (scale/T) Σ_{b,c,t} g gᵀ
   ((3.19), (3.29); :func:`curvlib.approximators.kfac_factors` in the ``weight_sharing``
   setting, the leading term for a weight tied in transposed form), and their
   eigenvectors Q_A, Q_G;
2. the second moments in that basis,

       S_ij = scale · Σ_n ((Q_Gᵀ D_n Q_A)_ij)²  = (diag(Uᵀ F_ii U))_{i + d_g·j},   U = Q_A ⊗ Q_G,

   so that F_EKFAC = U diag(vec(S)) Uᵀ (:class:`~curvlib_ekfac.block.EKFACBlock`).

Among all matrices diagonal in the basis U, diag(Uᵀ F U) is the one nearest to F in the
Frobenius norm (the off-diagonal part of Uᵀ F U is what is left); KFAC, A ⊗ G =
U diag(e_A ⊗ e_G) Uᵀ, is one of them, hence ‖F − F_EKFAC‖_F ≤ ‖F − A ⊗ G‖_F for every
block — Linear or conv.

Cost per refresh: the two factor GEMMs of KFAC, two eigendecompositions O(d_a³ + d_g³),
and the rotations ā Q_A, g Q_G.  For one use without positions S is then one GEMM,
S = scale · (Σ_c (g Q_G)²)ᵀ (ā Q_A)², O(m·c·d_g·d_a); any other block forms the rotated
per-pair gradients Q_Gᵀ D_n Q_A in chunks of at most ``max_chunk_entries`` entries,
O(m·c·(T·d_g·d_a + d_g·d_a·(d_g + d_a))) in all.

Exponential moving average (§3.1.2 of the thesis, ρ = min(1 − 1/k, γ) at the k-th refresh,
:func:`curvlib.approximators.ema_rho`).  The factors are averaged as KFAC averages them,
A = ρ A_prev + (1 − ρ) A_batch (likewise G), and the eigenbasis U is that of the averaged
factors.  The scalings are those of the averaged *matrix* in the new basis,

    S = diag(Uᵀ (ρ F_EKFAC,prev + (1 − ρ) F_batch) U)
      = ρ P_G S_prev P_Aᵀ + (1 − ρ) S_batch,    P_A = (Q_Aᵀ Q_A,prev)^{∘2}, P_G = (Q_Gᵀ Q_G,prev)^{∘2},

(squares entrywise): the previous fit is projected onto the new basis instead of averaging
numbers that belong to different bases (each rotation of the basis would otherwise mix
unrelated directions).  When the basis does not move, P_A = P_G = I and this is the plain
average of the scalings.

Eigendecompositions run on A + δ_A I and G + δ_G I (δ = the factor's mean diagonal; the
eigenvectors are those of A and G) through :func:`curvlib.linalg.eigh_safe`, which retries
in float64 with a :class:`~curvlib.errors.NumericalWarning` when LAPACK fails (DESIGN.md §10).
"""

from __future__ import annotations

import torch
from pydantic import Field

from curvlib.approximators import ApproximatorOptions, BlockApproximator, FitInfo, LayerFit, ema_rho, kfac_factors
from curvlib.approximators.base import BlockDeclaration
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import NumericalError
from curvlib.linalg import ShiftSolvable, eigh_safe

from curvlib_ekfac.block import EKFACBlock

__all__ = ["EKFACApproximator", "EKFACOptions", "ekfac_scalings", "factor_eigenvectors"]


class EKFACOptions(ApproximatorOptions):
    """Options of ``ekfac``.

    Attributes:
        ema: γ ∈ [0, 1] of the moving average (module docstring); ``None``: each batch alone.
        max_chunk_entries: the largest number of entries of the rotated per-pair gradients
            ``[chunk, c, d_g, d_a]`` formed at once for a conv layer (memory bound).
    """

    max_chunk_entries: int = Field(1 << 22, ge=1, description="entries of the per-pair gradient chunk of a conv layer")


def factor_eigenvectors(M: torch.Tensor) -> torch.Tensor:
    """Eigenvectors ``[d, d]`` of a symmetric PSD factor M ``[d, d]``, computed on M + δI
    (δ = tr M / d, the same eigenvectors) with :func:`~curvlib.linalg.eigh_safe`."""
    d = M.shape[0]
    delta = float(torch.diagonal(M).sum()) / d
    shifted = M + delta * torch.eye(d, dtype=M.dtype, device=M.device) if delta > 0 else M
    return eigh_safe(shifted)[1]


def ekfac_scalings(
    stats: LayerStatistics, evec_a: torch.Tensor, evec_g: torch.Tensor, *, max_chunk_entries: int = 1 << 22
) -> torch.Tensor:
    """S_ij = scale · Σ_n ((Q_Gᵀ D_n Q_A)_ij)², the diagonal of Uᵀ F_ii U in matrix form.

    Args:
        stats: the layer's statistics (any geometry, any number of uses).
        evec_a: Q_A ``[d_a, d_a]``.
        evec_g: Q_G ``[d_g, d_g]``.
        max_chunk_entries: memory bound of the conv path (module docstring).

    Returns:
        S ``[d_g, d_a]``, entrywise ≥ 0, in the statistics' dtype and device.
    """
    scale = float(stats.scale)
    (use,) = stats.uses if len(stats.uses) == 1 else (None,)
    if use is not None and use.T == 1 and not use.transposed:
        # one position: (Q_Gᵀ D_n Q_A)_ij = (g̃_n)_i (ã_b)_j, so S = scale · (Σ_c g̃²)ᵀ ã²
        a_rot = use.a.apply(evec_a.T.unsqueeze(0))[0, :, 0]  # rows ā_bᵀ Q_A: [m, d_a]
        g_rot = use.g[:, :, 0] @ evec_g  # rows g_nᵀ Q_G: [m, c, d_g]
        return scale * (g_rot.square().sum(1).T @ a_rot.square())
    m, c, d_g, d_a = stats.m, stats.c, stats.g_dim, stats.a_dim
    step = max(1, int(max_chunk_entries) // max(1, c * d_g * d_a))
    S = torch.zeros(d_g, d_a, dtype=stats.dtype, device=stats.device)
    for b0 in range(0, m, step):
        # rotated per-pair gradients Q_Gᵀ D_n Q_A of the samples b0 … b0+step−1
        R = evec_g.T @ stats.pair_gradients(b0, min(b0 + step, m)) @ evec_a
        S += R.square().sum(0)
    return scale * S


def _project(S_prev: torch.Tensor, prev: EKFACBlock, evec_a: torch.Tensor, evec_g: torch.Tensor) -> torch.Tensor:
    """diag(Uᵀ F_prev U) for F_prev = U_p diag(vec(S_prev)) U_pᵀ: P_G S_prev P_Aᵀ (module docstring)."""
    P_a = (evec_a.T @ prev.evec_a).square()  # [d_a, d_a]
    P_g = (evec_g.T @ prev.evec_g).square()  # [d_g, d_g]
    return P_g @ S_prev @ P_a.T


class EKFACApproximator(BlockApproximator):
    """``ekfac``: KFAC's eigenbasis with the diagonal re-fitted to F_ii (George et al., 2018).

    Returns a :class:`LayerFit` whose block is an :class:`~curvlib_ekfac.block.EKFACBlock`
    and whose state holds the refresh counter and the (averaged) factors ``"A"``
    ``[d_a, d_a]`` and ``"G"`` ``[d_g, d_g]`` the next refresh averages with.
    """

    options_model = EKFACOptions
    kind = "ekfac"
    #: every fit's block is an EKFACBlock: shift-solvable, not a Kronecker sum, so the π-split
    #: ``heuristic`` damping is refused when a preconditioner is built
    blocks = BlockDeclaration((ShiftSolvable,))

    def fit(self, stats: LayerStatistics, previous: LayerFit | None = None) -> LayerFit:
        """Fit F_EKFAC to the block of ``stats`` (see the module docstring and
        :meth:`curvlib.approximators.BlockApproximator.fit`)."""
        kept, k = self._begin_refresh(stats, previous)
        if kept is not None:
            return kept
        rho = ema_rho(k, self.options.ema)
        (A, G), *_ = kfac_factors(stats, self.options.weight_sharing)
        if rho > 0:
            A = rho * previous.state["A"] + (1.0 - rho) * A
            G = rho * previous.state["G"] + (1.0 - rho) * G
        try:
            evec_a, evec_g = factor_eigenvectors(A), factor_eigenvectors(G)
        except NumericalError as exc:
            return self._fallback(f"the factor eigendecomposition failed ({exc})", previous)
        S = ekfac_scalings(stats, evec_a, evec_g, max_chunk_entries=self.options.max_chunk_entries)
        if rho > 0:
            S = rho * _project(previous.block.scalings, previous.block, evec_a, evec_g) + (1.0 - rho) * S
        if not bool(torch.isfinite(S).all()):
            return self._fallback("the fitted scalings are not finite", previous)
        info = FitInfo(method=self.kind, refresh=k, rho=rho)
        return LayerFit(block=EKFACBlock(evec_a, evec_g, S), info=info, state={"refresh": k, "A": A, "G": G})
