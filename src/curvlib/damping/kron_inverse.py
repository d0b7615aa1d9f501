"""``kron_inverse``: a Kronecker-factored approximation of the damped *inverse*, fitted directly.

Instead of approximating the block and inverting the approximation (KFAC and every other
approximator), this damping fits P = C ⊗ D — C ``[d_a, d_a]``, D ``[d_g, d_g]`` symmetric —
to the inverse itself, in the sense of

    min_{C, D}  ‖I − (C ⊗ D) M‖²_F,        M = F_ii + λI,  F_ii = scale·Σ_n vec(D_n) vec(D_n)ᵀ,

the Frobenius-optimal Kronecker approximate inverse (a "sparse approximate inverse" with a
Kronecker pattern).  It needs the per-pair gradients D_n ``[d_g, d_a]`` of the block, so it
inverts :class:`~curvlib.linalg.SampledBlock` blocks: pair it with the ``exact_block``
approximator (``{"approximator": "exact_block", "damping": {"kind": "kron_inverse", "value": λ}}``).
It applies P vec(X) = vec(D X C) — two GEMMs, never a factorization at apply time.

Alternating least squares (matrix-free).  With the other factor fixed the objective is a
quadratic in C (or D).  Writing f = p − 2 tr(P M) + tr(PᵀP M²) and PᵀP = C² ⊗ D²:

    tr(P M)     = tr(C T_D),   T_D = scale·Σ_n D_nᵀ D D_n + λ tr(D) I,
    tr(PᵀP M²)  = tr(C Q_D C), Q_D = scale²·Σ_{n,n'} K_{nn'} D_nᵀ D² D_n' + 2λ·scale·Σ_n D_nᵀ D² D_n
                                     + λ² tr(D²) I,

K_{nn'} = ⟨D_n, D_n'⟩ the Gram matrix of the per-pair gradients (M² = F² + 2λF + λ²I and
F² = scale²·Σ K_{nn'} vec(D_n) vec(D_n')ᵀ).  The symmetric minimiser solves the Sylvester
equation C Q_D + Q_D C = 2 T_D, exactly in Q_D's eigenbasis; D follows with the roles of the
two sides exchanged (D_n C D_nᵀ, D_n C² D_n'ᵀ).  Each half-step lowers f; the loop stops when
f falls by less than ``tol``·f, or after ``max_iters`` sweeps, and balances ‖C‖_F = ‖D‖_F
(C ⊗ D = αC ⊗ D/α).  The fit starts from C = I.

Cost of a sweep.  A Linear layer without positions (D_n = g_n ā_nᵀ): every sum above is a
Hadamard-weighted Gram product, Σ W_{nn'} D_nᵀ X D_n' = Āᵀ (W ∘ (G X Gᵀ)) Ā with the rows
Ā ``[n, d_a]``, G ``[n, d_g]``: O(n²(d_a + d_g) + n(d_a² + d_g²)) and d³ for the two
eigendecompositions.  Other layers form the D_n (n·p_i numbers): O(n²·p_i).

Rank k (the ``rank`` option).  P = Σ_{r≤k} C_r ⊗ D_r is fitted greedily, as deflation fits a
Kronecker sum: term r minimises ‖R_r − (C_r ⊗ D_r) M‖_F for the residual R_r = I − Σ_{s<r}
(C_s ⊗ D_s) M of the terms before it, by the same ALS with the cross terms of the previous
terms in the linear part (:func:`fit_kron_inverse_terms`); each term lowers the residual, but the
sum is not the joint optimum over k terms.  ``fit="joint"`` continues from the greedy sum by block
coordinate descent: each term refitted against all the others, pass after pass, until the sum is
stationary for the joint objective (a local optimum).

What it reports (``info``): ``method="als"``, the sweeps (``iterations``), ``converged``,
and ``relative_residual`` = ‖I − P M‖_F / ‖I‖_F at the fit.  P need not be positive definite;
a fit whose P may have a negative eigenvalue (C and D of mixed definiteness; for several terms
by Weyl's bound) is refused with a :class:`~curvlib.errors.NotPSDError` (the previous inverse
is kept, or the error raised).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from curvlib.config import StrictModel
from curvlib.damping.base import BlockInverse, BlockRequirement, Damping, InverseInfo
from curvlib.errors import ConfigError, NotPSDError, NumericalError
from curvlib.linalg import SampledBlock, eigh_safe, top_eigenpairs

__all__ = ["KronInverseDamping", "KronInverseOptions", "KroneckerApproximateInverse", "fit_kron_inverse",
           "fit_kron_inverse_terms", "kron_inverse_residual"]

_DENSE_PAIRS_MAX = 1 << 27  # n·p_i numbers the general path may form


class KronInverseOptions(StrictModel):
    """Options of ``kron_inverse``.

    Attributes:
        value: λ > 0 of M = F_ii + λI, the matrix whose inverse is approximated.
        rank: the number of Kronecker terms of P.
        fit: ``"greedy"``: each term fitted to what the previous ones leave; ``"joint"``: then
            refitted against all the others until the sum is stationary (:func:`fit_kron_inverse_terms`).
        max_iters: cap on the alternating sweeps per term.
        tol: stop when a sweep lowers ‖I − P M‖²_F by less than tol times its value.
    """

    value: float = Field(gt=0, allow_inf_nan=False, description="λ > 0 of M = F_ii + λI")
    rank: int = Field(1, ge=1, le=16, description="Kronecker terms of P")
    fit: Literal["greedy", "joint"] = Field("greedy", description="rank > 1: term by term, or all terms together")
    max_iters: int = Field(30, ge=1, le=10_000, description="cap on the alternating sweeps per term")
    tol: float = Field(1e-6, ge=0.0, lt=1.0, allow_inf_nan=False, description="relative decrease that stops the sweeps")


class _Pairs:
    """The weighted sums Σ W_{nn'} D_nᵀ X D_n' and Σ W_{nn'} D_n Y D_n'ᵀ of a block's per-pair
    gradients (module docstring), W an ``[n, n]`` matrix or ``None`` for the diagonal W = I, and
    the two forms of the objective built from them for M = F_ii + λI."""

    def __init__(self, stats: Any, lam: float) -> None:
        self.scale, self.lam = float(stats.scale), float(lam)
        self.eye_a = torch.eye(stats.a_dim, dtype=stats.dtype, device=stats.device)
        self.eye_g = torch.eye(stats.g_dim, dtype=stats.dtype, device=stats.device)
        self.rank_one = stats.rank_one_pairs
        if self.rank_one:
            self.A, self.G = stats.pair_rows()
            self.K = (self.A @ self.A.T) * (self.G @ self.G.T)
        else:
            if stats.num_pairs * stats.p > _DENSE_PAIRS_MAX:
                raise ConfigError(
                    f"kron_inverse: this block needs its {stats.num_pairs} per-pair gradients formed "
                    f"({stats.num_pairs}·{stats.p} numbers, above {_DENSE_PAIRS_MAX}); only Linear layers without "
                    "positions have the low-cost path — use a smaller batch or another damping for this layer"
                )
            self.D = stats.pair_gradients()  # [n, d_g, d_a]
            self.K = torch.einsum("nga,kga->nk", self.D, self.D)

    def t_a(self, D: torch.Tensor) -> torch.Tensor:
        """T_D = scale·Σ_n D_nᵀ D D_n + λ tr(D) I ``[d_a, d_a]``: tr((C ⊗ D) M) = tr(C T_D)."""
        return self.scale * self.a_side(D, None) + self.lam * torch.trace(D) * self.eye_a

    def t_g(self, C: torch.Tensor) -> torch.Tensor:
        """T_C = scale·Σ_n D_n C D_nᵀ + λ tr(C) I ``[d_g, d_g]``: tr((C ⊗ D) M) = tr(D T_C)."""
        return self.scale * self.g_side(C, None) + self.lam * torch.trace(C) * self.eye_g

    def q_a(self, X: torch.Tensor) -> torch.Tensor:
        """Q_X ``[d_a, d_a]`` with tr((Y ⊗ X) M²) = tr(Y Q_X), X ``[d_g, d_g]`` (module docstring; Xᵀ
        in the sums, which matters only for a non-symmetric X)."""
        s, lam, Xt = self.scale, self.lam, X.T
        return s * s * self.a_side(Xt, self.K) + 2 * lam * s * self.a_side(Xt, None) + lam * lam * torch.trace(X) * self.eye_a

    def q_g(self, Y: torch.Tensor) -> torch.Tensor:
        """Q_Y ``[d_g, d_g]`` with tr((Y ⊗ X) M²) = tr(X Q_Y), Y ``[d_a, d_a]``."""
        s, lam, Yt = self.scale, self.lam, Y.T
        return s * s * self.g_side(Yt, self.K) + 2 * lam * s * self.g_side(Yt, None) + lam * lam * torch.trace(Y) * self.eye_g

    def a_side(self, X: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
        """Σ W_{nn'} D_nᵀ X D_n' ``[d_a, d_a]`` for X ``[d_g, d_g]``."""
        return self._sum(X, W, transpose=False)

    def g_side(self, Y: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
        """Σ W_{nn'} D_n Y D_n'ᵀ ``[d_g, d_g]`` for Y ``[d_a, d_a]``: :meth:`a_side` of the Dᵀ_n."""
        return self._sum(Y, W, transpose=True)

    def _sum(self, X: torch.Tensor, W: torch.Tensor | None, transpose: bool) -> torch.Tensor:
        if self.rank_one:  # D_n = g_n ā_nᵀ: the inner side's rows form the weights, the outer side's the Gram
            inner, outer = (self.A, self.G) if transpose else (self.G, self.A)
            core = inner @ X @ inner.T
            if W is None:
                return (outer.T * core.diagonal()) @ outer
            return outer.T @ (W * core) @ outer
        D = self.D.transpose(1, 2) if transpose else self.D  # [n, rows, cols]: Σ D_nᵀ X D_n'
        right = D if W is None else torch.einsum("nk,kga->nga", W, D)
        return torch.einsum("nga,gh,nhb->ab", D, X, right)


def _sylvester_sym(Q: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """The symmetric X with X Q + Q X = T + Tᵀ (Q symmetric positive definite), in Q's eigenbasis."""
    q, V = eigh_safe(Q)
    if not bool(q.min() > 0):
        raise NotPSDError(f"kron_inverse: the quadratic form Q has the eigenvalue {float(q.min()):.3e} ≤ 0")
    R = V.T @ (T + T.T) @ V
    return V @ (R / (q[:, None] + q[None, :])) @ V.T


def kron_inverse_residual(stats: Any, lam: float, C: torch.Tensor, D: torch.Tensor) -> float:
    """‖I − (C ⊗ D)(F_ii + λI)‖_F / ‖I‖_F for any symmetric C ``[d_a, d_a]``, D ``[d_g, d_g]`` —
    a fitted one, or KFAC's π-split inverse (A + π√λI)⁻¹ ⊗ (G + π⁻¹√λI)⁻¹ — exactly, from the
    statistics (the formulas of the module docstring, one evaluation)."""
    pairs = _Pairs(stats, lam)
    p = stats.a_dim * stats.g_dim
    T, Q = pairs.t_a(D), pairs.q_a(D @ D)
    f = float(p - 2 * torch.trace(C @ T) + torch.trace(C @ Q @ C))
    return math.sqrt(max(f, 0.0) / p)


def fit_kron_inverse(stats: Any, lam: float, *, max_iters: int = 30, tol: float = 1e-6
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(C ``[d_a, d_a]``, D ``[d_g, d_g]``, report) minimising ‖I − (C⊗D)(F_ii + λI)‖_F over symmetric
    C, D by alternating least squares (module docstring); ``report``: ``iterations``,
    ``converged``, ``objective`` (‖I − P M‖²_F), ``relative_residual``."""
    terms, report = fit_kron_inverse_terms(stats, lam, rank=1, max_iters=max_iters, tol=tol)
    (C, D), = terms
    return C, D, report


def fit_kron_inverse_terms(stats: Any, lam: float, *, rank: int = 1, max_iters: int = 30, tol: float = 1e-6,
                           fit: str = "greedy", max_passes: int | None = None
                           ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """P = Σ_{r≤rank} C_r ⊗ D_r: ``fit="greedy"`` fits term by term (as deflation fits Kronecker sums):
    term r minimises ‖R_r − (C_r ⊗ D_r) M‖_F with R_r = I − Σ_{s<r} (C_s ⊗ D_s) M, by the ALS of the
    module docstring with the previous terms' cross terms in the linear part,

        tr(R_rᵀ (C ⊗ D) M) = tr(C T_D) − Σ_s tr(C Q_{D_s D} C_s),   Q_X = the a-side partial trace of M²
        with the g-side weight X (for symmetric X the Q of the module docstring; in general Xᵀ).

    ``fit="joint"`` then minimises ‖I − P M‖_F over all the terms together by block coordinate
    descent ("backfitting"): passes over r = 1…k refit term r against *every* other term, warm
    started from its current value, until a pass lowers the objective by less than ``tol`` times
    its value (at most ``max_passes`` passes, default ``max_iters``; each term's refit at most
    ``max_iters`` sweeps).  Every half-step minimises over one factor, so the
    objective never rises, and at convergence each term is stationary given all the others — a
    stationary point of the joint problem (a local optimum; the joint problem is not convex).

    Returns the terms and the report of the whole sum (``iterations``: the sweeps of all terms and
    passes; ``passes``: the joint passes, 0 for greedy)."""
    if fit not in ("greedy", "joint"):
        raise ConfigError(f"kron_inverse: fit must be 'greedy' or 'joint', got {fit!r}")
    pairs = _Pairs(stats, lam)
    p = stats.a_dim * stats.g_dim
    terms: list[tuple[torch.Tensor, torch.Tensor]] = []
    f, sweeps, converged = float(p), 0, True
    for _ in range(rank):
        C, D, f, n, done = _fit_term(pairs, terms, pairs.eye_a.clone(), f, max_iters, tol)
        sweeps += n
        converged = converged and done
        terms.append((C, D))
    passes = 0
    if fit == "joint" and rank > 1:
        converged = False
        for _ in range(max_iters if max_passes is None else max_passes):
            passes += 1
            f_start = f
            for r in range(rank):
                others = terms[:r] + terms[r + 1:]
                C_r, D_r = terms[r]
                B, Q = _half_step(pairs, others, D_r, "a")
                f_others = f + 2 * float(torch.trace(C_r @ B)) - float(torch.trace(C_r @ Q @ C_r))
                C, D, f, n, _ = _fit_term(pairs, others, C_r, f_others, max_iters, tol)
                sweeps += n
                terms[r] = (C, D)
            if f_start - f <= tol * max(abs(f), 1e-300):
                converged = True
                break
    report = {"iterations": sweeps, "converged": converged, "objective": max(f, 0.0), "passes": passes,
              "relative_residual": math.sqrt(max(f, 0.0) / p)}
    return terms, report


def _half_step(pairs: _Pairs, others: list[tuple[torch.Tensor, torch.Tensor]], X: torch.Tensor, side: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q) of the half-step that solves for the ``side`` factor (``"a"``: C, ``"g"``: D) with the
    other factor X fixed: f = f_others − 2 tr(Y B) + tr(Y Q Y) in the solved factor Y."""
    t, q = (pairs.t_a, pairs.q_a) if side == "a" else (pairs.t_g, pairs.q_g)
    B = t(X)
    for C_s, D_s in others:
        fixed, solved = (D_s, C_s) if side == "a" else (C_s, D_s)
        B = B - q(fixed @ X) @ solved
    Q = q(X @ X)
    return B, 0.5 * (Q + Q.T)


def _fit_term(pairs: _Pairs, others: list[tuple[torch.Tensor, torch.Tensor]], C: torch.Tensor, f_others: float,
              max_iters: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, float, int, bool]:
    """One term C ⊗ D minimising ‖I − (Σ_others + C ⊗ D) M‖²_F with the others fixed, by ALS from C;
    ``f_others`` is the objective of the others alone.  Returns (C, D, objective, sweeps, converged)."""
    f, f_prev = f_others, math.inf
    for sweep in range(1, max_iters + 1):
        B, Q = _half_step(pairs, others, C, "g")
        D = _sylvester_sym(Q, B)
        B, Q = _half_step(pairs, others, D, "a")
        C = _sylvester_sym(Q, B)
        f = float(f_others - 2 * torch.trace(C @ B) + torch.trace(C @ Q @ C))
        if not math.isfinite(f):
            raise NumericalError(f"kron_inverse: the objective became {f} at sweep {sweep}")
        alpha = math.sqrt(float(torch.linalg.matrix_norm(D)) / max(float(torch.linalg.matrix_norm(C)), 1e-300))
        C, D = C * alpha, D / alpha
        if f_prev - f <= tol * max(abs(f), 1e-300):
            return C, D, f, sweep, True
        f_prev = f
    return C, D, f, max_iters, False


class KroneckerApproximateInverse(BlockInverse):
    """P = Σ_r C_r ⊗ D_r ≈ (F_ii + λI)⁻¹, applied as Σ_r vec(D_r X C_r); ``C``, ``D``: the first term."""

    def __init__(self, terms: list[tuple[torch.Tensor, torch.Tensor]], info: InverseInfo) -> None:
        self.terms = list(terms)
        self.C, self.D = self.terms[0]
        super().__init__(a_dim=self.C.shape[0], b_dim=self.D.shape[0], dtype=self.C.dtype, device=self.C.device,
                         info=info)

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        out = self.D @ X @ self.C
        for C, D in self.terms[1:]:
            out = out + D @ X @ C
        return out


class KronInverseDamping(Damping):
    """``kron_inverse``: the Kronecker product C ⊗ D nearest to (F_ii + λI)⁻¹ in ‖I − P(F_ii + λI)‖_F."""

    kind = "kron_inverse"
    options_model = KronInverseOptions
    requires = BlockRequirement(
        (SampledBlock,),
        reason="the fit of C ⊗ D ≈ (F_ii + λI)⁻¹ needs the per-pair gradients of the block (the exact_block approximator)",
    )

    def inverse_capabilities(self, block: tuple[type, ...], terms: int | None) -> tuple[type, ...]:
        """C ⊗ D exposes neither an eigenbasis nor damped factors (the ``spectral`` coarse space's
        ``first_level`` source is refused with it)."""
        return ()

    def _invert(self, block: Any) -> BlockInverse:
        opts: KronInverseOptions = self.options
        if not isinstance(block, SampledBlock):
            raise ConfigError(
                f"kron_inverse: the block is a {type(block).__name__}, not a SampledBlock: the fit of C ⊗ D needs the "
                "per-pair gradients of the block — use the exact_block approximator with this damping"
            )
        terms, report = fit_kron_inverse_terms(block.statistics, self.value, rank=opts.rank,
                                               max_iters=opts.max_iters, tol=opts.tol, fit=opts.fit)
        lo = _smallest_eigenvalue(terms)
        if lo < 0:
            raise NotPSDError(f"kron_inverse: the fitted P has the eigenvalue {lo:.3e} < 0; a preconditioner must be "
                              "positive definite")
        info = InverseInfo(kind=self.kind, method="als", lam=self.value, iterations=report["iterations"],
                           converged=report["converged"], relative_residual=report["relative_residual"])
        return KroneckerApproximateInverse(terms, info)


def _smallest_eigenvalue(terms: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """λ_min of P = Σ_r C_r ⊗ D_r: the smallest product e_c,i·e_d,j for one term; for several, the
    largest eigenvalue of −P by :func:`~curvlib.linalg.top_eigenpairs` (matrix-free, products
    with P only); a negative value within 10⁻⁸·Σ‖C_r‖‖D_r‖ of 0 counts as 0."""
    if len(terms) == 1:
        (C, D), = terms
        e_c, e_d = torch.linalg.eigvalsh(C), torch.linalg.eigvalsh(D)
        corners = torch.outer(torch.stack([e_c.min(), e_c.max()]), torch.stack([e_d.min(), e_d.max()]))
        return float(corners.min())
    d_a, d_g = terms[0][0].shape[0], terms[0][1].shape[0]
    C0 = terms[0][0]

    def minus_p(V: torch.Tensor) -> torch.Tensor:
        X = V.reshape(-1, d_g, d_a)
        return -sum(D @ X @ C for C, D in terms).reshape(V.shape)

    res = top_eigenpairs(minus_p, d_a * d_g, 1, dtype=C0.dtype, device=C0.device, tol=1e-6, max_iters=50)
    lo = -float(res.theta[0])
    size = sum(float(torch.linalg.matrix_norm(C, 2) * torch.linalg.matrix_norm(D, 2)) for C, D in terms)
    return lo if lo < -1e-8 * size else max(lo, 0.0)
