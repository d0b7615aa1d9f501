"""``tikhonov``: the "normal" Tikhonov damping (2.94), (4.54).

λ adds λ·I to the block, and nothing else:

    M = Σ_k A_k ⊗ B_k + λ I_{p_i},        the inverse applied is M⁻¹.

- **One term** (kfac, kpsvd): exact in the joint eigenbasis of A_1 and B_1
  (:meth:`curvlib.linalg.KroneckerEigen.tikhonov_solve`), cost O(d³) per refresh and
  O(d_a d_g (d_a + d_g)) per product.  Joint eigenvalues e_a,i·e_g,j below 0 (rounding
  of PSD factors) count as 0, so the product is bounded by 1/λ.
- **Two or more terms** (deflation, lanczos, kfac_corrected): ``method="pcg"`` (default)
  runs preconditioned conjugate gradients on the matrix-free operator
  X ↦ Σ_k B_k X A_kᵀ + λX, preconditioned by the exact Tikhonov inverse of the leading
  term (A_1⊗B_1 + λI)⁻¹; no p_i×p_i matrix is formed.  ``method="exact"`` forms M
  densely and Cholesky-factorizes it, for blocks with p_i ≤ ``dense_max`` only (with a
  :class:`PerformanceWarning`; larger blocks are refused).
- **Exact blocks** (``exact_block``): delegated to ``block.tikhonov_solve(X, λ)``.

Indefinite sums.  The correction terms of deflation and kfac_corrected are usually
indefinite; when one is larger than λ, M is not positive definite.  PCG detects it by
meeting negative curvature (pᵀMp ≤ 0), the dense method by a failed Cholesky.  The
documented fallback ("psd_part") then replaces every Kronecker term by its positive
semi-definite part,

    psd(A_k⊗B_k) = A_k⁺⊗B_k⁺ + A_k⁻⊗B_k⁻      (A = A⁺ − A⁻ split by eigenvalue sign),

i.e. the negative eigenvalues of each term (products e_a,i·e_g,j < 0) are dropped, and
solves with M_psd = Σ_k psd(A_k⊗B_k) + λI ⪰ λI, with a :class:`NumericalWarning`.  For
the PCG method the fallback is taken on the first solve that meets negative curvature and
kept for every later solve of that inverse (until the next refresh); ``info.fallback``
says so.  A right-hand side that never excites a negative direction is solved with M
itself (which is then what PCG computes); ``info.certified_definite`` tells whether
Weyl's bound λ + Σ_k λ_min(A_k⊗B_k) > 0 proved M definite beforehand.

PCG's rounding rule (:func:`curvlib.linalg.pcg`) tells negative curvature beyond rounding
(the fallback above) from curvature at rounding level (a column's *breakdown*: it stops
where it is, reported as not converged).  If the PSD part itself fails in the dtype (λ below
the rounding level of the factors: a negative curvature beyond rounding, or a non-finite
solution from a finite right-hand side), the last fallback ("leading_term") applies the
exact Tikhonov inverse of the leading term, (A_1⊗B_1 + λI)⁻¹ — the preconditioner itself,
closed-form and ⪰ λI, so a solve never raises mid-training.
"""

from __future__ import annotations

import math
from dataclasses import replace as _replace
from typing import Any, Literal

import torch
from pydantic import Field

from curvlib.config import StrictModel
from curvlib.damping.base import (
    BlockInverse,
    BlockRequirement,
    Damping,
    InverseInfo,
    psd_part_terms,
)
from curvlib.errors import ConfigError, NotPSDError, NumericalError, NumericalWarning, PerformanceWarning, warn
from curvlib.linalg import (
    FactorEigenbasis,
    KroneckerEigen,
    KroneckerFactored,
    KroneckerSum,
    ShiftSolvable,
    eigh_safe,
    matrix_pcg,
)

__all__ = [
    "TikhonovOptions",
    "TikhonovDamping",
    "EigenTikhonovInverse",
    "PCGTikhonovInverse",
    "DenseTikhonovInverse",
    "ExactBlockTikhonovInverse",
]


