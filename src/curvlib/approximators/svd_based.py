"""Kronecker approximators fitted by singular value decompositions of Z(F_ii) (§3.2, §3.4.2).

By Thm 3.14, ‖F_ii − Σ_k R_k ⊗ S_k‖_F = ‖Z(F_ii) − Σ_k vec(R_k) vec(S_k)ᵀ‖_F (3.37), so
the best Kronecker sums come from the top singular triplets (σ, u, v) of the
rearranged block Z(F_ii) ``[d_a², d_g²]`` (Def. 3.3), each giving a term
R = √σ MAT(u), S = √σ MAT(v) (:func:`~curvlib.linalg.factors_from_singular`,
symmetrized, with its sign convention tr R > 0).  Z(F_ii) is only applied, matrix-free,
from the layer statistics (Prop. 3.1; (3.31)–(3.36) for convolutions), at O(m·d²) per
product.

=================  =============================================================  =========
kind               fit                                                            terms
=================  =============================================================  =========
``kpsvd``          power SVD of Z(F) (3.22), Prop. 3.2: both factors PSD           1
``deflation``      power SVD of Z(F), then of Z(F − R₁⊗S₁), … (§3.2.3.1)            ``rank``
``lanczos``        restarted Lanczos bidiagonalization of Z(F) (§3.2.3.2)          ``rank``
``kfac_corrected`` KFAC (A, G), then the power SVD of Z(F − A⊗G) (3.26)            2
=================  =============================================================  =========

The terms after the first are usually indefinite (a term of a deflation is orthogonal
to the previous ones in the Frobenius inner product; the correction of
``kfac_corrected`` fits F − A⊗G, which has both signs); their sign is the deterministic
convention of :func:`~curvlib.linalg.factors_from_singular` (tr R > 0, or the largest
entry of R positive when tr R ≈ 0), and R ⊗ S does not depend on it.

Symmetry of the factors.  F_ii is symmetric, so Z(F_ii) commutes with transposing R and
S (Z(F)[(μ,ν),(i,j)] = Z(F)[(ν,μ),(j,i)]): it maps symmetric MAT(v) to symmetric
MAT(u) and antisymmetric to antisymmetric, and every singular pair is a symmetric pair
or an antisymmetric pair — R ⊗ S is a symmetric matrix either way.  For a Linear layer
the antisymmetric part is 0 (MAT(Z(F)v) = scale·Σ_b (Σ_c g_bcᵀ V g_bc) ā_b ā_bᵀ vanishes
for antisymmetric V), but a convolution block, a sum of ā_t ā_t'ᵀ ⊗ g_t g_t'ᵀ over pairs
t ≠ t', has antisymmetric pairs too, sometimes among its leading triplets.  With
``symmetric_factors=True`` (default) the solvers run on Z(F) restricted to symmetric
matrices, so the fit is the best Kronecker sum with symmetric factors — what the
inversion of §3.2.5 and the Tikhonov damping need — and for a PSD block the leading
factors are PSD (Prop. 3.2).  ``symmetric_factors=False`` gives the unconstrained best
fit (3.25), each term projected on the symmetric or antisymmetric pairs, whichever holds
it (a singular vector is one or the other up to rounding).

Layers with positions (convolutions of any dimension, Linear layers on tokens, modules
called several times): the fitted block is that of the ``weight_sharing`` setting
(:func:`curvlib.curvatures.factors.z_operator`).  ``"expand"`` (default): Z(F) uses the band
‖t − t'‖∞ ≤ r on the N-D positions (3.35)–(3.36) with ``band_radius`` r — ``"kernel"``
(default) the layer's kernel size as in §3.4.3 (0 without a kernel: positions treated as
independent samples, the block KFAC-expand approximates), an int, or ``None`` for every
pair (the exact block (3.28)); the same ``scale`` (no 1/T) as the exact block, which KFC's
factors estimate too.  ``"reduce"``: the block of the position-reduced statistics.

Refreshes (§3.1.2): ρ = min(1 − 1/k, γ) with γ the ``ema`` option.  ``ema_mode``:

* ``"factors"`` (the thesis): fit the batch, then average the terms factor by factor,
  A_k = ρ A_k^old + (1 − ρ) A_k^new (same for B_k), after aligning the signs of the new
  terms with the old ones (:func:`~curvlib.approximators.base.align_signs`; DESIGN.md §10);
* ``"fisher"``: fit the EMA of the block itself, ρ F̂_prev + (1 − ρ) F_batch, through
  Z(ρ F̂_prev + (1 − ρ) F_batch) v = ρ Σ_k vec(A_k)⟨vec(B_k), v⟩ + (1 − ρ) Z(F_batch) v
  (:func:`~curvlib.linalg.ema_combined`), with F̂_prev the previous fit's Kronecker sum.
  For ``kfac_corrected`` the KFAC pair is averaged factor-wise in both modes and the
  correction fits [ρ F̂_prev + (1 − ρ) F_batch] − A⊗G.

With ``warm_start`` the solvers start from the previous refresh's right singular vectors
(``LayerFit.state["v0"]``), which the thesis found to speed up convergence (§3.3).
Random starts come from a ``torch.Generator`` seeded with the ``seed`` option.

Solver space (option ``solver_space``).  A block without a band — a Linear layer, or
positions treated as independent samples — is Z(F) = X C Yᵀ over its n = m·T rows
(:meth:`~curvlib.linalg.ZOperator.gram_form`, Prop. 3.1): the solvers can iterate on n
coefficients with the Gram matrices of X and Y (:mod:`curvlib.linalg.svd`), the same
iteration at O(n²) per step instead of O(n·(d_a² + c·d_g²)) per product.  Its cost is
fixed: the two Gram matrices, O(n²·(d_a + c²·d_g)); a warm start's images through a rank-8
sketch of its matrix, O(d_g²·8 + n·c·d_g·8) (exactly, Yᵀv₀ = O(n·c·d_g²), for d_g ≤ 32:
:meth:`~curvlib.linalg.zproducts.GramForm.start_right_images`; a start only steers the
iteration, which converges to the same triplets); then one weighted Gram GEMM per factor of
each term, O(n·d_a²) and O(n·c·d_g²) — the cost of KFAC's own factors (Table 3.1) —
whatever the number of iterations.  Deflation
only changes the small core; the KFAC pair of ``kfac_corrected`` (and the previous terms
in ``ema_mode="fisher"``) adds one quadratic form per row and factor.  ``"auto"`` takes
the Gram space when that setup costs at most 4 products with Z(F) per term fitted — a
direct power SVD needs at least 3 per term (Zv₀, Zᵀu, Zv), 5 or more at two iterations
(a warm start on the MNIST auto-encoder takes 2–3 for its leading triplets, far more
after a deflation), plus one for the rank test of a deflation — and n ≤ 4096 (the Gram
matrices are n×n in float64) and the fit's tolerance max(``power_tol``, 4·eps) is at least
1e-7 (any float32 fit; in float64 from ``power_tol`` = 1e-7): with singular Gram matrices
(repeated rows, or n > d(d+1)/2) a coefficient vector is defined up to their null spaces, and
a norm computed as the square root of a quadratic form is good to ~√eps(float64) ≈ 1.5e-8
relative only.  ``"direct"`` never takes the Gram space, ``"gram"`` whenever the block has
the form (then tolerances below ~1e-7 may not be met on singular Gram matrices).
``FitInfo.iterations`` counts the solver's steps in either space; the ``state["v0"]`` it
leaves are vectors of R^{d_g²} either way (vec(B_k)/‖B_k‖_F, ± the right singular vectors).
"""

