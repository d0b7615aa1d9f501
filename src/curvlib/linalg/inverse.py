"""Inverses of Kronecker-factored curvature blocks, and the solvers around them.

- :func:`eigh_safe` — symmetric eigendecomposition with the documented float64 retry
  (DESIGN.md §10, "float32 eigh on CPU fails").
- :func:`kron_solve` — (A⊗B)⁻¹ vec(X) = vec(B⁻¹ X A⁻ᵀ) (Thm 3.6 with Thm 3.13).
- :class:`KroneckerEigen` — (A⊗B + λI)⁻¹ in the joint eigenbasis ("normal damping", (4.54)).
- :func:`pi_split` — the factored damping (A + π√λ I) ⊗ (B + π⁻¹√λ I) of (2.95)–(2.96).
- :class:`TwoTermKroneckerInverse` — (A⊗B + C⊗D)⁻¹ by simultaneous diagonalization (§3.2.5),
  with an explicit floor on the joint eigenvalues when C⊗D is indefinite.
- :func:`pcg` — batched preconditioned conjugate gradients, for (Σ_k A_k⊗B_k + λI)⁻¹.
- :class:`WoodburySolver` — (λI + (1/m) J Jᵀ)⁻¹ u by Sherman–Morrison–Woodbury (4.49)–(4.50).

Orientation (DESIGN.md §1): a vector acted on by A⊗B, with A ``[d_a, d_a]`` and B
``[d_b, d_b]``, is vec(X) of a matrix X ``[d_b, d_a]`` (column-major vec), and
(A⊗B) vec(X) = vec(B X Aᵀ).  Every solve here takes and returns X in that matrix form,
batched over leading dimensions ``[..., d_b, d_a]``.

All computations run in the inputs' dtype and device.  The one documented upcast is the
float64 retry of :func:`eigh_safe`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from curvlib.errors import (
    ConfigError,
    DTypeDeviceError,
    NotPSDError,
    NumericalError,
    NumericalWarning,
    ShapeError,
)

__all__ = [
    "eigh_safe",
    "kron_solve",
    "KroneckerEigen",
    "pi_split",
    "TwoTermKroneckerInverse",
    "PCGInfo",
    "pcg",
    "WoodburySolver",
    "woodbury_solve",
]


# --------------------------------------------------------------------------- checks


def _check_square(M: torch.Tensor, name: str, caller: str, *, batched: bool = False) -> int:
    ok = M.ndim >= 2 if batched else M.ndim == 2
    if not ok or M.shape[-1] != M.shape[-2]:
        want = "[..., n, n]" if batched else "[n, n]"
        raise ShapeError(f"{caller}: {name} must be square {want}, got {list(M.shape)}")
    return int(M.shape[-1])


def _check_same(ref: torch.Tensor, other: torch.Tensor, names: str, caller: str) -> None:
    if other.dtype != ref.dtype or other.device != ref.device:
        raise DTypeDeviceError(
            f"{caller}: {names} must share dtype and device, got {ref.dtype} on {ref.device} "
            f"and {other.dtype} on {other.device}"
        )


def _check_rhs(X: torch.Tensor, d_b: int, d_a: int, caller: str) -> None:
    if X.ndim < 2 or X.shape[-2:] != (d_b, d_a):
        raise ShapeError(f"{caller}: X must be [..., d_b, d_a] = [..., {d_b}, {d_a}], got {list(X.shape)}")


def _positive_lambda(lam: float | torch.Tensor, caller: str, *, allow_zero: bool = False) -> float:
    lam = float(lam)
    ok = math.isfinite(lam) and (lam >= 0 if allow_zero else lam > 0)
    if not ok:
        bound = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(f"{caller}: the damping λ must be finite and {bound}, got {lam}")
    return lam


# --------------------------------------------------------------------------- eigh


def eigh_safe(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition of (M + Mᵀ)/2, robust to LAPACK failures.

    ``torch.linalg.eigh`` runs in M's dtype.  If it raises, or returns non-finite values
    (float32 on CPU does on factors with many exactly-zero rows, e.g. dead ReLUs;
    DESIGN.md §10), the decomposition is retried in float64 and cast back, with a
    :class:`NumericalWarning`.  This is the only float64 upcast of the module.

    Args:
        M: ``[..., n, n]`` symmetric (symmetrized here, since rounding in the factor's
            accumulation breaks exact symmetry).

    Returns:
        ``(evals [..., n], evecs [..., n, n])`` in ascending order, M's dtype and device.

    Raises:
        NumericalError: M has non-finite entries (the caller should keep its previous
            factors), or the float64 retry fails too.
    """
    caller = "eigh_safe"
    _check_square(M, "M", caller, batched=True)
    if not bool(torch.isfinite(M).all()):
        raise NumericalError(f"{caller}: input {list(M.shape)} has non-finite entries (expected a finite matrix)")
    S = 0.5 * (M + M.mT)
    reason = ""
    try:
        evals, evecs = torch.linalg.eigh(S)
        if bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all()):
            return evals, evecs
        reason = "returned non-finite values"
    except RuntimeError as exc:  # torch.linalg.LinAlgError derives from RuntimeError
        reason = f"raised {type(exc).__name__}: {exc}"
    if S.dtype == torch.float64:
        raise NumericalError(f"{caller}: float64 eigh of a {list(S.shape)} matrix {reason}")
    warnings.warn(
        f"{caller}: {S.dtype} eigh of a {list(S.shape)} matrix {reason}; retrying in float64",
        NumericalWarning,
        stacklevel=2,
    )
    try:
        evals, evecs = torch.linalg.eigh(S.to(torch.float64))
    except RuntimeError as exc:
        raise NumericalError(f"{caller}: float64 retry of eigh failed too: {exc}") from exc
    if not (bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all())):
        raise NumericalError(f"{caller}: float64 retry of eigh returned non-finite values")
    return evals.to(S.dtype), evecs.to(S.dtype)