class TikhonovOptions(StrictModel):
    """Options of the ``tikhonov`` damping: M = Σ_k A_k⊗B_k + λI, inverse M⁻¹.

    Attributes:
        value: λ > 0, added to every eigenvalue of the block ((2.94), (4.54)).
        method: for sums of two or more terms: ``"pcg"`` (matrix-free, default) or
            ``"exact"`` (dense Cholesky, only for p_i ≤ ``dense_max``).  One-term sums
            are always solved exactly in the joint eigenbasis.
        pcg_tol: PCG's relative residual target; ``None`` = √eps of the block's dtype
            (≈ 1.5e-8 in float64, 3.5e-4 in float32).
        pcg_max_iters: cap on PCG steps per solve (a :class:`NumericalWarning` when hit).
        dense_max: the largest p_i = d_a·d_g that ``method="exact"`` accepts.
    """

    value: float = Field(gt=0, allow_inf_nan=False, description="λ > 0 of M = Σ_k A_k⊗B_k + λI")
    method: Literal["pcg", "exact"] = "pcg"
    pcg_tol: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    pcg_max_iters: int = Field(200, ge=1)
    dense_max: int = Field(2048, ge=1)


class TikhonovDamping(Damping):
    """``tikhonov``: M = Σ_k A_k⊗B_k + λI ("normal damping", (2.94), (4.54)); applies M⁻¹."""

    kind = "tikhonov"
    options_model = TikhonovOptions
    requires = BlockRequirement(
        (KroneckerFactored, ShiftSolvable),
        reason="(Σ_k A_k⊗B_k + λI)⁻¹ (4.54) is solved from the Kronecker factors, or by the block's own exact "
               "tikhonov_solve",
    )

    def inverse_capabilities(self, block: tuple[type, ...], terms: int | None) -> tuple[type, ...]:
        """One Kronecker term: the joint eigenbasis (:class:`EigenTikhonovInverse`); several: PCG
        or a dense Cholesky, which expose nothing; a shift-solvable block: its own solve."""
        kronecker = any(issubclass(c, KroneckerFactored) for c in block)
        return (FactorEigenbasis,) if kronecker and terms == 1 else ()

    def _invert(self, block: Any) -> BlockInverse:
        opts: TikhonovOptions = self.options
        lam = self.value
        if not isinstance(block, KroneckerFactored):
            if not isinstance(block, ShiftSolvable):
                raise ConfigError(f"damping 'tikhonov': {type(block).__name__} has neither Kronecker factors nor its own "
                                  "tikhonov_solve; a block that carries its inverse factors takes 'inverse_factors'")
            return ExactBlockTikhonovInverse(block, lam, kind=self.kind)
        terms = block.terms
        if len(terms) == 1:
            A, B = terms[0]
            return EigenTikhonovInverse(_shifted_eigen(A, B, lam), lam, kind=self.kind)
        if opts.method == "exact":
            return DenseTikhonovInverse(terms, lam, dense_max=opts.dense_max, kind=self.kind)
        tol = opts.pcg_tol if opts.pcg_tol is not None else math.sqrt(torch.finfo(terms[0][0].dtype).eps)
        return PCGTikhonovInverse(terms, lam, tol=tol, max_iters=opts.pcg_max_iters, kind=self.kind)


# --------------------------------------------------------------------------- one term