from __future__ import annotations

import abc
from typing import Annotated, Literal

import torch
from pydantic import Field, model_validator

from curvlib.approximators.base import (
    ApproximatorOptions,
    BlockApproximator,
    BlockDeclaration,
    FitInfo,
    LayerFit,
    align_signs,
    ema_rho,
)
from curvlib.curvatures.factors import kfac_factors
from curvlib.curvatures.factors import z_operator as _z_operator
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.distributed import ShardedZOperator
from curvlib.errors import NumericalError
from curvlib.linalg import (
    KroneckerFactored,
    KroneckerSum,
    SVDResult,
    ZOperator,
    deflated,
    ema_combined,
    factors_from_singular,
    lanczos_svd,
    power_svd,
    unvec,
    vec,
)
from curvlib.linalg.rearrange import normalized_factors
from curvlib.linalg.zproducts import GramForm

__all__ = [
    "DeflationApproximator",
    "DeflationOptions",
    "IterativeOptions",
    "KFACCorrectedApproximator",
    "KFACCorrectedOptions",
    "KPSVDApproximator",
    "KPSVDOptions",
    "LanczosApproximator",
    "LanczosOptions",
    "z_operator",
]

Term = tuple[torch.Tensor, torch.Tensor]
BandRadius = Annotated[int, Field(ge=0)] | Literal["kernel"] | None

#: ``solver_space="auto"``: the Gram space when forming it costs at most this many products
#: with Z(F) per term (module docstring) ...
GRAM_PRODUCTS_PER_TERM = 4
#: ... and the block has at most this many rows (the Gram matrices are N×N in float64) ...
GRAM_MAX_ROWS = 4096
#: ... and the fit is held to at least this relative accuracy: max(power_tol, 4·eps(dtype)).
#: With singular Gram matrices (repeated rows, n > d(d+1)/2) coefficients are defined up to
#: their null spaces, and norms, square roots of quadratic forms, are good to ~√eps(float64).
GRAM_MIN_TOL = 1e-7


