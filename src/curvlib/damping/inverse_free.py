"""``inverse_free``: the π-split inverse built by matrix products only, with structured factors.

The factors of the π-split (2.95)–(2.96), A_d = A + π√λI and G_d = G + π⁻¹√λI, are not
decomposed or inverted.  Their inverse roots K_A ≈ A_d^{-1/2}, K_G ≈ G_d^{-1/2} are reached by
the multiplicative update of the inverse factor that structured inverse-free natural-gradient
methods (SINGD, Lin et al. 2024) are built on, K ← K (I − β/2 (Kᵀ A_d K − I)), here with
β = 1 — the Newton–Schulz iteration for the inverse square root — in its coupled form, which
is stable in floating point where the plain one is not (it diverged on a factor of condition
number 10⁴ in float64):

    Y_0 = A_d / c,  Z_0 = I,  c = tr A_d;    T = (3I − Z_t Y_t) / 2,  Y_{t+1} = Y_t T,  Z_{t+1} = T Z_t,

so that Z_t → (A_d / c)^{-1/2} and K = Z / √c.  Four matrix products per step; quadratic
convergence once ‖Z Y − I‖ < 1 (the start has the eigenvalues of A_d / c in (0, 1]).  The
preconditioner is

    P = (K_A K_A) ⊗ (K_G K_G),    applied as vec(K_G² X K_A²) — two GEMMs.

Structures (the ``block_size`` option): ``None`` — dense factors, P → the heuristic damping's
inverse [(A_d) ⊗ (G_d)]⁻¹ (tested); ``1`` — diagonal factors, P → diag(A_d)⁻¹ ⊗ diag(G_d)⁻¹;
``b`` — block-diagonal factors with blocks of b rows, P → the inverse of the block-diagonal
parts of A_d and G_d.  A structured K stays in its structure because the update only sees
the structured part of A_d.

The iteration runs from the same start at every inversion and stops after ``max_iters``
steps or when ‖Z Y − I‖_F / √d ≤ ``tol`` for both factors, so an inversion depends only
on the block (checkpoints re-invert exactly).  SINGD itself carries K across steps with
momentum and a small β; carrying K across inversions would need it in the checkpoint and is
not done here.  Reported: ``iterations`` (the steps of the slower factor), ``converged``,
``relative_residual`` (the larger ‖Z Y − I‖_F / √d).  A run that ends with a residual
of 1 or more (it diverged: a non-PSD factor) raises :class:`~curvlib.errors.NotPSDError`,
and the previous inverse is kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from curvlib.config import StrictModel
from curvlib.damping.base import BlockInverse, BlockRequirement, Damping, InverseInfo
from curvlib.errors import ConfigError, NotPSDError
from curvlib.linalg import InverseFactored, KroneckerFactored, pi_split, structured_part

__all__ = ["InverseFreeDamping", "InverseFreeInverse", "InverseFreeOptions", "inverse_root"]


class InverseFreeOptions(StrictModel):
    """Options of ``inverse_free``.

    Attributes:
        value: λ > 0 of the π-split (2.95)–(2.96), as in ``heuristic``.
        block_size: ``None`` (dense factors), 1 (diagonal) or b (block-diagonal, blocks of b rows).
        max_iters: cap on the Newton–Schulz steps per factor and inversion.
        tol: stop when ‖Z Y − I‖_F / √d ≤ tol (module docstring).
    """

    value: float = Field(gt=0, allow_inf_nan=False, description="λ > 0 of the π-split")
    block_size: int | None = Field(None, ge=1, description="None: dense; 1: diagonal; b: block-diagonal factors")
    max_iters: int = Field(60, ge=1, le=1000, description="cap on the Newton–Schulz steps")
    tol: float = Field(1e-6, ge=0.0, lt=1.0, allow_inf_nan=False, description="‖Z Y − I‖_F/√d that stops the steps")


def inverse_root(M: torch.Tensor, *, block_size: int | None = None, max_iters: int = 60, tol: float = 1e-6
                 ) -> tuple[torch.Tensor, int, float]:
    """(K ≈ S^{-1/2}, steps, ‖Z Y − I‖_F / √d) for S the structured part of the symmetric
    positive definite M, by the coupled Newton–Schulz iteration of the module docstring
    (matrix products only)."""
    S = structured_part(0.5 * (M + M.T), block_size)
    d = S.shape[0]
    eye = torch.eye(d, dtype=S.dtype, device=S.device)
    trace = float(torch.diagonal(S).sum())
    if not (math.isfinite(trace) and trace > 0):
        raise NotPSDError(f"inverse_free: a damped factor has the trace {trace}; expected a positive definite factor")
    Y, Z = S / trace, eye
    res, steps = math.inf, 0
    for steps in range(1, max_iters + 1):
        R = Z @ Y
        res = float(torch.linalg.matrix_norm(R - eye)) / math.sqrt(d)
        if res <= tol or not math.isfinite(res) or steps == max_iters:
            break
        T = 0.5 * (3 * eye - R)
        Y, Z = Y @ T, T @ Z
    return Z / math.sqrt(trace), steps, res


class InverseFreeInverse(BlockInverse):
    """P = K_A² ⊗ K_G², applied as vec(K_G² X K_A²)."""

    def __init__(self, PA: torch.Tensor, PG: torch.Tensor, info: InverseInfo) -> None:
        self.PA, self.PG = PA, PG
        super().__init__(a_dim=PA.shape[0], b_dim=PG.shape[0], dtype=PA.dtype, device=PA.device, info=info)

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        return self.PG @ X @ self.PA


class InverseFreeDamping(Damping):
    """``inverse_free``: the π-split's inverse factors by Newton–Schulz steps, dense or structured."""

    kind = "inverse_free"
    options_model = InverseFreeOptions
    requires = BlockRequirement(
        (KroneckerFactored,), max_terms=1,
        reason="the inverse roots of the π-split's two damped factors (2.95)–(2.96) of one Kronecker term",
    )

    def inverse_capabilities(self, block: tuple[type, ...], terms: int | None) -> tuple[type, ...]:
        """K_A² ⊗ K_G² exposes no eigenbasis and no damped factors."""
        return ()

    def _invert(self, block: Any) -> BlockInverse:
        opts: InverseFreeOptions = self.options
        if not isinstance(block, KroneckerFactored) or len(block.terms) != 1:
            raise ConfigError(f"inverse_free: expected one Kronecker term A ⊗ G, got a {type(block).__name__}"
                              + (f" of {len(block.terms)} terms" if isinstance(block, KroneckerFactored) else "")
                              + "; use the heuristic or tikhonov damping for it")
        (A, G), = block.terms
        Ad, Gd, pi = pi_split(A, G, self.value)
        KA, sa, ra = inverse_root(Ad, block_size=opts.block_size, max_iters=opts.max_iters, tol=opts.tol)
        KG, sg, rg = inverse_root(Gd, block_size=opts.block_size, max_iters=opts.max_iters, tol=opts.tol)
        res = max(ra, rg)
        if not (math.isfinite(res) and res < 1.0):
            raise NotPSDError(f"inverse_free: the Newton–Schulz steps did not converge (‖Z Y − I‖_F/√d = {res:.3e}); "
                              "a damped factor is not positive definite")
        info = InverseInfo(kind=self.kind, method="newton_schulz", lam=self.value, pi=pi, iterations=max(sa, sg),
                           converged=res <= opts.tol, relative_residual=res)
        return InverseFreeInverse(KA @ KA, KG @ KG, info)