class EigenTikhonovInverse(BlockInverse, FactorEigenbasis):
    """(A⊗B + λI)⁻¹ in the joint eigenbasis of A and B (4.54).

        X ↦ Q_b [(Q_bᵀ X Q_a) ⊘ (max(e_b e_aᵀ, 0) + λ)] Q_aᵀ

    Args:
        eig: :class:`~curvlib.linalg.KroneckerEigen` of A ``[d_a, d_a]`` and B ``[d_g, d_g]``.
        lam: λ > 0.
    """

    def __init__(self, eig: KroneckerEigen, lam: float, *, kind: str = "tikhonov") -> None:
        super().__init__(
            a_dim=eig.eval_a.shape[0],
            b_dim=eig.eval_b.shape[0],
            dtype=eig.evec_a.dtype,
            device=eig.evec_a.device,
            info=InverseInfo(kind=kind, method="eigen", lam=float(lam)),
        )
        self._eig = eig
        self._eigen = eig  # reused by the spectral coarse space (4.28)–(4.30)
        self._lam = float(lam)

    @property
    def eigen(self) -> KroneckerEigen:
        return self._eigen

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        return self._eig.tikhonov_solve(X, self._lam)


# --------------------------------------------------------------------------- several terms


def _shifted_eigen(A: torch.Tensor, B: torch.Tensor, lam: float) -> KroneckerEigen:
    """Eigendecompositions of A ``[d_a, d_a]`` and B ``[d_g, d_g]``, computed on the damped
    A + s_a I and B + s_g I and shifted back (DESIGN.md §10: damp before decomposing;
    :func:`~curvlib.linalg.eigh_safe` adds the float64 retry).

    The shifts are those of the π-split, s_a = π√λ and s_g = √λ/π with π from (2.96)
    (π = 1 when a trace is not positive), so the shift-back perturbs a joint eigenvalue
    e_a e_g by O(eps·(‖A‖ + s_a)(‖B‖ + s_g)), negligible against the λ it is added to.
    """
    d_a, d_g = A.shape[0], B.shape[0]
    mean_a = float(torch.diagonal(A).sum()) / d_a
    mean_b = float(torch.diagonal(B).sum()) / d_g
    pi = math.sqrt(mean_a / mean_b) if mean_a > 0 and mean_b > 0 else 1.0
    s_a, s_g = pi * math.sqrt(lam), math.sqrt(lam) / pi
    e_a, Q_a = eigh_safe(A + s_a * torch.eye(d_a, dtype=A.dtype, device=A.device))
    e_b, Q_b = eigh_safe(B + s_g * torch.eye(d_g, dtype=B.dtype, device=B.device))
    return KroneckerEigen(eval_a=e_a - s_a, evec_a=Q_a, eval_b=e_b - s_g, evec_b=Q_b)