# --------------------------------------------------------------------------- A ⊗ B


def kron_solve(A: torch.Tensor, B: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(A⊗B)⁻¹ vec(X) in matrix form: B⁻¹ X A⁻ᵀ (Thm 3.6 and Thm 3.13).

    Args:
        A: ``[d_a, d_a]`` invertible.
        B: ``[d_b, d_b]`` invertible.
        X: ``[..., d_b, d_a]``.

    Returns:
        ``[..., d_b, d_a]``, the matrix Y with (A⊗B) vec(Y) = vec(X).

    Raises:
        NumericalError: A or B is singular.
    """
    caller = "kron_solve"
    d_a = _check_square(A, "A", caller)
    d_b = _check_square(B, "B", caller)
    _check_same(A, B, "A and B", caller)
    _check_same(A, X, "A and X", caller)
    _check_rhs(X, d_b, d_a, caller)
    try:
        Y = torch.linalg.solve(B, X)  # B⁻¹ X
        # (B⁻¹X) A⁻ᵀ = (A⁻¹ (B⁻¹X)ᵀ)ᵀ
        return torch.linalg.solve(A, Y.mT).mT
    except RuntimeError as exc:
        raise NumericalError(f"{caller}: a Kronecker factor is singular ({exc})") from exc


@dataclass(frozen=True)
class KroneckerEigen:
    """Eigendecompositions A = Q_a diag(e_a) Q_aᵀ, B = Q_b diag(e_b) Q_bᵀ of one Kronecker term.

    Computed once per refresh (T2) and reused for every product.  A⊗B is diagonal in the
    joint basis Q_a⊗Q_b with eigenvalues e_a,i·e_b,j, which is what makes the Tikhonov
    ("normal") damping (4.54) exact.

    Attributes:
        eval_a: ``[d_a]`` ascending eigenvalues of A.
        evec_a: ``[d_a, d_a]`` orthonormal eigenvectors of A (columns).
        eval_b: ``[d_b]`` ascending eigenvalues of B.
        evec_b: ``[d_b, d_b]`` orthonormal eigenvectors of B (columns).
    """

    eval_a: torch.Tensor
    evec_a: torch.Tensor
    eval_b: torch.Tensor
    evec_b: torch.Tensor

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor) -> KroneckerEigen:
        """Decompose symmetric A ``[d_a, d_a]`` and B ``[d_b, d_b]`` with :func:`eigh_safe`."""
        caller = "KroneckerEigen.from_factors"
        _check_square(A, "A", caller)
        _check_square(B, "B", caller)
        _check_same(A, B, "A and B", caller)
        eval_a, evec_a = eigh_safe(A)
        eval_b, evec_b = eigh_safe(B)
        return cls(eval_a=eval_a, evec_a=evec_a, eval_b=eval_b, evec_b=evec_b)

    @property
    def joint_evals(self) -> torch.Tensor:
        """``[d_b, d_a]`` eigenvalues e_b,j·e_a,i of A⊗B, laid out like X (entry (j, i))."""
        return self.eval_b[:, None] * self.eval_a[None, :]

    def tikhonov_solve(self, X: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """(A⊗B + λI)⁻¹ vec(X) in matrix form ("normal damping", (4.54)).

            Q_b [ (Q_bᵀ X Q_a) ⊘ (max(e_b e_aᵀ, 0) + λ) ] Q_aᵀ

        Joint eigenvalues e_b,j·e_a,i below 0 are clamped at 0: for PSD factors they are
        rounding error, and in general the clamp solves with the PSD part of A⊗B, so the
        inverse stays bounded by 1/λ.

        Args:
            X: ``[..., d_b, d_a]``.
            lam: λ > 0.

        Returns:
            ``[..., d_b, d_a]``.
        """
        caller = "KroneckerEigen.tikhonov_solve"
        lam = _positive_lambda(lam, caller)
        _check_same(self.evec_a, X, "the decomposition and X", caller)
        _check_rhs(X, self.eval_b.shape[0], self.eval_a.shape[0], caller)
        Qa, Qb = self.evec_a, self.evec_b
        Y = Qb.T @ X @ Qa
        Y = Y / (self.joint_evals.clamp_min(0) + lam)
        return Qb @ Y @ Qa.T


def pi_split(A: torch.Tensor, B: torch.Tensor, lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The factored ("heuristic") Tikhonov damping of KFAC, (2.95)–(2.96) and end of §3.1.2.

        A⊗B + λI ≈ (A + π√λ I) ⊗ (B + π⁻¹√λ I),   π = sqrt( (tr A / d_a) / (tr B / d_b) ),

    with d_a, d_b the sizes of the factors (d_in + 1 and d_out for a Linear layer).
    If either trace is non-positive or non-finite, π = 1 with a :class:`NumericalWarning`.

    Args:
        A: ``[d_a, d_a]``.
        B: ``[d_b, d_b]``.
        lam: λ ≥ 0.

    Returns:
        ``(A + π√λ I [d_a, d_a], B + π⁻¹√λ I [d_b, d_b], π)``.
    """
    caller = "pi_split"
    d_a = _check_square(A, "A", caller)
    d_b = _check_square(B, "B", caller)
    _check_same(A, B, "A and B", caller)
    lam = _positive_lambda(lam, caller, allow_zero=True)
    mean_a = float(torch.diagonal(A).sum()) / d_a
    mean_b = float(torch.diagonal(B).sum()) / d_b
    if math.isfinite(mean_a) and math.isfinite(mean_b) and mean_a > 0 and mean_b > 0:
        pi = math.sqrt(mean_a / mean_b)
    else:
        warnings.warn(
            f"{caller}: traces must be positive and finite for (2.96), got tr(A)/d_a = {mean_a:.3e}, "
            f"tr(B)/d_b = {mean_b:.3e}; using π = 1",
            NumericalWarning,
            stacklevel=2,
        )
        pi = 1.0
    root = math.sqrt(lam)
    eye_a = torch.eye(d_a, dtype=A.dtype, device=A.device)
    eye_b = torch.eye(d_b, dtype=B.dtype, device=B.device)
    return A + (pi * root) * eye_a, B + (root / pi) * eye_b, pi


# --------------------------------------------------------------------------- A ⊗ B + C ⊗ D


def _spd_inverse_sqrt(M: torch.Tensor, name: str, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M^{-1/2}, M^{1/2})`` of a symmetric positive definite M ``[n, n]``."""
    e, Q = eigh_safe(M)
    e_max = float(e.abs().max())
    e_min = float(e.min())
    # an eigenvalue within rounding (eps·‖M‖) of zero makes M^{-1/2} noise: M is not
    # numerically positive definite
    if not e_min > torch.finfo(M.dtype).eps * e_max:
        raise NotPSDError(
            f"{caller}: {name} must be symmetric positive definite; its smallest eigenvalue is {e_min:.3e} "
            f"(largest {e_max:.3e}). Damp it first (e.g. with pi_split) before inverting A⊗B + C⊗D."
        )
    root = e.sqrt()
    return (Q / root) @ Q.T, (Q * root) @ Q.T


class TwoTermKroneckerInverse:
    """(A⊗B + C⊗D)⁻¹ by simultaneous diagonalization (§3.2.5, after Martens & Grosse).

    With A ``[d_a, d_a]``, B ``[d_b, d_b]`` SPD and C ``[d_a, d_a]``, D ``[d_b, d_b]``
    symmetric (possibly indefinite):

        A^{-1/2} C A^{-1/2} = E1 diag(s1) E1ᵀ,   B^{-1/2} D B^{-1/2} = E2 diag(s2) E2ᵀ,
        K1 = A^{-1/2} E1,  K2 = B^{-1/2} E2,

    so K1ᵀ A K1 = I, K1ᵀ C K1 = diag(s1) (likewise for K2), and

        (K1⊗K2)ᵀ (A⊗B + C⊗D) (K1⊗K2) = diag(μ),   μ [d_b, d_a],  μ_ji = 1 + s2_j s1_i.

    The solve is X ↦ K2 [(K2ᵀ X K1) ⊘ μ] K1ᵀ.

    Indefinite correction rule (DESIGN.md §10).  When C⊗D is indefinite (the second
    term of deflation or KFAC-corrected usually is), some μ_ji may be ≤ 0 and the sum is
    not positive definite.  Every μ_ji is replaced by max(μ_ji, ``floor``); the operator
    inverted is then exactly

        M = (A^{1/2}E1 ⊗ B^{1/2}E2) diag(vec(max(μ, floor))) (A^{1/2}E1 ⊗ B^{1/2}E2)ᵀ,

    which is symmetric positive definite, equals A⊗B + C⊗D on every joint eigendirection
    with μ_ji ≥ floor, and is never below ``floor``·(A⊗B) (μ is measured in units of
    A⊗B, so ``floor`` is scale-free).  :meth:`to_dense_matrix` returns M (tests only).

    Args:
        A: ``[d_a, d_a]`` SPD (symmetrized).
        B: ``[d_b, d_b]`` SPD (symmetrized).
        C: ``[d_a, d_a]`` symmetric (symmetrized).
        D: ``[d_b, d_b]`` symmetric (symmetrized).
        floor: the floor on the joint eigenvalues, > 0 (default 1e-2).

    Attributes:
        K1: ``[d_a, d_a]``;  K2: ``[d_b, d_b]``;  s1: ``[d_a]``;  s2: ``[d_b]``.
        mu: ``[d_b, d_a]`` joint eigenvalues 1 + s2 s1ᵀ before the floor.
        mu_clamped: ``[d_b, d_a]`` max(mu, floor), the ones used by :meth:`solve`.
        n_clamped: how many joint eigenvalues were raised to the floor.

    Raises:
        NotPSDError: A or B is not numerically positive definite (smallest eigenvalue
            ≤ eps(dtype)·largest); damp it first.
        ConfigError: ``floor`` ≤ 0.
    """

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
        *,
        floor: float = 1e-2,
    ) -> None:
        caller = "TwoTermKroneckerInverse"
        d_a = _check_square(A, "A", caller)
        d_b = _check_square(B, "B", caller)
        if C.shape != A.shape or D.shape != B.shape:
            raise ShapeError(
                f"{caller}: expected C [{d_a}, {d_a}] and D [{d_b}, {d_b}] to match A and B, "
                f"got C {list(C.shape)} and D {list(D.shape)}"
            )
        for name, M in (("B", B), ("C", C), ("D", D)):
            _check_same(A, M, f"A and {name}", caller)
        floor = float(floor)
        if not (math.isfinite(floor) and floor > 0):
            raise ConfigError(f"{caller}: floor must be finite and > 0, got {floor}")

        A_isqrt, A_sqrt = _spd_inverse_sqrt(0.5 * (A + A.T), "A", caller)
        B_isqrt, B_sqrt = _spd_inverse_sqrt(0.5 * (B + B.T), "B", caller)
        s1, E1 = eigh_safe(A_isqrt @ C @ A_isqrt)
        s2, E2 = eigh_safe(B_isqrt @ D @ B_isqrt)

        self.floor = floor
        self.s1, self.s2 = s1, s2
        self.K1, self.K2 = A_isqrt @ E1, B_isqrt @ E2
        # K^{-T} = A^{1/2} E: kept for to_dense_matrix, cheap (d² each)
        self._K1_invT, self._K2_invT = A_sqrt @ E1, B_sqrt @ E2
        self.mu = 1.0 + s2[:, None] * s1[None, :]
        self.mu_clamped = self.mu.clamp_min(floor)
        self.n_clamped = int((self.mu < floor).sum())

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_b, d_a)``, the shape of the matrices X that :meth:`solve` accepts."""
        return (self.K2.shape[0], self.K1.shape[0])

    def solve(self, X: torch.Tensor) -> torch.Tensor:
        """M⁻¹ vec(X) in matrix form: K2 [(K2ᵀ X K1) ⊘ max(μ, floor)] K1ᵀ.

        Args:
            X: ``[..., d_b, d_a]``.

        Returns:
            ``[..., d_b, d_a]``; equal to (A⊗B + C⊗D)⁻¹ vec(X) when ``n_clamped == 0``.
        """
        caller = "TwoTermKroneckerInverse.solve"
        _check_same(self.K1, X, "the inverse and X", caller)
        _check_rhs(X, *self.shape, caller)
        return self.K2 @ ((self.K2.T @ X @ self.K1) / self.mu_clamped) @ self.K1.T

    def to_dense_matrix(self) -> torch.Tensor:
        """The matrix M ``[d_a·d_b, d_a·d_b]`` that :meth:`solve` inverts (tests only).

        M = (K1⊗K2)⁻ᵀ diag(vec(max(μ, floor))) (K1⊗K2)⁻¹, in the column-major vec
        convention; M = A⊗B + C⊗D when nothing was clamped.
        """
        W = torch.kron(self._K1_invT, self._K2_invT)
        # vec of μ [d_b, d_a] stacks columns: entry (j, i) lands at i·d_b + j
        mu_vec = self.mu_clamped.T.reshape(-1)
        return (W * mu_vec) @ W.T


# --------------------------------------------------------------------------- PCG


@dataclass(frozen=True)
class PCGInfo:
    """Outcome of :func:`pcg`.

    Attributes:
        iterations: products with the operator (one per CG step; the initial residual of
            a given ``x0`` costs one more, not counted).
        relative_residual: ``[k]`` (``[]`` for a 1-D right-hand side) ‖b − A x‖/‖b‖ per
            column, from the CG recurrence (0 for a zero column of b).
        converged: every column reached ``tol``.
    """

    iterations: int
    relative_residual: torch.Tensor
    converged: bool


def pcg(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    *,
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
    x0: torch.Tensor | None = None,
    tol: float = 1e-8,
    max_iters: int | None = None,
) -> tuple[torch.Tensor, PCGInfo]:
    """Solve A x = b for SPD A by preconditioned conjugate gradients, all columns at once.

    Used for (Σ_k A_k⊗B_k + λI)⁻¹ with the Tikhonov inverse of the leading term
    (:meth:`KroneckerEigen.tikhonov_solve`) as preconditioner.  Each column of b runs its
    own CG recurrence (its own step sizes), batched into one product per step; a column
    stops moving once ‖r‖ ≤ tol·‖b‖.

    Args:
        matvec: X ``[n, k]`` -> A X ``[n, k]`` (always called with a 2-D block).
        b: ``[n]`` or ``[n, k]``.
        precond: R ``[n, k]`` -> M⁻¹ R ``[n, k]`` with M ≈ A SPD; default identity.
        x0: initial guess, shaped like b; default 0.
        tol: relative residual target, ≥ 0.
        max_iters: cap on CG steps; default 2n.

    Returns:
        ``(x, info)`` with x shaped like b and :class:`PCGInfo`.

    Raises:
        NotPSDError: a search direction p has pᵀAp ≤ 0, or the preconditioner gives
            rᵀM⁻¹r ≤ 0 (neither is positive definite).
    """
    caller = "pcg"
    squeeze = b.ndim == 1
    B = b.unsqueeze(-1) if squeeze else b
    if B.ndim != 2:
        raise ShapeError(f"{caller}: b must be [n] or [n, k], got {list(b.shape)}")
    n = B.shape[0]
    if not (math.isfinite(tol) and tol >= 0):
        raise ConfigError(f"{caller}: tol must be finite and ≥ 0, got {tol}")
    max_iters = 2 * n if max_iters is None else int(max_iters)
    if max_iters < 0:
        raise ConfigError(f"{caller}: max_iters must be ≥ 0, got {max_iters}")

    def apply(fn: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, what: str) -> torch.Tensor:
        Y = fn(X)
        if Y.shape != X.shape:
            raise ShapeError(
                f"{caller}: {what} must map [n, k] = {list(X.shape)} to the same shape, got {list(Y.shape)}"
            )
        return Y

    b_norm = torch.linalg.vector_norm(B, dim=0)
    if x0 is None:
        X = torch.zeros_like(B)
        R = B.clone()
    else:
        _check_same(b, x0, "b and x0", caller)
        if x0.shape != b.shape:
            raise ShapeError(f"{caller}: x0 must be shaped like b {list(b.shape)}, got {list(x0.shape)}")
        X = (x0.unsqueeze(-1) if squeeze else x0).clone()
        R = B - apply(matvec, X, "matvec")

    # a zero column of b is solved by x = 0 whatever x0 was
    zero_cols = b_norm == 0
    X[:, zero_cols] = 0
    R[:, zero_cols] = 0
    safe_b = torch.where(zero_cols, torch.ones_like(b_norm), b_norm)
    target = tol * b_norm

    def rel_res(R: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(R, dim=0) / safe_b

    active = torch.linalg.vector_norm(R, dim=0) > target
    Zr = apply(precond, R, "precond") if precond is not None else R
    rz = (R * Zr).sum(dim=0)
    P = Zr.clone()
    iterations = 0
    while bool(active.any()) and iterations < max_iters:
        if bool((rz[active] <= 0).any()):
            raise NotPSDError(f"{caller}: the preconditioner is not positive definite (rᵀM⁻¹r ≤ 0)")
        AP = apply(matvec, P, "matvec")
        iterations += 1
        pAp = (P * AP).sum(dim=0)
        if bool((pAp[active] <= 0).any()):
            worst = float(pAp[active].min())
            raise NotPSDError(f"{caller}: the operator is not positive definite (pᵀAp = {worst:.3e} ≤ 0)")
        # finished columns take zero steps, so they are frozen where they converged
        alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        X = X + P * alpha
        R = R - AP * alpha
        active = active & (torch.linalg.vector_norm(R, dim=0) > target)
        Zr = apply(precond, R, "precond") if precond is not None else R
        rz_new = (R * Zr).sum(dim=0)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        P = Zr + P * beta
        rz = rz_new

    res = rel_res(R)
    converged = not bool(active.any())
    x = X.squeeze(-1) if squeeze else X
    return x, PCGInfo(iterations=iterations, relative_residual=res.squeeze(-1) if squeeze else res, converged=converged)


# --------------------------------------------------------------------------- Woodbury


class WoodburySolver:
    """(λI_p + (1/m) J Jᵀ)⁻¹ by Sherman–Morrison–Woodbury, (4.49)–(4.50).

    With J ``[p, n]`` (n per-sample gradients as columns, (4.48)), (4.50) reads

        ζ = λ⁻¹ u − λ⁻² m⁻¹ J (I_n + (λm)⁻¹ JᵀJ)⁻¹ Jᵀ u  =  λ⁻¹ (u − J S⁻¹ Jᵀ u),
        S = λm I_n + JᵀJ  [n, n].

    S is factorized once (Cholesky; if that fails, an eigendecomposition of JᵀJ with its
    eigenvalues clamped at 0, with a :class:`NumericalWarning`); no p×p matrix is formed.
    J and Jᵀ are applied through callables, so they can stay matrix-free (appendix 4.B).

    Args:
        JtJ: ``[n, n]`` the Gram matrix JᵀJ.
        lam: λ > 0.
        m: the scale m > 0 of (4.48) (the batch size).
        J: w ``[n, k]`` -> J w ``[p, k]``.
        Jt: u ``[p, k]`` -> Jᵀ u ``[n, k]``.
    """

    def __init__(
        self,
        JtJ: torch.Tensor,
        lam: float | torch.Tensor,
        m: float,
        J: Callable[[torch.Tensor], torch.Tensor],
        Jt: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        caller = "WoodburySolver"
        n = _check_square(JtJ, "JtJ", caller)
        if not bool(torch.isfinite(JtJ).all()):
            raise NumericalError(f"{caller}: JtJ [{n}, {n}] has non-finite entries")
        self.lam = _positive_lambda(lam, caller)
        self.m = float(m)
        if not (math.isfinite(self.m) and self.m > 0):
            raise ConfigError(f"{caller}: m must be finite and > 0, got {m}")
        self.n = n
        self._J, self._Jt = J, Jt
        shift = self.lam * self.m
        G = 0.5 * (JtJ + JtJ.T)
        eye = torch.eye(n, dtype=JtJ.dtype, device=JtJ.device)
        L, info = torch.linalg.cholesky_ex(G + shift * eye)
        if int(info) == 0:
            self._chol: torch.Tensor | None = L
            self._eig: tuple[torch.Tensor, torch.Tensor] | None = None
        else:
            warnings.warn(
                f"{caller}: Cholesky of λm·I + JᵀJ [{n}, {n}] failed (leading minor {int(info)}); "
                "using an eigendecomposition with JᵀJ's eigenvalues clamped at 0",
                NumericalWarning,
                stacklevel=2,
            )
            e, Q = eigh_safe(G)
            self._chol = None
            self._eig = (Q, 1.0 / (e.clamp_min(0) + shift))

    @classmethod
    def from_matrix(cls, J: torch.Tensor, lam: float | torch.Tensor, m: float) -> WoodburySolver:
        """Build from a dense J ``[p, n]`` (JᵀJ computed here)."""
        if J.ndim != 2:
            raise ShapeError(f"WoodburySolver.from_matrix: J must be [p, n], got {list(J.shape)}")
        return cls(J.T @ J, lam, m, lambda w: J @ w, lambda u: J.T @ u)

    def _apply_S_inverse(self, T: torch.Tensor) -> torch.Tensor:
        if self._chol is not None:
            return torch.cholesky_solve(T, self._chol)
        Q, inv = self._eig  # type: ignore[misc]
        return Q @ (inv[:, None] * (Q.T @ T))

    def solve(self, u: torch.Tensor) -> torch.Tensor:
        """ζ = (λI + (1/m) J Jᵀ)⁻¹ u, (4.50).  u: ``[p]`` or ``[p, k]`` -> same shape."""
        caller = "WoodburySolver.solve"
        squeeze = u.ndim == 1
        U = u.unsqueeze(-1) if squeeze else u
        if U.ndim != 2:
            raise ShapeError(f"{caller}: u must be [p] or [p, k], got {list(u.shape)}")
        T = self._Jt(U)
        if T.shape != (self.n, U.shape[1]):
            raise ShapeError(f"{caller}: Jt must map [p, k] to [{self.n}, {U.shape[1]}], got {list(T.shape)}")
        Z = (U - self._J(self._apply_S_inverse(T))) / self.lam
        return Z.squeeze(-1) if squeeze else Z


def woodbury_solve(
    u: torch.Tensor,
    JtJ: torch.Tensor,
    lam: float | torch.Tensor,
    m: float,
    J: Callable[[torch.Tensor], torch.Tensor],
    Jt: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """One-shot (λI + (1/m) J Jᵀ)⁻¹ u, (4.50); see :class:`WoodburySolver` for the arguments."""
    return WoodburySolver(JtJ, lam, m, J, Jt).solve(u)