class InverseFactorsOptions(StrictModel):
    """Options of ``inverse_factors``: ``value`` λ only scales the coordinates no block covers by
    1/λ, as every damping's does; the block's inverse factors carry their own damping (``singd``'s
    ``damping`` option)."""

    value: float = Field(1e-3, gt=0, allow_inf_nan=False,
                         description="λ of the coordinates no block covers; the inverse factors carry their own")


class InverseFactorsDamping(Damping):
    """``inverse_factors``: applies the inverse factors a block carries, P_A ⊗ P_G as
    vec(P_G X P_A) — two GEMMs, nothing decomposed or inverted (``singd``'s blocks)."""

    kind = "inverse_factors"
    options_model = InverseFactorsOptions
    requires = BlockRequirement(
        (InverseFactored,),
        reason="the block's own inverse factors P_A ⊗ P_G (an approximator that keeps its inverse, e.g. singd)",
    )

    def inverse_capabilities(self, block: tuple[type, ...], terms: int | None) -> tuple[type, ...]:
        """P_A ⊗ P_G exposes no eigenbasis and no damped factors."""
        return ()

    def _invert(self, block: Any) -> BlockInverse:
        if not isinstance(block, InverseFactored):
            raise ConfigError(f"inverse_factors: expected a block that carries its inverse factors (singd), got a "
                              f"{type(block).__name__}; use the heuristic or tikhonov damping for it")
        PA, PG = block.inverse_factors
        return InverseFreeInverse(PA, PG, InverseInfo(kind=self.kind, method="inverse_factors", lam=self.value))
