"""``kpsvd_tensor``: the best Kronecker product of K factors, one per mode of the weight tensor.

KPSVD (3.22) fits F_ii ≈ A ⊗ G, one factor per side of the weight matrix W̄ ``[d_g, d_a]``.
When a side is itself a product of modes — a convolution's patch side is (input channel,
kernel offsets…), a Linear layer's d_in or d_out can be factored by a given shape — the block
can be fitted by a product of one factor per mode,

    F_ii ≈ A_1 ⊗ … ⊗ A_p ⊗ G_1 ⊗ … ⊗ G_q,        A_j ``[a_j, a_j]``, Π a_j = d_a,  Π g_j = d_g,

with the modes ordered slowest first in the column-major vec of W̄ (the a-side modes, then the
g-side modes: vec index (g, a) ↦ g + d_g·a, with a = (a_1, …, a_p) and g = (g_1, …, g_q)
row-major).  The best such product in the Frobenius norm is the best rank-1 approximation of
the order-K tensor obtained by rearranging F_ii so that mode j holds the vectorized
``[d_j, d_j]`` slices (the order-K analogue of Def. 3.3).  It is computed by alternating least
squares (the higher-order power method, De Lathauwer et al. 2000): with the other factors
fixed, the optimal A_j is the partial contraction

    A_j = scale·Σ_n unfold_j(𝒟_n) unfold_j(𝒟_n ×_{k≠j} A_k)ᵀ / Π_{k≠j} ‖A_k‖²_F,

𝒟_n the per-pair gradient D_n as an order-K tensor — matrix-free from the statistics (Prop.
3.1's generalisation: F_ii is never formed).  ‖F − ⊗A‖²_F = ‖F‖²_F − σ², σ² = ‖T_j‖²/Π_{k≠j}‖A_k‖²
after each update, so σ increases; the sweeps stop when σ² grows by less than ``tol``·σ².
Started from PSD factors (identities, or the previous refresh's), every update is a Gram sum
Σ_n Y_n Y_nᵀ and stays symmetric PSD (the argument of Prop. 3.2).  The factors are returned
with equal norms σ^{1/K}.

Modes.  ``a_modes``/``g_modes`` give the shapes; ``None`` (default) chooses them: for a
convolution without bias, (input channels per group, kernel size per axis…) on the a-side —
the adapter's patch order —, otherwise the whole side as one mode.  With one mode per side the
fit is KPSVD's best A ⊗ G (tested).  ``"auto"`` chooses as ``None`` does, then splits a side
left whole into its most balanced pair of factors (:func:`balanced_split`) — except the a-side
of a layer with a bias, whose [x; 1] has no product structure.

Several terms.  ``rank`` r > 1 fits a greedy sum Σ_r ⊗_j A_r^(j): term r is the best product of
the residual F_ii − Σ_{s<r} ⊗_j A_s^(j) by the same HOPM, whose contraction with a fitted term
is closed-form (A_s^(j)·Π_{k≠j} ⟨A_s^(k), A_k⟩_F), so the residual is never formed.  At a fixed
point term r removes σ_r² from ‖F − F̂‖²_F.  Correction terms are symmetric, in general
indefinite.

Inverse.  One term (:class:`MultiKronecker`): (⊗_j A_j + λI)⁻¹ exactly in the joint
eigenbasis of the factors — eigenvalues are the products of the factors' eigenvalues — at
O(Σ_j d_j³) per refresh instead of O(d_a³ + d_g³), and O(p_i·Σ_j d_j) per product.  Several
(:class:`MultiKroneckerSum`): PCG preconditioned by the first term's exact inverse, with
documented fallbacks for indefinite sums.  It takes the ``tikhonov`` damping (its registered
default).

Cost per refresh: a Linear layer without positions has 𝒟_n = ā_n ⊗ g_n, and each factor
update costs O(n·(d_a·Σ a_j + d_g·Σ g_j)) — KFAC's order — with nothing formed.  Other layers
form the per-pair gradients (O(n·T·p_i), once per refresh when they hold at most 2²⁶ numbers,
else in chunks at every factor update), then O(n·p_i·Σ_j d_j) per factor update.  EMA: the factors are averaged one by one with
ρ = min(1 − 1/k, γ) after the fit (§3.1.2's factor-wise rule).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from curvlib.approximators.base import BlockApproximator, BlockDeclaration, FitInfo, LayerFit, ema_rho
from curvlib.config import StrictModel
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import ConfigError, NotPSDError, NumericalWarning, ShapeError, warn
from curvlib.linalg import ShiftSolvable, eigh_safe, finite_screen, matrix_pcg

__all__ = ["KPSVDTensorApproximator", "KPSVDTensorOptions", "MultiKronecker", "MultiKroneckerSum", "balanced_split",
           "mode_product"]

_CHUNK = 1 << 24  # numbers of the per-pair gradient tensors formed at once


def mode_product(T: torch.Tensor, M: torch.Tensor, mode: int) -> torch.Tensor:
    """T ×_mode M: M ``[d, d]`` applied along axis ``mode`` of T (a leading batch axis excluded:
    ``mode`` counts from axis 1)."""
    return torch.movedim(torch.tensordot(T, M, dims=([mode + 1], [1])), -1, mode + 1)


class MultiKronecker(ShiftSolvable):
    """A_1 ⊗ … ⊗ A_K ``[p_i, p_i]`` over the modes (a_modes…, g_modes…) of vec(W̄) (module docstring).

    Args:
        factors: K symmetric tensors ``[d_j, d_j]``, the a-side modes first.
        a_modes, g_modes: the mode sizes of each side (products d_a and d_g).
    """

    def __init__(self, factors: Sequence[torch.Tensor], a_modes: Sequence[int], g_modes: Sequence[int]) -> None:
        self.factors = tuple(factors)
        self.a_modes, self.g_modes = tuple(int(d) for d in a_modes), tuple(int(d) for d in g_modes)
        modes = self.a_modes + self.g_modes
        if len(self.factors) != len(modes) or any(tuple(F.shape) != (d, d) for F, d in zip(self.factors, modes)):
            raise ShapeError(f"MultiKronecker: expected factors of shapes {[(d, d) for d in modes]}, got "
                             f"{[list(F.shape) for F in self.factors]}")
        if len({F.dtype for F in self.factors}) != 1 or len({F.device for F in self.factors}) != 1:
            raise ConfigError("MultiKronecker: the factors must share one dtype and device")
        self._eigen: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def a_dim(self) -> int:
        return math.prod(self.a_modes)

    @property
    def b_dim(self) -> int:
        return math.prod(self.g_modes)

    @property
    def dtype(self) -> torch.dtype:
        return self.factors[0].dtype

    @property
    def device(self) -> torch.device:
        return self.factors[0].device

    def __repr__(self) -> str:
        return f"MultiKronecker(a_modes={self.a_modes}, g_modes={self.g_modes}, dtype={self.dtype})"

    def __reduce__(self):  # copies drop the eigendecomposition cache
        return (MultiKronecker, (self.factors, self.a_modes, self.g_modes))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> MultiKronecker:
        return MultiKronecker([F.to(dtype=dtype, device=device) for F in self.factors], self.a_modes, self.g_modes)

    # -- the order-K view of X [k, d_g, d_a] -----------------------------------------------------
    def _tensor(self, X: torch.Tensor) -> torch.Tensor:
        return X.transpose(-1, -2).reshape(X.shape[0], *self.a_modes, *self.g_modes)

    def _matrix(self, T: torch.Tensor) -> torch.Tensor:
        return T.reshape(T.shape[0], self.a_dim, self.b_dim).transpose(-1, -2)

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        T = self._tensor(X)
        for j, F in enumerate(self.factors):
            T = mode_product(T, F, j)
        return self._matrix(T)

    def to_dense(self) -> torch.Tensor:
        out = self.factors[0]
        for F in self.factors[1:]:
            out = torch.kron(out, F)
        return out

    def frobenius_norm(self) -> torch.Tensor:
        return torch.stack([torch.linalg.matrix_norm(F) for F in self.factors]).prod()

    def tikhonov_solve(self, X: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """(⊗_j A_j + λI)⁻¹ vec(X) in matrix form, exact in the factors' joint eigenbasis (products of
        their eigenvalues below 0, rounding of PSD factors, count as 0)."""
        lam_f = float(lam)
        if not (math.isfinite(lam_f) and lam_f > 0):
            raise ConfigError(f"MultiKronecker.tikhonov_solve: the damping λ must be finite and > 0, got {lam_f}")
        self._check_matrix(X, "MultiKronecker.tikhonov_solve")
        return self._spectral(X, lambda joint: 1.0 / (joint.clamp_min(0) + lam_f))

    def _joint_eigen(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """The factors' eigendecompositions (cached) and the order-K tensor of their eigenvalue products."""
        if self._eigen is None:
            self._eigen = [eigh_safe(F) for F in self.factors]
        joint = self._eigen[0][0]
        for e, _ in self._eigen[1:]:
            joint = joint[..., None] * e
        return self._eigen, joint

    def _spectral(self, X: torch.Tensor, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Q f(Λ) Qᵀ vec(X) in matrix form, Q = ⊗_j Q_j the joint eigenbasis, Λ the joint eigenvalues."""
        eigen, joint = self._joint_eigen()
        batch = X.shape[:-2]
        T = self._tensor(X.reshape(-1, self.b_dim, self.a_dim))
        for j, (_, Q) in enumerate(eigen):
            T = mode_product(T, Q.T, j)
        T = T * scale(joint)
        for j, (_, Q) in enumerate(eigen):
            T = mode_product(T, Q, j)
        return self._matrix(T).reshape(*batch, self.b_dim, self.a_dim)

    def psd_apply(self, X: torch.Tensor) -> torch.Tensor:
        """The positive semi-definite part of the product (joint eigenvalues below 0 dropped) applied
        to ``X [..., d_g, d_a]``."""
        return self._spectral(X, lambda joint: joint.clamp_min(0))

    def state_dict(self) -> dict[str, Any]:
        return {"factors": tuple(self.factors), "a_modes": self.a_modes, "g_modes": self.g_modes}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> MultiKronecker:
        return cls(list(data["factors"]), tuple(data["a_modes"]), tuple(data["g_modes"]))


class KPSVDTensorOptions(StrictModel):
    """Options of ``kpsvd_tensor``.

    Attributes:
        a_modes, g_modes: the mode sizes of each side of W̄ (products d_a and d_g), slowest
            first; ``None``: chosen per layer; ``"auto"``: chosen per layer, and a side left
            whole split into its most balanced pair of factors (module docstring).
        rank: r, the number of terms (greedy: each the best product of the residual).
        tol: stop when a sweep raises σ² by less than tol·σ².
        max_iters: cap on the sweeps.
        warm_start: start from the previous refresh's factors.
        ema: γ of §3.1.2 (factor-wise average); ``None``: each batch on its own.
    """

    a_modes: tuple[int, ...] | Literal["auto"] | None = Field(
        None, description="mode sizes of the activation side (product d_a); 'auto': a balanced split")
    g_modes: tuple[int, ...] | Literal["auto"] | None = Field(
        None, description="mode sizes of the gradient side (product d_g); 'auto': a balanced split")
    rank: int = Field(1, ge=1, description="terms of the greedy sum Σ_r ⊗_j A_r^(j), each fitted to the residual")
    tol: float = Field(1e-8, ge=0.0, lt=1.0, allow_inf_nan=False, description="relative growth of σ² that stops the sweeps")
    max_iters: int = Field(100, ge=1, description="cap on the sweeps")
    warm_start: bool = Field(True, description="start from the previous refresh's factors")
    ema: float | None = Field(None, ge=0.0, le=1.0, description="EMA decay γ (ρ = min(1 − 1/k, γ)); None: no average")


def balanced_split(d: int) -> tuple[int, ...]:
    """(d_1, d_2) with d_1·d_2 = d and d_1 ≤ d_2 as close as possible (d_1 the largest divisor ≤ √d);
    ``(d,)`` when d is 1 or prime."""
    d1 = next(k for k in range(math.isqrt(d), 0, -1) if d % k == 0)
    return (d1, d // d1) if d1 > 1 else (d,)


def _modes(stats: LayerStatistics, a_modes, g_modes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    auto_a, auto_g = a_modes == "auto", g_modes == "auto"
    if a_modes is None or auto_a:
        a_modes = (stats.a_dim,)
        geometry = stats.uses[0].geometry if len(stats.uses) == 1 else None
        if geometry is not None and geometry.kernel is not None and not stats.has_bias:
            k = math.prod(geometry.kernel)
            if stats.a_dim % k == 0:
                a_modes = tuple(d for d in (stats.a_dim // k, *geometry.kernel) if d > 1) or (1,)
        if auto_a and len(a_modes) == 1 and not stats.has_bias:  # [x; 1] has no product structure
            a_modes = balanced_split(stats.a_dim)
    if g_modes is None or auto_g:
        g_modes = balanced_split(stats.g_dim) if auto_g else (stats.g_dim,)
    for side, modes, dim in (("a_modes", a_modes, stats.a_dim), ("g_modes", g_modes, stats.g_dim)):
        if math.prod(modes) != dim or any(d < 1 for d in modes):
            raise ConfigError(f"kpsvd_tensor: {side} = {tuple(modes)} has the product {math.prod(modes)}; the layer's "
                              f"side has {dim} entries (d_a = {stats.a_dim}, d_g = {stats.g_dim})")
    return tuple(a_modes), tuple(g_modes)


class _PairTensors:
    """The per-pair gradients 𝒟_n as order-K tensors ``[n, *modes]``, in chunks of samples: formed
    once and kept when they hold at most ``_KEEP`` numbers, else formed again at every use.
    Outer-product pairs (:attr:`~curvlib.curvatures.statistics.LayerStatistics.rank_one_pairs`)
    keep their two sides instead (``sides``), and nothing is formed."""

    def __init__(self, stats: LayerStatistics, modes: tuple[int, ...], a_modes: tuple[int, ...]) -> None:
        self.stats, self.modes = stats, modes
        self.sides: tuple[torch.Tensor, torch.Tensor] | None = None
        self.kept: list[torch.Tensor] | None = None
        if stats.rank_one_pairs:  # 𝒟_n = ā_n ⊗ g_n
            a, g = stats.pair_rows()
            self.sides = (a.reshape(-1, *a_modes), g.reshape(-1, *modes[len(a_modes):]))
        elif stats.num_pairs * stats.p <= _KEEP:
            self.kept = list(self._formed())

    def _formed(self):
        return (D.transpose(1, 2).reshape(D.shape[0], *self.modes) for D in self.stats.pair_gradient_chunks(_CHUNK))

    def __iter__(self):
        return iter(self.kept) if self.kept is not None else self._formed()


_KEEP = 1 << 26  # per-pair gradient numbers kept across the sweeps


def _partial(T: torch.Tensor, factors: Sequence[torch.Tensor], j: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_n w_n unfold_j(T_n) unfold_j(T_n ×_{k≠j} F_k)ᵀ ``[d_j, d_j]`` for T ``[n, *modes]``."""
    K = T.ndim - 1
    Y = T
    for k in range(K):
        if k != j:
            Y = mode_product(Y, factors[k], k)
    if weights is not None:
        Y = Y * weights.reshape(-1, *([1] * K))
    letters = string.ascii_letters[: K + 1]
    left = letters[0] + "".join(letters[1 + k] if k != j else "x" for k in range(K))
    right = letters[0] + "".join(letters[1 + k] if k != j else "y" for k in range(K))
    return torch.einsum(f"{left},{right}->xy", T, Y)


def _quadratic(T: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """⟨T_n, T_n ×_k F_k (all k)⟩ ``[n]`` for T ``[n, *modes]``."""
    Y = T
    for k, F in enumerate(factors):
        Y = mode_product(Y, F, k)
    return (T * Y).reshape(T.shape[0], -1).sum(1)


def _contractions(stats: LayerStatistics, pairs: _PairTensors, factors: list[torch.Tensor], j: int) -> torch.Tensor:
    """scale·Σ_n unfold_j(𝒟_n) unfold_j(𝒟_n ×_{k≠j} A_k)ᵀ ``[d_j, d_j]``.

    A Linear layer without positions has 𝒟_n = ā_n ⊗ g_n (each side reshaped to its modes), so
    the contraction separates: for an a-side mode, Σ_n (g_nᵀ ⊗G g_n) unfold_j(ā_n) unfold_j(ā_n ×
    A_k)ᵀ — O(n·(d_a·Σ a_j + d_g·Σ g_j)), no per-pair gradient formed."""
    if pairs.sides is not None:
        a, g = pairs.sides
        p = a.ndim - 1
        if j < p:
            return float(stats.scale) * _partial(a, factors[:p], j, _quadratic(g, factors[p:]))
        return float(stats.scale) * _partial(g, factors[p:], j - p, _quadratic(a, factors[:p]))
    out = torch.zeros(pairs.modes[j], pairs.modes[j], dtype=stats.dtype, device=stats.device)
    for T in pairs:
        out += _partial(T, factors, j)
    return float(stats.scale) * out


def _hopm(stats: LayerStatistics, pairs: _PairTensors, factors: list[torch.Tensor], fitted: Sequence[Sequence[torch.Tensor]],
          tol: float, max_iters: int) -> tuple[list[torch.Tensor], float, int, bool]:
    """The best product ⊗_j A_j of the residual F_ii − Σ_s ⊗_j B_s^(j) (``fitted``: the terms already
    fitted) by HOPM from ``factors``: ``(factors with equal norms σ^{1/K}, σ², sweeps, converged)``.

    A fitted term's contraction along every mode but j is B_s^(j)·Π_{k≠j} ⟨B_s^(k), A_k⟩_F (its
    rearranged tensor is the outer product of the vec(B_s^(k))), so the residual is never formed."""
    K = len(factors)
    norms2 = [float(torch.linalg.matrix_norm(F)) ** 2 for F in factors]
    sigma2, converged, sweeps = 0.0, False, 0
    for sweeps in range(1, max_iters + 1):
        before = sigma2
        for j in range(K):
            others = math.prod(norms2[:j] + norms2[j + 1:])
            T = _contractions(stats, pairs, factors, j)
            for B in fitted:
                T = T - B[j] * math.prod(float((B[k] * factors[k]).sum()) for k in range(K) if k != j)
            T = 0.5 * (T + T.T)
            t2 = float(torch.linalg.matrix_norm(T)) ** 2
            if t2 == 0.0 or others == 0.0:  # a zero residual: the zero product
                return [torch.zeros_like(F) for F in factors], 0.0, sweeps, True
            sigma2 = t2 / others
            factors[j] = T / others
            norms2[j] = t2 / others**2
        if sweeps > 1 and sigma2 - before <= tol * sigma2:
            converged = True
            break
    root = sigma2 ** (0.5 / K)  # equal norms σ^{1/K}
    return [F / math.sqrt(n2) * root for F, n2 in zip(factors, norms2)], sigma2, sweeps, converged


class KPSVDTensorApproximator(BlockApproximator):
    """``kpsvd_tensor``: the best A_1 ⊗ … ⊗ A_K over the modes of W̄, or a greedy sum of r such
    products (module docstring)."""

    options_model = KPSVDTensorOptions
    kind = "kpsvd_tensor"
    blocks = BlockDeclaration((ShiftSolvable,))

    def fit(self, stats: LayerStatistics, previous: LayerFit | None = None) -> LayerFit:
        kept, k = self._begin_refresh(stats, previous)
        if kept is not None:
            return kept
        opts = self.options
        a_modes, g_modes = _modes(stats, opts.a_modes, opts.g_modes)
        modes = a_modes + g_modes
        past = previous.block if previous is not None else None
        past_terms = None if past is None else _terms_of(past)
        if past is not None and ((past.a_modes, past.g_modes) != (a_modes, g_modes) or len(past_terms) != opts.rank):
            raise ShapeError(f"kpsvd_tensor: the previous fit has modes {past.a_modes} and {past.g_modes} and "
                             f"{len(past_terms)} term(s), this one {a_modes} and {g_modes} and {opts.rank}; start a "
                             "new fit with previous=None")
        pairs = _PairTensors(stats, modes, a_modes)
        terms: list[list[torch.Tensor]] = []
        sigmas, sweeps, converged = [], 0, True
        for r in range(opts.rank):
            if past_terms is not None and opts.warm_start:
                start = [F.clone() for F in past_terms[r].factors]
            else:
                start = [torch.eye(d, dtype=stats.dtype, device=stats.device) for d in modes]
            factors, sigma2, n, ok = _hopm(stats, pairs, start, terms, opts.tol, opts.max_iters)
            terms.append(factors)
            sigmas.append(math.sqrt(sigma2))
            sweeps, converged = sweeps + n, converged and ok
        if not bool(finite_screen([F for t in terms for F in t])):
            return self._fallback("non-finite mode factors (finite statistics that overflowed)", previous)
        rho = ema_rho(k, opts.ema)
        if rho > 0:
            terms = [[torch.lerp(F, F0, rho) for F, F0 in zip(t, t0.factors)] for t, t0 in zip(terms, past_terms)]
        blocks = [MultiKronecker(t, a_modes, g_modes) for t in terms]
        info = FitInfo(method=self.kind, iterations=sweeps, singular_values=tuple(sigmas), converged=converged,
                       refresh=k, rho=rho)
        block = blocks[0] if opts.rank == 1 else MultiKroneckerSum(blocks)
        return LayerFit(block=block, info=info, state={"refresh": k})


def _terms_of(block: MultiKronecker | MultiKroneckerSum) -> tuple[MultiKronecker, ...]:
    return block.terms if isinstance(block, MultiKroneckerSum) else (block,)


class MultiKroneckerSum(ShiftSolvable):
    """Σ_r ⊗_j A_r^(j): r ≥ 2 :class:`MultiKronecker` terms over the same modes.

    The Tikhonov solve (Σ_r ⊗_j A_r^(j) + λI)⁻¹ runs PCG on X ↦ Σ_r T_r X + λX, preconditioned
    by the leading term's exact inverse (⊗_j A_1^(j) + λI)⁻¹ (the scheme ``tikhonov`` uses for
    two-factor sums), to a relative residual eps^¾ of the dtype, at most ``pcg_max_iters``
    steps (a warning if it stops above √eps).  Correction terms are in general indefinite; if PCG meets negative curvature the
    documented fallbacks follow, with a :class:`~curvlib.errors.NumericalWarning` and kept for
    later solves with that λ: first every term replaced by its positive semi-definite part
    (the joint eigenvalues of its factors below 0 dropped), then, should that fail in the
    dtype, the leading term's exact inverse alone — so a solve never raises mid-training.

    Args:
        terms: at least two :class:`MultiKronecker` with the same modes, dtype and device.
        pcg_max_iters: cap on PCG steps per solve.
    """

    def __init__(self, terms: Sequence[MultiKronecker], *, pcg_max_iters: int = 200) -> None:
        self.terms = tuple(terms)
        if len(self.terms) < 2 or not all(isinstance(t, MultiKronecker) for t in self.terms):
            raise ConfigError(f"MultiKroneckerSum: expected at least two MultiKronecker terms, got {self.terms!r}")
        first = self.terms[0]
        for t in self.terms[1:]:
            if (t.a_modes, t.g_modes, t.dtype, t.device) != (first.a_modes, first.g_modes, first.dtype, first.device):
                raise ShapeError(f"MultiKroneckerSum: every term needs the modes {first.a_modes}, {first.g_modes}, "
                                 f"{first.dtype} on {first.device}; got {t!r}")
        self.pcg_max_iters = int(pcg_max_iters)
        self._fallbacks: dict[float, str] = {}  # λ -> "psd_part" | "leading_term"

    @property
    def a_modes(self) -> tuple[int, ...]:
        return self.terms[0].a_modes

    @property
    def g_modes(self) -> tuple[int, ...]:
        return self.terms[0].g_modes

    @property
    def a_dim(self) -> int:
        return self.terms[0].a_dim

    @property
    def b_dim(self) -> int:
        return self.terms[0].b_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.terms[0].dtype

    @property
    def device(self) -> torch.device:
        return self.terms[0].device

    def __repr__(self) -> str:
        return f"MultiKroneckerSum(rank={len(self.terms)}, a_modes={self.a_modes}, g_modes={self.g_modes}, dtype={self.dtype})"

    def __reduce__(self):  # copies drop the fallback record (and the terms' caches)
        return (_multi_kronecker_sum, (self.terms, self.pcg_max_iters))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> MultiKroneckerSum:
        return MultiKroneckerSum([t.to(dtype, device) for t in self.terms], pcg_max_iters=self.pcg_max_iters)

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        out = self.terms[0]._apply(X)
        for t in self.terms[1:]:
            out = out + t._apply(X)
        return out

    def to_dense(self) -> torch.Tensor:
        return sum((t.to_dense() for t in self.terms[1:]), self.terms[0].to_dense())

    def frobenius_norm(self) -> torch.Tensor:
        """‖Σ_r T_r‖_F from the terms' factors: Σ_{r,s} Π_j ⟨A_r^(j), A_s^(j)⟩_F."""
        gram = torch.stack([torch.stack([torch.stack([(F * H).sum() for F, H in zip(t.factors, u.factors)]).prod()
                                         for u in self.terms]) for t in self.terms])
        return gram.sum().clamp_min(0).sqrt()

    def tikhonov_solve(self, X: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """(Σ_r T_r + λI)⁻¹ vec(X) in matrix form by PCG, with the fallbacks of the class docstring."""
        lam_f = float(lam)
        if not (math.isfinite(lam_f) and lam_f > 0):
            raise ConfigError(f"MultiKroneckerSum.tikhonov_solve: the damping λ must be finite and > 0, got {lam_f}")
        self._check_matrix(X, "MultiKroneckerSum.tikhonov_solve")
        lead = self.terms[0]
        finite_rhs = bool(torch.isfinite(X).all())
        while self._fallbacks.get(lam_f) != "leading_term":
            psd = self._fallbacks.get(lam_f) == "psd_part"
            try:
                Y, info = self._pcg(X, lam_f, psd)
            except NotPSDError as exc:
                self._fall_back(lam_f, f"is not positive definite ({exc})")
                continue
            if finite_rhs and not bool(torch.isfinite(Y).all()):
                self._fall_back(lam_f, "gave a non-finite solution from a finite right-hand side")
                continue
            if not info.converged and float(info.relative_residual.max()) > math.sqrt(torch.finfo(self.dtype).eps):
                warn(f"MultiKroneckerSum: PCG stopped after {info.iterations} iterations at relative residual "
                     f"{float(info.relative_residual.max()):.3e} (p_i = {self.shape[0]}); raise λ or pcg_max_iters",
                     NumericalWarning)
            return Y
        return lead.tikhonov_solve(X, lam_f)

    def _pcg(self, X: torch.Tensor, lam: float, psd: bool) -> tuple[torch.Tensor, Any]:
        apply = (lambda t, M: t.psd_apply(M)) if psd else (lambda t, M: t._apply(M))
        return matrix_pcg(lambda M: sum(apply(t, M) for t in self.terms), lambda R: self.terms[0].tikhonov_solve(R, lam),
                          X, lam, tol=torch.finfo(self.dtype).eps ** 0.75, max_iters=self.pcg_max_iters)

    def _fall_back(self, lam: float, why: str) -> None:
        if lam not in self._fallbacks:
            warn(f"MultiKroneckerSum: Σ_r T_r + λI (λ = {lam:.3e}, {len(self.terms)} terms, p_i = {self.shape[0]}) "
                 f"{why}; falling back to the PSD part of every term for this and later solves", NumericalWarning)
            self._fallbacks[lam] = "psd_part"
            return
        warn(f"MultiKroneckerSum: the PSD part + λI (λ = {lam:.3e}, p_i = {self.shape[0]}) {why} in {self.dtype}; "
             "falling back to the exact inverse of the leading term for this and later solves", NumericalWarning)
        self._fallbacks[lam] = "leading_term"

    def state_dict(self) -> dict[str, Any]:
        return {"terms": [t.state_dict() for t in self.terms], "pcg_max_iters": self.pcg_max_iters}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> MultiKroneckerSum:
        return cls([MultiKronecker.from_state_dict(t) for t in data["terms"]], pcg_max_iters=int(data["pcg_max_iters"]))


def _multi_kronecker_sum(terms: Sequence[MultiKronecker], pcg_max_iters: int) -> MultiKroneckerSum:
    return MultiKroneckerSum(terms, pcg_max_iters=pcg_max_iters)
