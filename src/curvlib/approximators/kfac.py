"""``kfac``: the Kronecker-factored approximation F_ii ≈ A ⊗ G (3.19), KFC for convolutions (3.29)–(3.30).

With the scaling of :class:`~curvlib.curvatures.statistics.LayerStatistics`
(F_ii = scale·Σ_b Σ_c Σ_{t,t'} ā_{b,t} ā_{b,t'}ᵀ ⊗ g_{b,c,t} g_{b,c,t'}ᵀ):

* Linear (3.19):  A = (1/m) Σ_b ā_b ā_bᵀ,   G = scale · Σ_{b,c} g_{b,c} g_{b,c}ᵀ,
  so A ⊗ G = F_ii exactly for one sample with one column (m = c = 1);
* Conv2d, KFC (3.29)–(3.30):  A = (1/m) Σ_b Σ_t ā_{b,t} ā_{b,t}ᵀ,
  G = (scale/T) · Σ_{b,c,t} g_{b,c,t} g_{b,c,t}ᵀ — under the IAD, SH and SUD hypotheses
  of §3.4.1 A ⊗ G estimates the same F_ii (no 1/T in F_ii: the 1/T of G cancels the T
  diagonal pairs (t, t) of A's sum);
* ConvTranspose2d, §5.2.3: the layer adapter presents the transposed convolution as the
  stride-1 convolution of Relationship 1 on the fractionally strided, padded input A',
  with the kernel rotation R moved onto the patches (ā_t = Π ā'_t, Π reversing both
  kernel axes inside each input channel and fixing the bias entry) and W = the
  channel-swapped weight, so that W' = W Π is the weight of the equivalent convolution.
  KFC on the adapter's statistics therefore gives A = Π Ā' Πᵀ and G = G' with Ā', G' the
  factors (5.37) of the equivalent convolution (the same positions T' = the output grid,
  since S' = S), and

      (A ⊗ G)⁻¹ vec(∇W) = vec(G'⁻¹ ∇W (Π Ā' Πᵀ)⁻¹) = vec(G'⁻¹ (∇W Π) Ā'⁻¹ Πᵀ),

  which is exactly the update (5.41): V(R(V⁻¹(·))) is X ↦ X Π and V(R⁻¹(V⁻¹(·))) is
  X ↦ X Πᵀ.  This is the thesis's construction itself, written in the original
  parameters (not an approximation of it); the adapter also honours dilation and
  output_padding, which Relationship 1 does not cover.

Any weight-shared layer (a Linear layer on tokens, a convolution of any dimension, a module
called several times): the ``weight_sharing`` option picks KFAC-expand (default; KFC above)
or KFAC-reduce (Eschenhagen et al. 2023), both defined in :mod:`curvlib.curvatures.factors`
and both equal to (3.19) for one position.  A weight tied in transposed form (an
embedding and an output layer) gives one term per orientation, so its fit is a Kronecker
sum of two PSD terms (A₁⊗G₁ + G₂⊗A₂).

EMA (§3.1.2): A and G are averaged with ρ = min(1 − 1/k, γ) (:func:`ema_rho`).
Cost per refresh: two GEMMs, O(m·T·(d_a² + c·d_g²)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curvlib.approximators.base import (
    ApproximatorOptions,
    BlockApproximator,
    BlockDeclaration,
    FitInfo,
    FromKFACFactors,
    LayerFit,
    ema_pairs,
    ema_rho,
)
from curvlib.curvatures.factors import kfac_factors
from curvlib.errors import ShapeError
from curvlib.linalg import KroneckerFactored, KroneckerSum

__all__ = ["KFACApproximator", "KFACOptions", "kfac_factors"]

Term = tuple[torch.Tensor, torch.Tensor]


class KFACOptions(ApproximatorOptions):
    """Options of ``kfac``: ``ema`` (γ of §3.1.2) and ``weight_sharing`` (``"expand"``/``"reduce"``)."""


class KFACApproximator(FromKFACFactors, BlockApproximator):
    """``kfac``: A ⊗ G with A = E[ā āᵀ], G = E[g gᵀ] (3.19); KFC (3.29)–(3.30) for convolutions."""

    options_model = KFACOptions
    kind = "kfac"
    #: one term A ⊗ G, or two for a weight tied in transposed form (one per orientation); A and G
    #: are Gram matrices E[ā āᵀ], E[g gᵀ] and averages of them, PSD by construction
    blocks = BlockDeclaration((KroneckerFactored,), terms=(1, 2), psd_factors=True)
    #: A and G are averages over samples: under torch.distributed one all-reduce of the
    #: weighted local factors gives the global batch's (before the checks and the EMA)
    distributed = True

    def _fit_terms(self, terms: list[Term], k: int, previous: LayerFit | None) -> LayerFit:
        rho = ema_rho(k, self.options.ema)
        if rho > 0:
            if len(previous.terms) != len(terms):
                raise ShapeError(
                    f"kfac: the previous fit has {len(previous.terms)} Kronecker terms, this batch {len(terms)} "
                    "(the layer's uses changed orientation); start a new fit with previous=None"
                )
            terms = ema_pairs(previous.terms, terms, rho)
        info = FitInfo(method=self.kind, refresh=k, rho=rho)
        return LayerFit(block=KroneckerSum(terms), info=info, state={"refresh": k})