def z_operator(
    stats: LayerStatistics, band_radius: int | str | None = "kernel", weight_sharing: str = "expand"
) -> ZOperator:
    """The matrix-free Z(F_ii) of a layer's statistics: :func:`curvlib.curvatures.factors.z_operator`
    (Prop. 3.1; (3.31)–(3.36) on any position geometry; the block of the weight-sharing setting).

    Args:
        stats: the layer's statistics.
        band_radius: ``"kernel"`` (r = the kernel size of a convolution, 0 for positions
            without a kernel, §3.4.3), an int r ≥ 0, or ``None`` (every position pair, the
            exact block).
        weight_sharing: ``"expand"`` (the banded block) or ``"reduce"`` (the reduce block).

    Returns:
        a :class:`~curvlib.linalg.ZOperator` ``[d_a², d_g²]``.
    """
    return _z_operator(stats, weight_sharing, band_radius)


# --------------------------------------------------------------------------- options


class IterativeOptions(ApproximatorOptions):
    """Options shared by the SVD-based approximators.

    Attributes:
        power_tol: relative tolerance on the residual of each singular triplet,
            max(‖Zv − σu‖, ‖Zᵀu − σv‖) ≤ power_tol·σ (the thesis's ε = 1e-6, made
            relative; DESIGN.md §10).
        max_iters: cap on the solver's iterations: power iterations per singular triplet
            (power SVD methods), or bidiagonalization cycles, each of at most
            ``krylov_dim`` steps (``lanczos``: max_iters − 1 restarts).
        warm_start: start from the previous refresh's singular vectors.
        ema_mode: ``"factors"`` (average the terms factor-wise, §3.1.2) or ``"fisher"``
            (fit the EMA of the block itself); used when ``ema`` is set.
        band_radius: layers with positions, ``weight_sharing="expand"``: ``"kernel"``
            (r = the kernel size of a convolution, §3.4.3; 0 — positions as independent
            samples, the block of KFAC-expand — for positions without a kernel), an int
            r ≥ 0, or ``None`` (all position pairs, the exact block).
        seed: seed of the generator of random starts.
        symmetric_factors: fit with symmetric factors (the best such Kronecker sum);
            ``False``: the unconstrained best fit, which may contain antisymmetric pairs
            for convolution blocks (module docstring).
        solver_space: where the solvers iterate (module docstring, "Solver space"):
            ``"direct"`` on vectors of R^{d_a²} and R^{d_g²} (products of Prop. 3.1),
            ``"gram"`` on coefficients over the samples when the block has a Gram form
            (else direct), ``"auto"`` (default) the Gram space when its cost rule says so.
            The same iteration either way; the fits agree to the solver tolerance.
    """

    power_tol: float = Field(1e-6, ge=0.0, allow_inf_nan=False, description="relative residual tolerance of the triplets")
    max_iters: int = Field(100, ge=1, description="cap on power iterations per triplet / Lanczos cycles")
    warm_start: bool = Field(True, description="start from the previous refresh's singular vectors")
    ema_mode: Literal["factors", "fisher"] = Field("factors", description="average the factors, or the Fisher block")
    band_radius: BandRadius = Field("kernel", description="conv band radius r of (3.35); None: exact double sum")
    seed: int = Field(0, ge=0, description="seed of the random start vectors")
    symmetric_factors: bool = Field(True, description="best fit with symmetric factors (else unconstrained, (3.25))")
    solver_space: Literal["auto", "direct", "gram"] = Field(
        "auto", description="iterate on vectors of R^{d²} ('direct') or on sample coefficients ('gram'); 'auto' by cost"
    )


class KPSVDOptions(IterativeOptions):
    """Options of ``kpsvd`` (Kronecker rank 1)."""


class DeflationOptions(IterativeOptions):
    """Options of ``deflation``: ``rank`` ≥ 1 Kronecker terms (default 2)."""

    rank: int = Field(2, ge=1, le=64, description="number of Kronecker terms (≤ 64: beyond, use exact_block)")


class KFACCorrectedOptions(IterativeOptions):
    """Options of ``kfac_corrected`` (KFAC plus one correction term)."""


class LanczosOptions(IterativeOptions):
    """Options of ``lanczos``.

    Attributes:
        rank: number of Kronecker terms (default 2).
        krylov_dim: K, the Krylov basis size per cycle (> rank); ``None``: the solver's
            default min(max(2·rank + 8, 10), min(d_a², d_g²)).

    ``max_iters`` caps the restarted cycles (§3.2.3.2).
    """

    rank: int = Field(2, ge=1, le=64, description="number of Kronecker terms (≤ 64: beyond, use exact_block)")
    krylov_dim: int | None = Field(None, ge=2, description="Krylov basis size K per cycle (> rank)")

    @model_validator(mode="after")
    def _krylov_exceeds_rank(self) -> LanczosOptions:
        if self.krylov_dim is not None and self.krylov_dim <= self.rank:
            raise ValueError(f"krylov_dim must be > rank; got krylov_dim={self.krylov_dim}, rank={self.rank}")
        return self


# --------------------------------------------------------------------------- shared machinery


