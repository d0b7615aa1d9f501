"""``singd``: structured inverse-free natural gradient (SINGD, Lin et al., ICML 2024) — the inverse
factors themselves, updated by a running, momentum Riemannian step at every refresh.

KFAC approximates F_ii ≈ A ⊗ G and inverts the damped factors.  SINGD never forms or inverts
them: it keeps two matrices K ``[d_a, d_a]``, C ``[d_g, d_g]`` (dense, diagonal or block-diagonal)
with K Kᵀ ≈ A⁻¹, C Cᵀ ≈ G⁻¹, and at every refresh (the KFAC factors A_t, G_t of the batch, one
term per orientation t of the layer's uses) takes one step of momentum gradient descent on
them, with S(·) the part of a matrix in the chosen structure:

    H_K = Σ_t c_t S(Kᵀ A_t K),     c_t = tr S(Cᵀ G_t C) / d_g          (1 with ``kfac_like``),
    m_K ← α₁ m_K + s·(H_K + λ·t_C·S(KᵀK) − I),   t_C = tr S(CᵀC) / d_g  (1 with ``kfac_like``),
    K ← K − β₁ K m_K,

and the same for C with the roles of (K, A, d_a) and (C, G, d_g) exchanged; s = ½, or ½(1 − α₁)
with ``normalize_lr_cov`` (which also divides β₁ by max(1, max |m|)).  K and C start at the
identity, m at zero; the step is the same for every structure, and a structured K, C stays in
its structure.  At a fixed point (m = 0, one orientation, ``kfac_like``)
K Kᵀ = (A + λI)⁻¹ and C Cᵀ = (G + λI)⁻¹ (tested): the running update tracks the damped KFAC
inverse, as Newton–Schulz does in one inversion (``inverse_free``), but carried across steps
and averaged by the momentum instead of an EMA of the factors.

The block (:class:`SINGDBlock`) represents F̂ = (K Kᵀ)⁻¹ ⊗ (C Cᵀ)⁻¹ and carries its inverse
factors (:class:`~curvlib.linalg.InverseFactored`): the ``inverse_factors`` damping applies
(K Kᵀ) ⊗ (C Cᵀ) with two GEMMs, nothing decomposed or inverted — the kind's registered
default damping.  Its products with F̂ and ``to_dense`` (errors, spectra) do solve with K Kᵀ and
C Cᵀ, O(d³), for analysis only.  K, C and the momenta are the fit's state: checkpoints resume
the running update exactly.  The factors A_t, G_t are averages over samples, so under
``torch.distributed`` one all-reduce gives the global batch's, as for KFAC.

Cost per refresh: KFAC's factor GEMMs, then about eight d³ products per side (dense), O(d²)
(diagonal) or O(d·b²) (block-diagonal) — no decomposition.  Options: ``lr_cov`` β₁ (1e-2),
``alpha1`` α₁ (0.5), ``damping`` λ (1e-3), ``block_size`` (``None`` dense, 1 diagonal, b
block-diagonal), ``kfac_like``, ``normalize_lr_cov``, ``weight_sharing`` — SINGD's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from curvlib.approximators.base import BlockApproximator, BlockDeclaration, FitInfo, FromKFACFactors, LayerFit
from curvlib.config import StrictModel
from curvlib.errors import ShapeError
from curvlib.linalg import InverseFactored, finite_screen, structured_part

__all__ = ["SINGDApproximator", "SINGDBlock", "SINGDOptions", "singd_step"]


class SINGDOptions(StrictModel):
    """Options of ``singd`` (module docstring; the defaults are SINGD's)."""

    lr_cov: float = Field(1e-2, gt=0.0, allow_inf_nan=False, description="β₁, the step size of K and C")
    alpha1: float = Field(0.5, ge=0.0, lt=1.0, description="α₁, the momentum of the steps on K and C")
    damping: float = Field(1e-3, gt=0.0, allow_inf_nan=False, description="λ of the update")
    block_size: int | None = Field(None, ge=1, description="structure of K and C: None dense, 1 diagonal, b block-diagonal")
    kfac_like: bool = Field(False, description="the update whose fixed point is KFAC's damped inverse (IKFAC)")
    normalize_lr_cov: bool = Field(False, description="β₁ / max(1, max |m|) and s = (1 − α₁)/2")
    weight_sharing: Literal["expand", "reduce"] = Field(
        "expand", description="positions as extra samples ('expand') or summed first ('reduce')")


def _average_trace(M: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(M).mean()


def singd_step(K: torch.Tensor, C: torch.Tensor, m_K: torch.Tensor, m_C: torch.Tensor,
               terms: Sequence[tuple[torch.Tensor, torch.Tensor]], opts: SINGDOptions
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One update of (K, C, m_K, m_C) from the factor terms ``[(A_t, G_t), …]`` (module docstring)."""
    S = lambda M: structured_part(M, opts.block_size)  # noqa: E731
    eye_K = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
    eye_C = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    KtK, CtC = S(K.T @ K), S(C.T @ C)
    H_Ks = [S(K.T @ A @ K) for A, _ in terms]
    H_Cs = [S(C.T @ G @ C) for _, G in terms]
    if opts.kfac_like:
        H_K, H_C, t_C, t_K = sum(H_Ks), sum(H_Cs), 1.0, 1.0
    else:
        H_K = sum(_average_trace(Hc) * Hk for Hk, Hc in zip(H_Ks, H_Cs))
        H_C = sum(_average_trace(Hk) * Hc for Hk, Hc in zip(H_Ks, H_Cs))
        t_C, t_K = _average_trace(CtC), _average_trace(KtK)
    s = 0.5 * ((1.0 - opts.alpha1) if opts.normalize_lr_cov else 1.0)
    m_K = opts.alpha1 * m_K + s * (H_K + opts.damping * t_C * KtK - eye_K)
    m_C = opts.alpha1 * m_C + s * (H_C + opts.damping * t_K * CtC - eye_C)
    beta_K = beta_C = opts.lr_cov
    if opts.normalize_lr_cov:
        beta_K = opts.lr_cov / max(1.0, float(m_K.abs().max()))
        beta_C = opts.lr_cov / max(1.0, float(m_C.abs().max()))
    return K - beta_K * (K @ m_K), C - beta_C * (C @ m_C), m_K, m_C


class SINGDBlock(InverseFactored):
    """F̂ = (K Kᵀ)⁻¹ ⊗ (C Cᵀ)⁻¹ with its inverse factors (K Kᵀ, C Cᵀ) and the momenta of the update.

    Args:
        K ``[d_a, d_a]``, C ``[d_g, d_g]``: the inverse factors' roots.
        m_K, m_C: the momenta (same shapes).
    """

    def __init__(self, K: torch.Tensor, C: torch.Tensor, m_K: torch.Tensor, m_C: torch.Tensor) -> None:
        shapes = [tuple(t.shape) for t in (K, C, m_K, m_C)]
        dA, dG = K.shape[0], C.shape[0]
        if shapes != [(dA, dA), (dG, dG), (dA, dA), (dG, dG)]:
            raise ShapeError(f"SINGDBlock: expected K, C, m_K, m_C of shapes [d_a, d_a], [d_g, d_g], [d_a, d_a], "
                             f"[d_g, d_g]; got {[list(s) for s in shapes]}")
        self.K, self.C, self.m_K, self.m_C = K, C, m_K, m_C

    @property
    def a_dim(self) -> int:
        return self.K.shape[0]

    @property
    def b_dim(self) -> int:
        return self.C.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.K.dtype

    @property
    def device(self) -> torch.device:
        return self.K.device

    @property
    def inverse_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K Kᵀ, C Cᵀ): F̂⁻¹ = K Kᵀ ⊗ C Cᵀ."""
        return self.K @ self.K.T, self.C @ self.C.T

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        # F̂ vec(X) = vec((C Cᵀ)⁻¹ X (K Kᵀ)⁻¹): solves, for analysis (the preconditioner never needs F̂)
        PA, PG = self.inverse_factors
        Y = torch.linalg.solve(PG, X)
        return torch.linalg.solve(PA, Y.transpose(-1, -2)).transpose(-1, -2)

    def to_dense(self) -> torch.Tensor:
        PA, PG = self.inverse_factors
        return torch.kron(torch.linalg.inv(PA), torch.linalg.inv(PG))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> SINGDBlock:
        return SINGDBlock(*(t.to(dtype=dtype, device=device) for t in (self.K, self.C, self.m_K, self.m_C)))

    def state_dict(self) -> dict[str, Any]:
        return {"K": self.K, "C": self.C, "m_K": self.m_K, "m_C": self.m_C}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> SINGDBlock:
        return cls(data["K"], data["C"], data["m_K"], data["m_C"])

    def __repr__(self) -> str:
        return f"SINGDBlock(d_a={self.a_dim}, d_g={self.b_dim}, dtype={self.dtype})"


class SINGDApproximator(FromKFACFactors, BlockApproximator):
    """``singd``: K, C with K Kᵀ ⊗ C Cᵀ ≈ F_ii⁻¹, one running SINGD step per refresh (module docstring)."""

    options_model = SINGDOptions
    kind = "singd"
    blocks = BlockDeclaration((InverseFactored,))
    #: the KFAC factors are averages over samples: one all-reduce gives the global batch's
    distributed = True

    def _fit_terms(self, terms: list[tuple[torch.Tensor, torch.Tensor]], k: int, previous: LayerFit | None) -> LayerFit:
        A0, G0 = terms[0]
        if previous is None:
            eye_a = torch.eye(A0.shape[0], dtype=A0.dtype, device=A0.device)
            eye_g = torch.eye(G0.shape[0], dtype=G0.dtype, device=G0.device)
            state = (eye_a, eye_g, torch.zeros_like(eye_a), torch.zeros_like(eye_g))
        else:
            b = previous.block
            state = (b.K, b.C, b.m_K, b.m_C)
        K, C, m_K, m_C = singd_step(*state, terms, self.options)
        if not bool(finite_screen([K, C, m_K, m_C])):
            return self._fallback("the SINGD step gave non-finite factors (lower lr_cov)", previous)
        info = FitInfo(method=self.kind, refresh=k, iterations=1)
        return LayerFit(block=SINGDBlock(K, C, m_K, m_C), info=info, state={"refresh": k})

