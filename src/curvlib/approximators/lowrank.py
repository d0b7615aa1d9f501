"""``kfac_lowrank``: Kronecker plus low rank, F_ii ≈ A ⊗ G + U diag(s) Uᵀ, inverted by Woodbury.

(A, G) are the KFAC/KFC factors of the layer (:func:`~curvlib.curvatures.factors.kfac_factors`,
in the chosen ``weight_sharing`` setting; for a weight tied in transposed form, the factors of
its untransposed uses — the transposed part is left to the correction, as in ``kfac_corrected``).
The correction is the positive part of the best rank-r approximation of the residual

    R = F_ii − A ⊗ G,

from the top of its spectrum: U = [vec(U_1) … vec(U_r)] are the eigenvectors of the r
algebraically largest eigenvalues θ_1 ≥ … ≥ θ_r of R and s_j = max(θ_j, 0).  R is indefinite
(KFAC over- and under-estimates F_ii in different directions); keeping the positive part
makes F̂ = A⊗G + U diag(s) Uᵀ ⪰ A⊗G ⪰ 0, and among the approximations A⊗G + (PSD rank r) it
is the one that leaves R − U diag(s) Uᵀ with the smallest largest eigenvalue (Ky Fan).  The
eigenpairs are found matrix-free (:func:`curvlib.linalg.eigen.top_eigenpairs`: block Krylov
with Rayleigh–Ritz on X ↦ scale·MAT(J_i J_iᵀ vec X) − G X A, warm-started from the previous
refresh's U), so neither F_ii nor R is formed: a product costs O(n·T·d_a·d_g) per vector.

EMA (§3.1.2, at the level of the operator): with ρ = min(1 − 1/k, γ), A and G are averaged
as in ``kfac`` and the residual is that of the averaged block,

    R_k = ρ F̂_{k−1} + (1 − ρ) F_ii(batch) − A_k ⊗ G_k,

F̂_{k−1} the previous fit — so the correction tracks the averaged curvature without keeping
past statistics.

Inverse (the ``tikhonov`` damping, the kind's default): with K = A⊗G + λI (exact in the
joint eigenbasis of A and G, :class:`~curvlib.linalg.KroneckerEigen`) and S = diag(s),

    (K + U S Uᵀ)⁻¹ = K⁻¹ − K⁻¹U S^½ (I_r + S^½ UᵀK⁻¹U S^½)⁻¹ S^½ UᵀK⁻¹        (Woodbury),

an r × r Cholesky per λ and per product two GEMMs with the eigenbases plus O(r·p_i) — the
form stays well defined when some s_j = 0.  The block is
:class:`~curvlib.linalg.ShiftSolvable`, not Kronecker-factored, so the heuristic π-split
damping (which needs Kronecker factors) is refused for it before any data is seen.

Not declared for torch.distributed: the eigen-solver's products would have to sum over the
ranks' shards (refused there with a clear error).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from curvlib.approximators.base import (
    ApproximatorOptions,
    BlockApproximator,
    BlockDeclaration,
    FitInfo,
    LayerFit,
    ema_rho,
)
from curvlib.approximators.exact import ExactBlock
from curvlib.curvatures.factors import kfac_factors
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import ConfigError, ShapeError
from curvlib.linalg import KroneckerEigen, ShiftSolvable, finite_screen, kron, vec
from curvlib.linalg.eigen import top_eigenpairs

__all__ = ["KroneckerLowRank", "KFACLowRankApproximator", "KFACLowRankOptions"]


class KroneckerLowRank(ShiftSolvable):
    """A ⊗ G + Σ_j s_j vec(U_j) vec(U_j)ᵀ ``[p_i, p_i]`` (module docstring).

    Args:
        A: ``[d_a, d_a]`` symmetric PSD.
        G: ``[d_g, d_g]`` symmetric PSD.
        U: ``[r, d_g, d_a]``, orthonormal in the Frobenius inner product.
        s: ``[r]`` ≥ 0.
    """

    def __init__(self, A: torch.Tensor, G: torch.Tensor, U: torch.Tensor, s: torch.Tensor) -> None:
        d_a, d_g = A.shape[-1], G.shape[-1]
        if A.shape != (d_a, d_a) or G.shape != (d_g, d_g) or U.ndim != 3 or tuple(U.shape[1:]) != (d_g, d_a) \
                or s.shape != (U.shape[0],):
            raise ShapeError(f"KroneckerLowRank: expected A [d_a, d_a], G [d_g, d_g], U [r, d_g, d_a], s [r]; got "
                             f"{list(A.shape)}, {list(G.shape)}, {list(U.shape)}, {list(s.shape)}")
        if len({t.dtype for t in (A, G, U, s)}) != 1 or len({t.device for t in (A, G, U, s)}) != 1:
            raise ConfigError("KroneckerLowRank: A, G, U and s must share one dtype and device")
        self.A, self.G, self.U, self.s = A, G, U, s
        self._eigen: KroneckerEigen | None = None
        self._woodbury: tuple[float, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def a_dim(self) -> int:
        return self.A.shape[0]

    @property
    def b_dim(self) -> int:
        return self.G.shape[0]

    @property
    def rank(self) -> int:
        return self.U.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def __repr__(self) -> str:
        return f"KroneckerLowRank(a_dim={self.a_dim}, b_dim={self.b_dim}, rank={self.rank}, dtype={self.dtype})"

    def __reduce__(self):  # copies drop the factorization caches
        return (KroneckerLowRank, (self.A, self.G, self.U, self.s))

    def tensors(self) -> list[torch.Tensor]:
        return [self.A, self.G, self.U, self.s]

    # -- products --------------------------------------------------------------------------------
    def _low_rank(self, X: torch.Tensor) -> torch.Tensor:
        """U diag(s) Uᵀ vec(X) in matrix form."""
        c = torch.einsum("rga,kga->kr", self.U, X) * self.s
        return torch.einsum("kr,rga->kga", c, self.U)

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        return self.G @ X @ self.A + self._low_rank(X)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KroneckerLowRank:
        """A copy in ``dtype`` and/or on ``device``."""
        return KroneckerLowRank(*(t.to(dtype=dtype, device=device) for t in self.tensors()))

    def frobenius_norm(self) -> torch.Tensor:
        """‖A⊗G + U S Uᵀ‖_F from ‖A‖²‖G‖² + 2 Σ_j s_j⟨U_j, G U_j A⟩ + ‖s‖² (U orthonormal).  0-d tensor."""
        norm = torch.linalg.matrix_norm
        cross = (self.s * (self.U * (self.G @ self.U @ self.A)).sum((1, 2))).sum()
        sq = norm(self.A) ** 2 * norm(self.G) ** 2 + 2 * cross + (self.s * self.s).sum()
        return sq.clamp_min(0).sqrt()

    def to_dense(self) -> torch.Tensor:
        """The block as a dense ``[p_i, p_i]`` matrix (tests)."""
        V = vec(self.U).T  # [p_i, r]
        return kron(self.A, self.G) + (V * self.s) @ V.T

    # -- the exact Tikhonov inverse by Woodbury -------------------------------------------------
    def tikhonov_solve(self, X: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """(A⊗G + U diag(s) Uᵀ + λI)⁻¹ vec(X) in matrix form (module docstring); ``[..., d_g, d_a]``."""
        lam_f = float(lam)
        if not (math.isfinite(lam_f) and lam_f > 0):
            raise ConfigError(f"KroneckerLowRank.tikhonov_solve: the damping λ must be finite and > 0, got {lam_f}")
        self._check_matrix(X, "KroneckerLowRank.tikhonov_solve")
        if self._eigen is None:
            self._eigen = KroneckerEigen.from_factors(self.A, self.G)
        if self._woodbury is None or self._woodbury[0] != lam_f:
            KU = self._eigen.tikhonov_solve(self.U, lam_f)  # K⁻¹U_j [r, d_g, d_a]
            root = self.s.clamp_min(0).sqrt()
            core = torch.einsum("iga,jga->ij", self.U, KU) * root[:, None] * root[None, :]
            core = 0.5 * (core + core.T) + torch.eye(self.rank, dtype=self.dtype, device=self.device)
            self._woodbury = (lam_f, KU, root, torch.linalg.cholesky(core))
        _, KU, root, L = self._woodbury
        batch = X.shape[:-2]
        Xk = X.reshape(-1, self.b_dim, self.a_dim)
        Y = self._eigen.tikhonov_solve(Xk, lam_f)
        c = torch.einsum("rga,kga->rk", self.U, Y) * root[:, None]  # S^½ UᵀK⁻¹x  [r, k]
        z = torch.cholesky_solve(c, L) * root[:, None]
        Y = Y - torch.einsum("rk,rga->kga", z, KU)
        return Y.reshape(*batch, self.b_dim, self.a_dim)

    # -- plain-container serialization -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"A": self.A, "G": self.G, "U": self.U, "s": self.s}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> KroneckerLowRank:
        return cls(data["A"], data["G"], data["U"], data["s"])


class KFACLowRankOptions(ApproximatorOptions):
    """Options of ``kfac_lowrank``.

    Attributes:
        rank: r, the rank of the correction (capped at p_i).
        tol: relative residual tolerance of each eigenpair (:func:`~curvlib.linalg.eigen.top_eigenpairs`).
        max_iters: cap on the eigen-solver's cycles.
        depth: Krylov blocks per cycle (each a product of the residual with r + ``oversample`` vectors);
            the basis holds 2·depth·(r + oversample) vectors of p_i numbers.  On layer 5 of the
            MNIST auto-encoder (r = 8, tol 10⁻⁶) depth 3 needed 1,224 products, 8 needed 480, 10 needed 360.
        oversample: extra vectors per block.
        warm_start: start from the previous refresh's U.
        seed: seed of the random start vectors.
    """

    rank: int = Field(8, ge=1, le=256, description="rank r of the correction U diag(s) Uᵀ")
    tol: float = Field(1e-4, ge=0.0, lt=1.0, allow_inf_nan=False, description="relative residual tolerance of the eigenpairs")
    max_iters: int = Field(20, ge=1, description="cap on the eigen-solver's cycles")
    depth: int = Field(10, ge=2, le=32, description="Krylov blocks per cycle")
    oversample: int = Field(4, ge=0, le=64, description="extra vectors per Krylov block")
    warm_start: bool = Field(True, description="start from the previous refresh's eigenvectors")
    seed: int = Field(0, ge=0, description="seed of the random start vectors")


class KFACLowRankApproximator(BlockApproximator):
    """``kfac_lowrank``: A⊗G + U diag(s) Uᵀ, s the positive part of the top-r eigenvalues of F_ii − A⊗G."""

    options_model = KFACLowRankOptions
    kind = "kfac_lowrank"
    blocks = BlockDeclaration((ShiftSolvable,))

    def fit(self, stats: LayerStatistics, previous: LayerFit | None = None) -> LayerFit:
        """A :class:`KroneckerLowRank` block of ``stats`` (see :meth:`BlockApproximator.fit`)."""
        kept, k = self._begin_refresh(stats, previous)
        if kept is not None:
            return kept
        opts = self.options
        A, G = kfac_factors(stats, opts.weight_sharing)[0]
        if not bool(finite_screen([A, G])):
            return self._fallback("non-finite KFAC factors (finite statistics that overflowed)", previous)
        rho = ema_rho(k, opts.ema)
        past = previous.block if previous is not None else None
        if rho > 0:
            A, G = torch.lerp(A, past.A, rho), torch.lerp(G, past.G, rho)
        exact = ExactBlock(stats)
        d_a, d_g = stats.a_dim, stats.g_dim
        N = d_a * d_g

        def residual(V: torch.Tensor) -> torch.Tensor:
            X = V.reshape(-1, d_g, d_a)
            out = exact.apply(X)
            if rho > 0:
                out = torch.lerp(out, past.apply(X), rho)
            return (out - G @ X @ A).reshape(V.shape)

        v0 = past.U.reshape(past.rank, N) if (past is not None and opts.warm_start) else None
        gen = torch.Generator(device="cpu").manual_seed(opts.seed + k)
        res = top_eigenpairs(residual, N, min(opts.rank, N), dtype=stats.dtype, device=stats.device, tol=opts.tol,
                             max_iters=opts.max_iters, v0=v0, oversample=opts.oversample, depth=opts.depth,
                             generator=gen)
        U = res.U.reshape(-1, d_g, d_a)
        s = res.theta.clamp_min(0)
        if not bool(finite_screen([U, s])):
            return self._fallback("non-finite eigenpairs of the residual F_ii − A⊗G", previous)
        info = FitInfo(method=self.kind, iterations=res.products, residuals=tuple(res.residuals.tolist()),
                       singular_values=tuple(res.theta.tolist()), converged=res.converged, refresh=k, rho=rho)
        return LayerFit(block=KroneckerLowRank(A, G, U, s), info=info, state={"refresh": k})