def _term(res: SVDResult, j: int, d_a: int, d_b: int, symmetric: bool) -> Term:
    """Term j of an SVD: R = √σ MAT(u), S = √σ MAT(v) (after (3.24)), sign-normalised.

    ``symmetric``: symmetrized (the solver ran on symmetric matrices, so this only removes
    rounding).  Otherwise projected on the symmetric or on the antisymmetric pairs,
    whichever holds more of R ⊗ S, then sign-normalised again.
    """
    if symmetric:
        return factors_from_singular(res.sigma[j], res.U[:, j], res.V[:, j], d_a, d_b, symmetrize=True)
    R, S = factors_from_singular(res.sigma[j], res.U[:, j], res.V[:, j], d_a, d_b, symmetrize=False)
    norm = torch.linalg.matrix_norm
    sym = float(norm(R + R.T) * norm(S + S.T))
    anti = float(norm(R - R.T) * norm(S - S.T))
    sign = 1.0 if sym >= anti else -1.0
    R, S = 0.5 * (R + sign * R.T), 0.5 * (S + sign * S.T)
    return normalized_factors(R, S, symmetrize=False)


def _ema_terms(old_terms: tuple[Term, ...], new_terms: list[Term], rho: float) -> list[Term]:
    """:func:`~curvlib.approximators.base.ema_terms` — ρ A_k^old + (1 − ρ) A_k^new after
    :func:`~curvlib.approximators.base.align_signs` — with each average one fused pass
    (``torch.lerp``; no temporaries of the factors' size)."""
    aligned = align_signs(new_terms, old_terms)
    return [(torch.lerp(A, A0, rho), torch.lerp(B, B0, rho)) for (A0, B0), (A, B) in zip(old_terms, aligned)]


def _all_finite(x: torch.Tensor) -> bool:
    """Every entry of x is finite: its min and max are (both propagate NaN) — one fused
    reduction, ~20× cheaper than ``isfinite(x).all()`` on CPU."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _normalised_term(R: torch.Tensor, S: torch.Tensor, symmetric: bool) -> Term:
    """A term R ⊗ S formed directly, symmetrized (or, unconstrained, projected on the symmetric
    or antisymmetric pairs) with the sign convention of :func:`_term`."""
    if symmetric:
        return normalized_factors(R, S, symmetrize=True)
    norm = torch.linalg.matrix_norm
    sign = 1.0 if float(norm(R + R.T) * norm(S + S.T)) >= float(norm(R - R.T) * norm(S - S.T)) else -1.0
    return normalized_factors(0.5 * (R + sign * R.T), 0.5 * (S + sign * S.T), symmetrize=False)


def _sym_columns(X: torch.Tensor, n: int) -> torch.Tensor:
    """Columns ``[n², k]`` -> vec((MAT(x) + MAT(x)ᵀ)/2) for each column, ``[n², k]``."""
    M = unvec(X.T, n, n)
    return vec(0.5 * (M + M.transpose(-1, -2))).T


class _SymmetricZ(ZOperator):
    """Z(F) restricted to symmetric matrices: P_a Z(F) P_b, with P the orthogonal projector
    vec(X) ↦ vec((X + Xᵀ)/2) (see the module docstring).  O(k·d²) on top of each product."""

    def __init__(self, op: ZOperator) -> None:
        super().__init__(op.a_dim, op.b_dim, dtype=op.dtype, device=op.device)
        self.op = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return _sym_columns(self.op.matvec(_sym_columns(V, self.b_dim)), self.a_dim)

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return _sym_columns(self.op.rmatvec(_sym_columns(U, self.a_dim)), self.b_dim)

    def gram_form(self) -> GramForm | None:
        """P_a X C (P_b Y)ᵀ: the columns' symmetric parts (those of the rows are symmetric already)."""
        form = self.op.gram_form()
        return None if form is None else form.symmetrized()


def _zero_term_like(A: torch.Tensor, G: torch.Tensor) -> Term:
    return torch.zeros_like(A), torch.zeros_like(G)


def _zero_term(stats: LayerStatistics) -> Term:
    kw = {"dtype": stats.dtype, "device": stats.device}
    return torch.zeros(stats.a_dim, stats.a_dim, **kw), torch.zeros(stats.g_dim, stats.g_dim, **kw)


def _deflation_vanishes(base: ZOperator, terms: list[Term], generator: torch.Generator) -> bool:
    """Whether Z(M − Σ_k R_k ⊗ S_k) = Z(M) − Σ_k vec(R_k)vec(S_k)ᵀ is zero up to rounding.

    Tested on one random unit vector v (a nonzero operator vanishes on it with probability
    0): the deflated product is compared with the rounding level of the two products it
    subtracts *on the same v*,

        ‖Z(M)v − Σ_k vec(R_k)⟨vec(S_k), v⟩‖ ≤ 10·eps·√max(n_a, n_b)·(‖Z(M)v‖ + Σ_k ‖R_k‖_F |⟨vec(S_k), v⟩|),

    so the test does not depend on how much of v the leading directions hold (a random v
    of a low-rank operator sees only ~1/√n_b of its norm).  Catches a block that is
    (numerically) of Kronecker rank < the number of terms asked for — e.g. KFAC is exact
    for one sample with one column — where a power iteration would divide 0 by 0.
    """
    n_a, n_b = base.shape
    v = torch.randn(n_b, generator=generator, dtype=base.dtype, device=base.device)
    v = v / torch.linalg.vector_norm(v)
    w = base.matvec(v)
    out, size = w, float(torch.linalg.vector_norm(w))
    for R, S in terms:
        c = (vec(S) * v).sum()
        out = out - c * vec(R)
        size += float(torch.linalg.matrix_norm(R) * c.abs())
    level = 10.0 * torch.finfo(base.dtype).eps * max(n_a, n_b) ** 0.5 * size
    return float(torch.linalg.vector_norm(out)) <= level


