"""The exact sampled layer block F_ii from its statistics, and the ``exact_block`` approximator.

With n = m·c (sample b, column c) pairs, ordered b-major, and the per-pair gradient

    D_n = Σ_t g_{n,t} ā_{b,t}ᵀ  ``[d_g, d_a]``        (3.27), a single term for Linear

(summed over the uses of a weight used several times; :mod:`curvlib.curvatures.statistics`),

the block is F_ii = scale · Σ_n vec(D_n) vec(D_n)ᵀ = scale · J_i J_iᵀ with
J_i = [vec(D_1) … vec(D_n)] ``[p_i, n]`` (4.48), (4.52).  :class:`ExactBlock` applies it
through J_i and J_iᵀ in matrix form, batched over all pairs and positions,

    (J_iᵀ vec(X))_n = Σ_t g_{n,t}ᵀ X ā_{b,t},        MAT(J_i w) = Σ_{n,t} w_n g_{n,t} ā_{b,t}ᵀ,

so neither J_i nor F_ii is formed (``to_dense`` excepted).  Its regularized inverse
(F_ii + λI)⁻¹ — the block-diagonal natural gradient (4.52) — is a dense Cholesky solve for
p_i ≤ ``dense_max`` and Sherman–Morrison–Woodbury (4.50) with the ``[n, n]`` Gram matrix
J_iᵀJ_i otherwise (:class:`~curvlib.linalg.WoodburySolver`; never a p_i × p_i matrix).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from curvlib.approximators.base import BlockApproximator, BlockDeclaration, FitInfo, LayerFit
from curvlib.config import StrictModel
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import ConfigError, DTypeDeviceError, NumericalWarning, PerformanceWarning, ShapeError, warn
from curvlib.linalg import SampledBlock, ShiftSolvable, WoodburySolver, eigh_safe, unvec, vec

__all__ = ["ExactBlock", "ExactBlockApproximator", "ExactBlockOptions", "pair_gram"]

_DENSE_WARN = 4096  # to_dense() of a larger block emits a PerformanceWarning


def pair_gram(s1: LayerStatistics, s2: LayerStatistics | None = None) -> torch.Tensor:
    """J_1ᵀ J_2 ``[n_1, n_2]``: the inner products ⟨D_n, D'_n'⟩ of the per-pair gradients (4.78)–(4.79),
    :meth:`LayerStatistics.gram <curvlib.curvatures.statistics.LayerStatistics.gram>` (costs there);
    ``scale`` is not applied.

    Args:
        s1, s2: statistics of the same layer shape (``s2`` defaults to ``s1``).
    """
    return s1.gram(s2)


class ExactBlock(ShiftSolvable, SampledBlock):
    """The exact sampled block F_ii = scale·J_i J_iᵀ ``[p_i, p_i]`` of one layer (module docstring).

    A :class:`~curvlib.linalg.ShiftSolvable` layer block: the operator products of every
    curvlib operator, ``apply`` (matrix form), ``trace``, ``frobenius_norm``, and the exact
    damped solve :meth:`tikhonov_solve` that the ``tikhonov`` damping uses.

    Args:
        stats: the layer's statistics (held, not copied).
        dense_max: p_i up to which :meth:`tikhonov_solve` factorizes the dense block;
            above it, Woodbury (4.50) on J_iᵀJ_i ``[n, n]``.
    """

    def __init__(self, stats: LayerStatistics, dense_max: int = 2048) -> None:
        if not isinstance(stats, LayerStatistics):
            raise ConfigError(f"ExactBlock: expected LayerStatistics, got {type(stats).__name__}")
        if isinstance(dense_max, bool) or int(dense_max) != dense_max or dense_max < 0:
            raise ConfigError(f"ExactBlock: dense_max must be an int ≥ 0, got {dense_max!r}")
        self.stats = stats
        self.dense_max = int(dense_max)
        self._cache: tuple[float, str, Any] | None = None  # (λ, branch, factorization)

    # -- description ----------------------------------------------------------------------
    @property
    def a_dim(self) -> int:
        return self.stats.a_dim

    @property
    def b_dim(self) -> int:
        return self.stats.g_dim

    @property
    def p(self) -> int:
        return self.a_dim * self.b_dim

    @property
    def shape(self) -> tuple[int, int]:
        return (self.p, self.p)

    @property
    def dtype(self) -> torch.dtype:
        return self.stats.dtype

    @property
    def device(self) -> torch.device:
        return self.stats.device

    @property
    def statistics(self) -> LayerStatistics:
        """The layer's statistics (:class:`~curvlib.linalg.SampledBlock`)."""
        return self.stats

    @property
    def scale(self) -> float:
        return float(self.stats.scale)

    @property
    def num_pairs(self) -> int:
        """n = m·c, the columns of J_i."""
        return self.stats.num_pairs

    def __repr__(self) -> str:
        return f"ExactBlock(a_dim={self.a_dim}, b_dim={self.b_dim}, n={self.num_pairs}, dtype={self.dtype}, device={self.device})"

    def __reduce__(self):
        # pickling/deepcopy rebuild from the statistics; the factorization cache is dropped
        return (ExactBlock, (self.stats, self.dense_max))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ExactBlock:
        """A copy with the statistics moved to ``dtype`` and/or ``device``."""
        return ExactBlock(self.stats.to(dtype, device), self.dense_max)

    # -- J_i and J_iᵀ in matrix form ---------------------------------------------------------
    def Jt(self, X: torch.Tensor) -> torch.Tensor:
        """J_iᵀ vec(X): ``[..., d_g, d_a]`` -> ``[..., n]``, (J_iᵀx)_n = Σ_t g_{n,t}ᵀ X ā_{b,t} (4.62)."""
        self._check_matrix(X, "ExactBlock.Jt")
        out = self.stats.jt_matrix(X.reshape(-1, self.b_dim, self.a_dim))
        return out.reshape(*X.shape[:-2], self.num_pairs)

    def J(self, w: torch.Tensor) -> torch.Tensor:
        """MAT(J_i w): ``[..., n]`` -> ``[..., d_g, d_a]``, Σ_{b,c,t} w_{bc} g_{b,c,t} ā_{b,t}ᵀ (4.71).

        w_{bc} weights every position t of its own (sample, column) pair (DESIGN.md §10)."""
        if w.dtype != self.dtype or w.device != self.device:
            raise DTypeDeviceError(f"ExactBlock.J: the block is {self.dtype} on {self.device}, w is {w.dtype} on {w.device}")
        if w.ndim < 1 or w.shape[-1] != self.num_pairs:
            raise ShapeError(f"ExactBlock.J: expected w [..., {self.num_pairs}] (n = m·c), got {list(w.shape)}")
        out = self.stats.j_matrix(w.reshape(-1, self.num_pairs))
        return out.reshape(*w.shape[:-1], self.b_dim, self.a_dim)

    # -- products -------------------------------------------------------------------------------
    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        """F_ii vec(X) in matrix form, scale·MAT(J_i J_iᵀ vec(X)), for ``X [k, d_g, d_a]``.
        Cost O(k·m·c·T·d_a·d_g)."""
        return self.J(self.scale * self.Jt(X))

    def gram(self) -> torch.Tensor:
        """J_iᵀ J_i ``[n, n]`` (no ``scale``); see :func:`pair_gram` for the cost."""
        return pair_gram(self.stats)

    def nonzero_spectrum(self) -> torch.Tensor:
        """The eigenvalues of F_ii that can be nonzero, descending: those of scale·J_iᵀJ_i.

        F_ii = scale·J_i J_iᵀ and scale·J_iᵀJ_i share their nonzero eigenvalues; the other
        p_i − n eigenvalues of F_ii are 0 (when n ≥ p_i, the extra n − p_i values returned
        here are 0 up to rounding).  Cost O(n³) after the Gram matrix.

        Returns:
            ``[n]``.
        """
        return torch.linalg.eigvalsh(self.scale * self.gram()).flip(0).clamp_min(0)

    def trace(self) -> torch.Tensor:
        """tr F_ii = scale·Σ_n ‖D_n‖²_F.  0-d tensor."""
        return self.scale * self.gram().diagonal().sum()

    def frobenius_norm(self) -> torch.Tensor:
        """‖F_ii‖_F = scale·‖J_iᵀJ_i‖_F (‖J Jᵀ‖_F = ‖JᵀJ‖_F).  0-d tensor."""
        return abs(self.scale) * torch.linalg.matrix_norm(self.gram())

    def to_dense(self) -> torch.Tensor:
        """F_ii as a dense ``[p_i, p_i]`` matrix (tests and small blocks; PerformanceWarning above p_i = 4096)."""
        if self.p > _DENSE_WARN:
            warn(
                f"ExactBlock.to_dense() forms a dense {self.p} × {self.p} matrix",
                PerformanceWarning,
            )
        out = torch.zeros(self.p, self.p, dtype=self.dtype, device=self.device)
        for D in self.stats.pair_gradient_chunks():  # chunks of samples bound the n×p_i intermediate
            V = D.transpose(1, 2).reshape(D.shape[0], -1)  # vec(D_n)ᵀ as rows
            out += V.T @ V
        return self.scale * out

    # -- regularized inverse ----------------------------------------------------------------------
    def tikhonov_solve(self, X: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """(F_ii + λI)⁻¹ vec(X) in matrix form: the block-diagonal natural gradient (4.52).

        p_i ≤ ``dense_max``: Cholesky of the dense F_ii + λI (O(p_i³) once per λ, then
        O(p_i²) per right-hand side).  Otherwise Sherman–Morrison–Woodbury (4.50) with
        1/m replaced by ``scale``,

            (λI + scale·J Jᵀ)⁻¹ u = λ⁻¹ (u − J (λ/scale·I_n + JᵀJ)⁻¹ Jᵀ u),

        from the ``[n, n]`` Gram matrix J_iᵀJ_i (O(n³) once per λ, then O(n·p_i·T) per
        right-hand side; no p_i × p_i matrix).  The factorization of the last λ is cached.

        Args:
            X: ``[..., d_g, d_a]``.
            lam: λ > 0.

        Returns:
            ``[..., d_g, d_a]``.
        """
        lam_f = float(lam)
        if not (math.isfinite(lam_f) and lam_f > 0):
            raise ConfigError(f"ExactBlock.tikhonov_solve: the damping λ must be finite and > 0, got {lam_f}")
        self._check_matrix(X, "ExactBlock.tikhonov_solve")
        batch = X.shape[:-2]
        cols = vec(X).reshape(-1, self.p).T  # [p_i, k]
        if self.p <= self.dense_max:
            Y = self._dense_solve(cols, lam_f)
        else:
            Y = self._woodbury(lam_f).solve(cols)
        return unvec(Y.T, self.b_dim, self.a_dim).reshape(*batch, self.b_dim, self.a_dim)

    def _dense_solve(self, cols: torch.Tensor, lam: float) -> torch.Tensor:
        if self._cache is None or self._cache[:2] != (lam, "dense"):
            M = self.to_dense()
            M = 0.5 * (M + M.T) + lam * torch.eye(self.p, dtype=self.dtype, device=self.device)
            L, info = torch.linalg.cholesky_ex(M)
            if int(info) == 0:
                fac: Any = ("chol", L)
            else:
                warn(
                    f"ExactBlock.tikhonov_solve: Cholesky of F_ii + λI [{self.p}, {self.p}] failed (leading minor "
                    f"{int(info)}, λ = {lam:g}); using an eigendecomposition with F_ii's eigenvalues clamped at 0",
                    NumericalWarning,
                )
                e, Q = eigh_safe(M - lam * torch.eye(self.p, dtype=self.dtype, device=self.device))
                fac = ("eig", (Q, 1.0 / (e.clamp_min(0) + lam)))
            self._cache = (lam, "dense", fac)
        kind, fac = self._cache[2]
        if kind == "chol":
            return torch.cholesky_solve(cols, fac)
        Q, inv = fac
        return Q @ (inv[:, None] * (Q.T @ cols))

    def _woodbury(self, lam: float) -> WoodburySolver:
        if self._cache is None or self._cache[:2] != (lam, "woodbury"):
            if self.scale <= 0:
                raise ConfigError(f"ExactBlock.tikhonov_solve: Woodbury needs scale > 0, got {self.scale}")

            def J_cols(W: torch.Tensor) -> torch.Tensor:  # [n, k] -> [p_i, k]
                return vec(self.J(W.T)).T

            def Jt_cols(U: torch.Tensor) -> torch.Tensor:  # [p_i, k] -> [n, k]
                return self.Jt(unvec(U.T, self.b_dim, self.a_dim)).T

            solver = WoodburySolver(self.gram(), lam, 1.0 / self.scale, J_cols, Jt_cols)
            self._cache = (lam, "woodbury", solver)
        return self._cache[2]

    # -- plain-container serialization ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers, tuples and ``None`` only (``torch.load(weights_only=True)`` compatible)."""
        return {"statistics": self.stats.state_dict(), "dense_max": self.dense_max}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> ExactBlock:
        """Inverse of :meth:`state_dict`."""
        return cls(LayerStatistics.from_state_dict(data["statistics"]), int(data["dense_max"]))


class ExactBlockOptions(StrictModel):
    """Options of ``exact_block``.

    Attributes:
        dense_max: p_i up to which :meth:`ExactBlock.tikhonov_solve` uses a dense
            Cholesky; larger blocks use Woodbury (4.50) on the ``[n, n]`` Gram matrix.
    """

    dense_max: int = Field(2048, ge=0, description="largest p_i solved densely; above it, Woodbury (4.52)")


class ExactBlockApproximator(BlockApproximator):
    """``exact_block``: the exact sampled block F_ii (reference; block-diagonal NG (4.52)).

    No EMA: the exact block of past batches is not kept (it would need their statistics).
    """

    options_model = ExactBlockOptions
    kind = "exact_block"
    #: an :class:`ExactBlock`: no Kronecker factors, an exact ``tikhonov_solve``, its statistics
    blocks = BlockDeclaration((ShiftSolvable, SampledBlock))

    def fit(self, stats: LayerStatistics, previous: LayerFit | None = None) -> LayerFit:
        """An :class:`ExactBlock` of ``stats`` (see :meth:`BlockApproximator.fit`)."""
        kept, k = self._begin_refresh(stats, previous)
        if kept is not None:
            return kept
        block = ExactBlock(stats, self.options.dense_max)
        return LayerFit(block=block, info=FitInfo(method=self.kind, refresh=k), state={"refresh": k})