def _term_eigs(terms, lam: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = []
    for A, B in terms:
        eig = _shifted_eigen(A, B, lam)
        out.append((eig.eval_a, eig.evec_a, eig.eval_b, eig.evec_b))
    return out


def _weyl_lower_bound(eigs, lam: float) -> float:
    """λ + Σ_k λ_min(A_k⊗B_k) ≤ λ_min(M) (Weyl); λ_min(A⊗B) is the smallest product of
    extreme eigenvalues of A and B."""
    total = lam
    for e_a, _, e_b, _ in eigs:
        a = (float(e_a.min()), float(e_a.max()))
        b = (float(e_b.min()), float(e_b.max()))
        total += min(x * y for x in a for y in b)
    return total


class PCGTikhonovInverse(BlockInverse):
    """(Σ_k A_k⊗B_k + λI)⁻¹ by PCG, preconditioned by (A_1⊗B_1 + λI)⁻¹ (exact, eigenbasis).

    Every term's factors are eigendecomposed here, once (the leading term's for the
    preconditioner, the others for the "psd_part" fallback of the module docstring);
    :meth:`solve` only multiplies.  A batch of right-hand sides ``[..., d_g, d_a]`` is
    solved as one block of PCG columns.

    Args:
        terms: pairs ``(A_k [d_a, d_a], B_k [d_g, d_g])``, k ≥ 2.
        lam: λ > 0.
        tol: PCG's relative residual target.
        max_iters: cap on PCG steps per solve.
    """

    def __init__(self, terms, lam: float, *, tol: float, max_iters: int, kind: str = "tikhonov") -> None:
        A0, B0 = terms[0]
        self._op = KroneckerSum(terms)
        self._eigs = _term_eigs(terms, lam)
        e_a, Q_a, e_b, Q_b = self._eigs[0]
        self._precond = KroneckerEigen(eval_a=e_a, evec_a=Q_a, eval_b=e_b, evec_b=Q_b)
        self._psd_op: KroneckerSum | None = None
        self._leading_only = False
        self._lam = float(lam)
        self._tol = float(tol)
        self._max_iters = int(max_iters)
        super().__init__(
            a_dim=A0.shape[0],
            b_dim=B0.shape[0],
            dtype=A0.dtype,
            device=A0.device,
            info=InverseInfo(
                kind=kind,
                method="pcg",
                lam=self._lam,
                certified_definite=_weyl_lower_bound(self._eigs, self._lam) > 0,
            ),
        )

    @property
    def fallback_taken(self) -> bool:
        """Whether a fallback ("psd_part" or "leading_term") replaced the operator."""
        return self._psd_op is not None or self._leading_only

    def _run(self, op: KroneckerSum, X: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return matrix_pcg(op.apply, lambda R: self._precond.tikhonov_solve(R, self._lam), X, self._lam,
                          tol=self._tol, max_iters=self._max_iters)

    def _fall_back(self, why: str) -> None:
        """Take the next documented fallback: M → psd_part → leading_term (module docstring)."""
        if self._psd_op is None:
            warn(
                f"PCGTikhonovInverse: Σ_k A_k⊗B_k + λI (λ = {self._lam:.3e}, {self._op.rank} terms, "
                f"p_i = {self.shape[0]}) {why}; falling back to the PSD part of every Kronecker term, "
                "Σ_k (A_k⁺⊗B_k⁺ + A_k⁻⊗B_k⁻) + λI, for this and later solves",
                NumericalWarning,
            )
            self._psd_op = KroneckerSum(psd_part_terms(self._eigs))
            self._info = _replace(self._info, fallback="psd_part")
            return
        warn(
            f"PCGTikhonovInverse: the PSD part + λI (λ = {self._lam:.3e}, p_i = {self.shape[0]}) {why} in "
            f"{self.dtype} (λ is below the rounding level of the factors); falling back to the exact Tikhonov "
            "inverse of the leading term, (A_1⊗B_1 + λI)⁻¹, for this and later solves",
            NumericalWarning,
        )
        self._leading_only = True
        self._info = _replace(self._info, fallback="leading_term")

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        # the fallbacks cannot throw: the last one is the preconditioner's closed form, ⪰ λI
        finite_rhs = bool(torch.isfinite(X).all())
        while not self._leading_only:
            op = self._op if self._psd_op is None else self._psd_op
            try:
                Y, info = self._run(op, X)
            except NotPSDError as exc:
                self._fall_back(f"is not positive definite ({exc})")
                continue
            if finite_rhs and not bool(torch.isfinite(Y).all()):
                self._fall_back("gave a non-finite solution from a finite right-hand side")
                continue
            break
        else:
            return self._precond.tikhonov_solve(X, self._lam)
        rel = float(info.relative_residual.max()) if info.relative_residual.numel() else 0.0
        self._info = _replace(self._info, iterations=info.iterations, converged=info.converged, relative_residual=rel)
        if not info.converged:
            stalled = f" ({info.breakdowns} column(s) broke down at rounding level)" if info.breakdowns else ""
            warn(
                f"PCGTikhonovInverse: PCG stopped after {info.iterations} iterations at relative residual "
                f"{rel:.3e} > pcg_tol = {self._tol:.1e} (p_i = {self.shape[0]}){stalled}; raise pcg_max_iters or λ",
                NumericalWarning,
            )
        return Y


class DenseTikhonovInverse(BlockInverse):
    """(Σ_k A_k⊗B_k + λI)⁻¹ by a dense Cholesky factorization (small blocks only).

    Forms M ``[p_i, p_i]`` once, with a :class:`PerformanceWarning`.  If M is not positive
    definite (Cholesky fails), the "psd_part" fallback of the module docstring is
    factorized instead, with a :class:`NumericalWarning`.

    Args:
        terms: pairs ``(A_k [d_a, d_a], B_k [d_g, d_g])``.
        lam: λ > 0.
        dense_max: the largest p_i accepted.

    Raises:
        ConfigError: p_i > ``dense_max`` (use ``method="pcg"``).
    """

    def __init__(self, terms, lam: float, *, dense_max: int, kind: str = "tikhonov") -> None:
        A0, B0 = terms[0]
        d_a, d_g = A0.shape[0], B0.shape[0]
        p = d_a * d_g
        if p > dense_max:
            raise ConfigError(
                f"tikhonov method='exact': the block has p_i = d_a·d_g = {d_a}·{d_g} = {p} > dense_max = {dense_max}; "
                "a dense p_i×p_i solve is refused for real layers: use method='pcg' (or raise dense_max)"
            )
        warn(
            f"tikhonov method='exact' forms a dense [{p}, {p}] matrix and factorizes it (O(p_i³) = O(d⁶))",
            PerformanceWarning,
        )
        self._lam = float(lam)
        eye = torch.eye(p, dtype=A0.dtype, device=A0.device)
        M = KroneckerSum(terms).to_dense()
        L, info = torch.linalg.cholesky_ex(0.5 * (M + M.T) + self._lam * eye)
        fallback = None
        if int(info) != 0:
            warn(
                f"DenseTikhonovInverse: Σ_k A_k⊗B_k + λI (λ = {self._lam:.3e}, p_i = {p}) is not positive "
                f"definite (Cholesky failed at leading minor {int(info)}); falling back to the PSD part of "
                "every Kronecker term, Σ_k (A_k⁺⊗B_k⁺ + A_k⁻⊗B_k⁻) + λI",
                NumericalWarning,
            )
            M = KroneckerSum(psd_part_terms(_term_eigs(terms, self._lam))).to_dense()
            L, info = torch.linalg.cholesky_ex(0.5 * (M + M.T) + self._lam * eye)
            if int(info) != 0:
                raise NumericalError(
                    f"DenseTikhonovInverse: Cholesky of the PSD part + λI (λ = {self._lam:.3e}) failed at "
                    f"leading minor {int(info)}; expected a matrix ⪰ λI"
                )
            fallback = "psd_part"
        self._chol = L
        super().__init__(
            a_dim=d_a,
            b_dim=d_g,
            dtype=A0.dtype,
            device=A0.device,
            info=InverseInfo(kind=kind, method="dense", lam=self._lam, fallback=fallback),
        )

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        d_g, d_a = self.b_dim, self.a_dim
        batch = X.shape[:-2]
        # vec(X) of each matrix as a column: column-major = transpose then row-major
        cols = X.reshape(-1, d_g, d_a).mT.reshape(-1, d_a * d_g).T
        Y = torch.cholesky_solve(cols, self._chol)
        return Y.T.reshape(-1, d_a, d_g).mT.reshape(*batch, d_g, d_a)


# --------------------------------------------------------------------------- exact blocks


class ExactBlockTikhonovInverse(BlockInverse):
    """(F_ii + λI)⁻¹ of an exact block, delegated to ``block.tikhonov_solve(X, λ)``.

    Args:
        block: exposes ``a_dim``, ``b_dim``, ``dtype``, ``device`` and
            ``tikhonov_solve(X [..., d_g, d_a], lam) -> [..., d_g, d_a]``.
        lam: λ > 0.
    """

    def __init__(self, block: Any, lam: float, *, kind: str = "tikhonov") -> None:
        self._block = block
        self._lam = float(lam)
        super().__init__(
            a_dim=int(block.a_dim),
            b_dim=int(block.b_dim),
            dtype=block.dtype,
            device=block.device,
            info=InverseInfo(kind=kind, method="exact_block", lam=self._lam),
        )

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        return self._block.tikhonov_solve(X, self._lam)