class _Solve:
    """Accumulates what the solver runs report (iterations, σ, residuals, vectors)."""

    def __init__(self) -> None:
        self.iterations = 0
        self.sigmas: list[float] = []
        self.residuals: list[float] = []
        self.converged = True
        self.V: list[torch.Tensor] = []

    def add(self, res: SVDResult, columns: int | None = None, *, vectors: bool = True) -> None:
        """Record a solver run; ``vectors=False`` for a Gram-space run (its V are coefficients)."""
        cols = res.sigma.shape[0] if columns is None else columns
        self.iterations += int(res.iterations)
        self.sigmas += res.sigma[:cols].tolist()
        self.residuals += res.residuals[:cols].tolist()
        self.converged = self.converged and bool(res.converged)
        if vectors:
            self.V += list(res.V[:, :cols].unbind(1))


def _gram_vanishes(form: GramForm, sigma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                   generator: torch.Generator) -> bool:
    """:func:`_deflation_vanishes` in the Gram space: whether Z − Σ_k σ_k (Xα_k)(Yβ_k)ᵀ is
    zero up to rounding.  ``sigma [r]``, ``alpha [N, r]``, ``beta [N, r]``.

    The same relative test, with the terms' sizes σ_k ‖Xα_k‖ |⟨Yβ_k, v⟩| and Z's dtype and
    shape for the rounding level, on the random unit v = vec(p qᵀ)/(‖p‖‖q‖) (p, q Gaussian):
    like a Gaussian vector of R^{d_b²}, it has an O(1/d_b) component along any fixed unit
    direction, and Yᵀv costs O(N·d_b).  (A random v = Yβ would not do: when the columns
    of Y are nearly parallel it lies almost along the leading direction, and a small
    deflated operator would pass for rounding.)
    """
    n_a, n_b = form.shape
    d = form.b_dim
    p, q = torch.randn(2, d, generator=generator, dtype=form.work_dtype, device=form.device)
    size_v = torch.linalg.vector_norm(p) * torch.linalg.vector_norm(q)
    y = form.right_outer_images(p, q) / size_v  # Yᵀv
    w = form.forward(y)
    along = beta.T @ y  # [r]: ⟨Yβ_k, v⟩
    out = w - alpha @ (sigma * along)
    norms = (alpha * form.metric_a(alpha)).sum(0).clamp_min(0).sqrt()
    size = (w @ form.metric_a(w)).clamp_min(0).sqrt() + (sigma.abs() * norms * along.abs()).sum()
    level = 10.0 * torch.finfo(form.dtype).eps * max(n_a, n_b) ** 0.5 * size
    return bool((out @ form.metric_a(out)).clamp_min(0).sqrt() <= level)


def _gram_terms(form: GramForm, sigma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                symmetric: bool) -> tuple[list[Term], list[torch.Tensor]]:
    """The terms √σ_k MAT(Xα_k) ⊗ √σ_k MAT(Yβ_k), sign-normalised as :func:`_term` does, and
    the warm-start vectors vec(B_k)/‖B_k‖_F ``[d_b²]`` (0 for a zero term).

    One weighted Gram GEMM per side for all terms (O(N·d²) per term).
    """
    root = sigma.clamp_min(0).sqrt()
    R = form.left_matrices(alpha * root)  # [r, d_a, d_a]
    S = form.right_matrices(beta * root)
    terms = [_normalised_term(R[k], S[k], symmetric) for k in range(sigma.shape[0])]
    norms = torch.stack([torch.linalg.matrix_norm(B) for _, B in terms])
    scale = 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms))
    # a symmetrized factor is bitwise symmetric: its vec is its row-major flattening
    V = torch.stack([(B.reshape(-1) if symmetric else vec(B)) * scale[k] for k, (_, B) in enumerate(terms)])
    return terms, list(V.unbind(0))  # rows of one [r, d_b²] tensor


