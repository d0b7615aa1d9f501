"""``tnt``: tensor normal training's mode covariances (Ren & Goldfarb, NeurIPS 2021) on a layer block.

TNT models the per-sample gradient D_n ``[d_g, d_a]`` of a weight (W̄ = [W, b] here, the
block's matrix) as a matrix-normal variable and approximates its covariance — the block
F_ii = scale·Σ_n vec(D_n) vec(D_n)ᵀ — by the Kronecker product of its two mode covariances,
normalised so that the trace is kept:

    C_g = scale·Σ_n D_n D_nᵀ ``[d_g, d_g]``,   C_a = scale·Σ_n D_nᵀ D_n ``[d_a, d_a]``,
    F̂_ii = C_a ⊗ C_g / t,   t = tr F_ii = tr C_a = tr C_g = scale·Σ_n ‖D_n‖²_F,

stored as the term (C_a/√t, C_g/√t), so tr F̂_ii = tr F_ii.  Unlike KFAC, the factors are
formed from the per-sample *gradients* (summed over a weight-shared layer's positions and
uses), not from activations and output gradients separately: the statistics the layer's
adapter captures are all it needs, for any adapter — Linear on any number of leading axes,
convolutions of any dimension, transposed convolutions, norms, embeddings, attention
projections, tied weights.

Relation to KFAC on a Linear layer without positions (one column per sample): D_n = g_n ā_nᵀ,
so C_g = scale·Σ_n ‖ā_n‖² g_n g_nᵀ and C_a = scale·Σ_n ‖g_n‖² ā_n ā_nᵀ — KFAC's two sums
reweighted by the other side's norms.  When every ‖ā_n‖ and every ‖g_n‖ is the same, TNT
equals KFAC's A ⊗ G exactly (tested); for one sample both equal F_ii.

Cost per refresh: on a Linear layer without positions, two weighted GEMMs (KFAC's cost,
O(m·(d_a² + c·d_g²))); otherwise D_n is formed for chunks of samples,
O(n·T·p_i + n·p_i·(d_a + d_g)).  EMA (§3.1.2): both factors are averaged with
ρ = min(1 − 1/k, γ), like KFAC's.  The block is one Kronecker term with PSD factors, so every
damping (heuristic π-split, tikhonov, Levenberg–Marquardt) and coarse space applies.

Architecture-free: with ``uncovered_parameters("per_sample")`` (config ``uncovered:
"per_sample"``) a parameter no adapter covers gets a ``parameter`` block,
W̄ = θ.reshape(d_0, −1) with the per-sample gradients as its statistics
(:mod:`curvlib.capture.adapters.parameter`), and C_g, C_a are the row and column
covariances of θ's per-sample gradients — every trainable parameter covered.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from curvlib.approximators.base import BlockApproximator, BlockDeclaration, FitInfo, LayerFit, ema_rho
from curvlib.config import StrictModel
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.linalg import KroneckerFactored, KroneckerSum, finite_screen

__all__ = ["TNTApproximator", "TNTOptions", "mode_covariances"]

_CHUNK = 1 << 24  # entries of the per-pair gradients formed at once on the general path


class TNTOptions(StrictModel):
    """Options of ``tnt``: ``ema`` (γ of §3.1.2; ``None``: each batch on its own)."""

    ema: float | None = Field(None, ge=0.0, le=1.0, description="EMA decay γ (ρ = min(1 − 1/k, γ)); None: no average")


def mode_covariances(stats: LayerStatistics) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C_a ``[d_a, d_a]``, C_g ``[d_g, d_g]``, t = tr F_ii) of the module docstring."""
    scale = float(stats.scale)
    if stats.rank_one_pairs:
        (use,) = stats.uses
        m, c, _, d_g = use.g.shape
        g = use.g.reshape(m, c, d_g)
        eye = torch.eye(stats.a_dim, dtype=stats.dtype, device=stats.device)
        a2 = use.a.quadratic(eye[None])[0, :, 0]  # ‖ā_b‖²  [m]
        g2 = (g * g).sum(-1)  # ‖g_bc‖²  [m, c]
        C_a = scale * use.a.gram(g2.sum(1)[None, :, None])[0]
        C_g = scale * torch.einsum("bci,b,bcj->ij", g, a2, g)
        t = scale * (a2[:, None] * g2).sum()
    else:
        C_a = torch.zeros(stats.a_dim, stats.a_dim, dtype=stats.dtype, device=stats.device)
        C_g = torch.zeros(stats.g_dim, stats.g_dim, dtype=stats.dtype, device=stats.device)
        for D in stats.pair_gradient_chunks(_CHUNK):  # [k, d_g, d_a]
            C_a += torch.einsum("kga,kgb->ab", D, D)
            C_g += torch.einsum("kga,kha->gh", D, D)
        C_a, C_g = scale * C_a, scale * C_g
        t = torch.diagonal(C_a).sum()
    return 0.5 * (C_a + C_a.T), 0.5 * (C_g + C_g.T), t


class TNTApproximator(BlockApproximator):
    """``tnt``: C_a ⊗ C_g / tr F_ii, the trace-normalised mode covariances of the per-sample gradients."""

    options_model = TNTOptions
    kind = "tnt"
    #: one term of Gram matrices (PSD by construction)
    blocks = BlockDeclaration((KroneckerFactored,), terms=(1, 1), psd_factors=True)

    def fit(self, stats: LayerStatistics, previous: LayerFit | None = None) -> LayerFit:
        """A one-term :class:`~curvlib.linalg.KroneckerSum` (C_a/√t, C_g/√t) (see :meth:`BlockApproximator.fit`)."""
        kept, k = self._begin_refresh(stats, previous)
        if kept is not None:
            return kept
        C_a, C_g, t = mode_covariances(stats)
        t = float(t)
        if not (math.isfinite(t) and bool(finite_screen([C_a, C_g]))):
            return self._fallback("non-finite mode covariances (finite statistics that overflowed)", previous)
        root = math.sqrt(t) if t > 0 else 1.0  # t = 0: all gradients vanish, F̂ = 0
        A, G = C_a / root, C_g / root
        rho = ema_rho(k, self.options.ema)
        if rho > 0:
            (A0, G0), = previous.terms
            A, G = torch.lerp(A, A0, rho), torch.lerp(G, G0, rho)
        return LayerFit(block=KroneckerSum([(A, G)]), info=FitInfo(method=self.kind, refresh=k, rho=rho),
                        state={"refresh": k})