class _SVDApproximator(BlockApproximator):
    """The refresh logic shared by the SVD-based kinds; subclasses implement :meth:`_fit_batch`."""

    options_model = IterativeOptions
    #: under torch.distributed every product with Z(F) is all-reduced (the Gram space, spanned
    #: by the samples of every rank, is not used then)
    distributed = True

    def fit(self, stats: LayerStatistics, previous: LayerFit | None = None) -> LayerFit:
        """A :class:`~curvlib.linalg.KroneckerSum` fit (see :meth:`BlockApproximator.fit` and the
        module docstring for EMA and warm starts)."""
        kept, k = self._begin_refresh(stats, previous)
        if kept is not None:
            return kept
        opts = self.options
        rho = ema_rho(k, opts.ema)
        v0 = previous.state.get("v0") if (opts.warm_start and previous is not None) else None
        generator = torch.Generator(device=stats.device).manual_seed(opts.seed)
        op = z_operator(stats, opts.band_radius, opts.weight_sharing)
        if self.shard is not None:  # every product of the iterations is the global batch's
            op = ShardedZOperator(op, self.shard)
        past = previous.terms if rho > 0 else None
        try:
            terms, solve = self._fit_batch(stats, op, past, rho, v0, generator)
        except NumericalError as exc:
            return self._fallback(f"the singular value solver failed ({exc})", previous)
        if not all(_all_finite(A) and _all_finite(B) for A, B in terms):
            return self._fallback("the fitted factors are not finite", previous)
        info = FitInfo(
            method=self.kind,
            iterations=solve.iterations,
            residuals=tuple(solve.residuals),
            singular_values=tuple(solve.sigmas),
            converged=solve.converged,
            refresh=k,
            rho=rho,
        )
        state: dict = {"refresh": k}
        if solve.V:
            # [d_g², K] with contiguous columns (each is a start vector)
            state["v0"] = torch.stack(solve.V, dim=0).T
        return LayerFit(block=KroneckerSum(terms), info=info, state=state)

    def _base(self, op: ZOperator, past: tuple[Term, ...] | None, rho: float) -> ZOperator:
        """Z of the matrix the batch terms are fitted to, F_batch or ρF̂_prev + (1−ρ)F_batch,
        restricted to symmetric matrices with ``symmetric_factors``."""
        if past is not None and self.options.ema_mode == "fisher":
            op = ema_combined(op, past, rho)
        return _SymmetricZ(op) if self.options.symmetric_factors else op

    def _term(self, res: SVDResult, j: int, stats: LayerStatistics) -> Term:
        return _term(res, j, stats.a_dim, stats.g_dim, self.options.symmetric_factors)

    def _gram(self, base: ZOperator, terms: int) -> GramForm | None:
        """The Gram form to iterate on, per ``solver_space`` (module docstring), or ``None``."""
        space = self.options.solver_space
        form = None if space == "direct" else base.gram_form()
        if form is None or space == "gram":
            return form
        cheap = form.setup_flops <= GRAM_PRODUCTS_PER_TERM * terms * form.product_flops
        small = form.coefficient_shape[0] <= GRAM_MAX_ROWS
        coarse = max(self.options.power_tol, 4 * torch.finfo(form.dtype).eps) >= GRAM_MIN_TOL
        return form if cheap and small and coarse else None

    @staticmethod
    def _start_column(v0: torch.Tensor | None, j: int) -> torch.Tensor | None:
        """Column j ``[d_g²]`` of the warm-start vectors, if there is one."""
        return v0[:, j] if v0 is not None and j < v0.shape[1] else None

    def _finish(self, terms: list[Term], past: tuple[Term, ...] | None, rho: float) -> list[Term]:
        """Factor-wise EMA of §3.1.2 in ``"factors"`` mode; the terms as they are otherwise."""
        if past is not None and self.options.ema_mode == "factors":
            return _ema_terms(past, terms, rho)
        return terms

    @abc.abstractmethod
    def _fit_batch(
        self,
        stats: LayerStatistics,
        op: ZOperator,
        past: tuple[Term, ...] | None,
        rho: float,
        v0: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[list[Term], _Solve]:
        """The refreshed terms (EMA applied) and the solver report.

        Args:
            stats: the batch statistics.
            op: Z(F_batch) ``[d_a², d_g²]``.
            past: the previous fit's terms when ρ > 0, else ``None``.
            rho: the EMA weight of the past.
            v0: warm-start right vectors ``[d_g², K]`` or ``None``.
            generator: source of random starts.
        """


# --------------------------------------------------------------------------- the kinds


class _PowerDeflationApproximator(_SVDApproximator):
    """Successive power SVDs on the deflated operator (§3.2.3.1); :meth:`_rank` terms."""

    @abc.abstractmethod
    def _rank(self) -> int:
        """The number of Kronecker terms."""

    def _fit_batch(self, stats, op, past, rho, v0, generator):
        base = self._base(op, past, rho)
        form = self._gram(base, self._rank())
        if form is not None:
            return self._fit_gram(form, past, rho, v0, generator)
        solve = _Solve()
        terms: list[Term] = []
        for j in range(self._rank()):
            if terms and _deflation_vanishes(base, terms, generator):
                terms.append(_zero_term(stats))  # the block has Kronecker rank j (numerically)
                solve.sigmas.append(0.0)
                solve.residuals.append(0.0)
                continue
            res = self._power(deflated(base, terms) if terms else base, v0, j, generator)
            solve.add(res)
            terms.append(self._term(res, 0, stats))
        return self._finish(terms, past, rho), solve

    def _fit_gram(self, form: GramForm, past, rho, v0, generator):
        """The successive power SVDs in the Gram space: deflation changes only the core."""
        solve = _Solve()
        N = form.coefficient_shape[0]
        kw = {"dtype": form.work_dtype, "device": form.device}
        sigma, alpha, beta = torch.zeros(0, **kw), torch.zeros(N, 0, **kw), torch.zeros(N, 0, **kw)
        solved = []  # the triplets a solver ran for (their vectors become state["v0"])
        for j in range(self._rank()):
            if j and _gram_vanishes(form, sigma, alpha, beta, generator):
                # the block has Kronecker rank j (numerically): a zero term, as on the direct path
                sigma = torch.cat([sigma, sigma.new_zeros(1)])
                alpha, beta = torch.cat([alpha, alpha.new_zeros(N, 1)], 1), torch.cat([beta, beta.new_zeros(N, 1)], 1)
                solve.sigmas.append(0.0)
                solve.residuals.append(0.0)
                continue
            res = self._power(form.deflated(sigma, alpha, beta) if j else form, v0, j, generator)
            solve.add(res, vectors=False)
            solved.append(j)
            sigma = torch.cat([sigma, res.sigma[:1]])
            alpha, beta = torch.cat([alpha, res.U[:, :1]], 1), torch.cat([beta, res.V[:, :1]], 1)
        terms, V = _gram_terms(form, sigma, alpha, beta, self.options.symmetric_factors)
        solve.V = [V[j] for j in solved]
        return self._finish(terms, past, rho), solve

    def _power(self, op: ZOperator | GramForm, v0: torch.Tensor | None, j: int, generator: torch.Generator) -> SVDResult:
        """The leading triplet of ``op``, started from column j of ``v0`` when there is one."""
        opts = self.options
        return power_svd(op, 1, tol=opts.power_tol, max_iters=opts.max_iters, v0=self._start_column(v0, j),
                         generator=generator)


class DeflationApproximator(_PowerDeflationApproximator):
    """``deflation``: Kronecker rank ``rank`` by successive power SVDs on the deflated block (§3.2.3.1).

    Term j is the leading triplet of Z(F − Σ_{i<j} R_i ⊗ S_i) = Z(F) − Σ_{i<j} vec(R_i)vec(S_i)ᵀ,
    one power SVD each on the deflated operator applied matrix-free
    (:func:`~curvlib.linalg.deflated`): the operator is really deflated, so the second
    power SVD cannot return the first pair again (DESIGN.md §10).  A deflated operator
    that is zero up to rounding (a block of Kronecker rank < ``rank``) gives zero terms
    (:func:`_deflation_vanishes`).  Cost per refresh (Table 3.1), directly: Σ_j (1 + 2·iterations
    of triplet j) products with Z(F), O(m·d²) each, plus O(j·d²) per product for the deflation;
    in the Gram space (module docstring): the Gram matrices, a warm start's sketched images per
    triplet and one weighted Gram GEMM per factor, plus O(n²) per iteration.
    """

    options_model = DeflationOptions
    kind = "deflation"

    def declared_blocks(self) -> BlockDeclaration:
        """Kronecker sums of exactly ``rank`` terms (those beyond the block's numerical Kronecker rank are zero)."""
        rank = self.options.rank
        return BlockDeclaration((KroneckerFactored,), terms=(rank, rank))

    def _rank(self) -> int:
        return self.options.rank


class KPSVDApproximator(_PowerDeflationApproximator):
    """``kpsvd``: the best single Kronecker product (3.22), by power SVD of Z(F_ii) (Thm 3.14).

    With ``symmetric_factors`` both factors are symmetric, and PSD for a PSD block
    (Prop. 3.2; the sign convention tr A > 0 selects the PSD pair).  Cost per refresh
    (Table 3.1): 1 + 2·iterations products with Z(F), O(m·d²) each, directly; in the Gram space
    the Gram matrices, the warm start's sketched images and the two factors' weighted Gram GEMMs
    (about twice KFAC's).
    """

    options_model = KPSVDOptions
    kind = "kpsvd"
    blocks = BlockDeclaration((KroneckerFactored,), terms=(1, 1))

    def _rank(self) -> int:
        return 1


class LanczosApproximator(_SVDApproximator):
    """``lanczos``: Kronecker rank ``rank`` from the top triplets of Z(F_ii) by restarted
    Lanczos bidiagonalization (§3.2.3.2, Algorithm 2; :func:`~curvlib.linalg.lanczos_svd`).

    When min(d_a², d_g²) < ``rank`` the missing terms are zero.  Cost per refresh (Table 3.1):
    steps × 2 products with Z(F), plus O(K³ + K·d²) per cycle, directly; in the Gram space the
    Gram matrices, the summed start's sketched images, and one weighted Gram GEMM per factor, plus
    O(n² + K·n) per step.
    """

    options_model = LanczosOptions
    kind = "lanczos"

    def declared_blocks(self) -> BlockDeclaration:
        """Kronecker sums of exactly ``rank`` terms (the missing ones zero)."""
        rank = self.options.rank
        return BlockDeclaration((KroneckerFactored,), terms=(rank, rank))

    def _fit_batch(self, stats, op, past, rho, v0, generator):
        base = self._base(op, past, rho)
        opts = self.options
        k = min(opts.rank, *base.shape)
        form = self._gram(base, k)
        res = lanczos_svd(
            base if form is None else form,
            k,
            krylov_dim=opts.krylov_dim,
            tol=opts.power_tol,
            max_restarts=opts.max_iters - 1,
            v0=v0,
            generator=generator,
        )
        solve = _Solve()
        solve.add(res, vectors=form is None)
        if form is None:
            terms = [self._term(res, j, stats) for j in range(k)]
        else:
            terms, solve.V = _gram_terms(form, res.sigma, res.U, res.V, opts.symmetric_factors)
        terms += [_zero_term(stats) for _ in range(opts.rank - k)]
        return self._finish(terms, past, rho), solve


class KFACCorrectedApproximator(_SVDApproximator):
    """``kfac_corrected``: A⊗G + P⊗Q, KFAC plus the best rank-1 correction of F_ii − A⊗G (3.26).

    (A, G) are the KFAC/KFC factors (:func:`~curvlib.curvatures.factors.kfac_factors`, in the
    chosen ``weight_sharing`` setting) of the block's untransposed uses — for a weight tied in
    transposed form (an embedding and an output layer) the transposed uses' part of F is left
    to the correction, which keeps the fit at two terms;
    (P, Q) come from the power SVD of Z(F − A⊗G) = Z(F) − vec(A)vec(G)ᵀ
    (:func:`~curvlib.linalg.deflated`).  The correction is usually indefinite; its sign
    follows :func:`~curvlib.linalg.factors_from_singular` (tr P > 0, else the largest
    entry of P positive).  Cost per refresh (Table 3.1): KFAC's two GEMMs plus the power SVD —
    in the Gram space (module docstring) A and G become one more column of X and Y (one
    quadratic form per row and factor), and Z(F) − vec(A)vec(G)ᵀ is a deflation of the core.
    """

    options_model = KFACCorrectedOptions
    kind = "kfac_corrected"
    #: A⊗G + P⊗Q (a zero correction when F = A⊗G)
    blocks = BlockDeclaration((KroneckerFactored,), terms=(2, 2))

    def _fit_batch(self, stats, op, past, rho, v0, generator):
        A, G = self._global_average(kfac_factors(stats, self.options.weight_sharing)[0])
        if past is not None:  # KFAC's own factor EMA, in both modes: ρ A0 + (1 − ρ) A
            (A0, G0) = past[0]
            A, G = torch.lerp(A, A0, rho), torch.lerp(G, G0, rho)
        base = self._base(op, past, rho)
        form = self._gram(base, 1)
        if form is not None:
            P, Q, solve = self._correction_gram(form, A, G, v0, generator)
        else:
            P, Q, solve = self._correction(stats, base, A, G, v0, generator)
        if past is not None and self.options.ema_mode == "factors":
            (P, Q), = _ema_terms(past[1:], [(P, Q)], rho)
        return [(A, G), (P, Q)], solve

    def _correction_gram(self, form: GramForm, A, G, v0, generator) -> tuple[torch.Tensor, torch.Tensor, _Solve]:
        """The correction in the Gram space: (A, G) become one more column of X and of Y (with
        coefficient 0), and Z(F) − vec(A)vec(G)ᵀ the deflation of the core by that column."""
        form = form.extended([(A, G)], 0.0)
        N = form.coefficient_shape[0]
        unit = torch.zeros(N, 1, dtype=form.work_dtype, device=form.device)
        unit[-1] = 1.0
        one = unit.new_ones(1)
        solve = _Solve()
        if _gram_vanishes(form, one, unit, unit, generator):
            solve.sigmas, solve.residuals = [0.0], [0.0]
            return (*_zero_term_like(A, G), solve)
        opts = self.options
        res = power_svd(form.deflated(one, unit, unit), 1, tol=opts.power_tol, max_iters=opts.max_iters,
                        v0=self._start_column(v0, 0), generator=generator)
        solve.add(res, vectors=False)
        (terms, solve.V) = _gram_terms(form, res.sigma, res.U, res.V, opts.symmetric_factors)
        return (*terms[0], solve)

    def _correction(self, stats, base, A, G, v0, generator) -> tuple[torch.Tensor, torch.Tensor, _Solve]:
        """The power SVD of Z(F − A⊗G) = Z(F) − vec(A)vec(G)ᵀ with the direct products."""
        solve = _Solve()
        if _deflation_vanishes(base, [(A, G)], generator):
            # F = A⊗G up to rounding (e.g. one sample, one column): no correction to fit
            P, Q = _zero_term(stats)
            solve.sigmas, solve.residuals = [0.0], [0.0]
        else:
            opts = self.options
            start = v0[:, 0] if v0 is not None else None
            res = power_svd(deflated(base, [(A, G)]), 1, tol=opts.power_tol, max_iters=opts.max_iters, v0=start, generator=generator)
            solve.add(res)
            P, Q = self._term(res, 0, stats)
        return P, Q, solve
