"""Generic solvers for the damped curvature systems: conjugate gradients and Woodbury.

- :func:`pcg` — batched preconditioned conjugate gradients, for (Σ_k A_k⊗B_k + λI)⁻¹
  (with :meth:`~curvlib.linalg.inverse.KroneckerEigen.tikhonov_solve` of the leading term
  as preconditioner).
- :class:`WoodburySolver` — (λI + (1/m) J Jᵀ)⁻¹ u by Sherman–Morrison–Woodbury (4.49)–(4.50);
  :func:`woodbury_solve`, its one-shot form.

Both take their operators as callables on 2-D blocks (``[n, k]``, ``[p, k]``), so the
matrices can stay matrix-free.  All computations run in the inputs' dtype and device;
nothing is upcast here (the eigendecomposition fallback of :class:`WoodburySolver` goes
through :func:`~curvlib.linalg.inverse.eigh_safe`, with its documented float64 retry).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from curvlib.errors import ConfigError, NotPSDError, NumericalError, NumericalWarning, ShapeError, warn
from curvlib.linalg.inverse import _check_same, _check_square, _positive_lambda, eigh_safe

__all__ = [
    "PCGInfo",
    "matrix_pcg",
    "pcg",
    "WoodburySolver",
    "woodbury_solve",
]


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
        breakdowns: columns stopped by the breakdown rule of :func:`pcg` (a curvature pᵀAp
            or rᵀM⁻¹r at rounding level: the column cannot make further progress in this
            precision); they count as not converged.
    """

    iterations: int
    relative_residual: torch.Tensor
    converged: bool
    breakdowns: int = 0


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

    Rounding rule.  For SPD A every curvature pᵀAp is > 0, but in floating point it is
    computed with an error of about u·‖p‖·‖Ap‖ (u the unit roundoff of the dtype); likewise
    rᵀM⁻¹r.  With δ = √n·u·‖p‖·‖Ap‖ (resp. √n·u·‖r‖·‖M⁻¹r‖):

    - pᵀAp > δ: an ordinary step;
    - |pᵀAp| ≤ δ, or 0 ≥ pᵀAp ≥ −δ: *breakdown* — the curvature along p is at rounding
      level, so the column cannot progress in this precision; it stops where it is (its
      iterate is the best CG reached) and is reported in :attr:`PCGInfo.breakdowns`
      (not converged);
    - pᵀAp < −δ: A is not positive definite, :class:`NotPSDError` (same for rᵀM⁻¹r < −δ
      and M).

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
        NotPSDError: a search direction p has pᵀAp < −δ, or the preconditioner gives
            rᵀM⁻¹r < −δ (the rounding rule above: clearly not positive definite).
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
    u = torch.finfo(B.dtype).eps / 2
    slack = math.sqrt(n) * u  # δ / (‖x‖‖y‖): the rounding error of an n-term inner product
    broken = torch.zeros_like(active)

    def curvature(X: torch.Tensor, Y: torch.Tensor, what: str, operator: str) -> tuple[torch.Tensor, torch.Tensor]:
        """xᵀy per column and which active columns break down (the rounding rule)."""
        dot = (X * Y).sum(dim=0)
        delta = slack * torch.linalg.vector_norm(X, dim=0) * torch.linalg.vector_norm(Y, dim=0)
        if bool((active & (dot < -delta)).any()):
            worst = float(dot[active & (dot < -delta)].min())
            raise NotPSDError(f"{caller}: the {operator} is not positive definite ({what} = {worst:.3e} < 0 beyond "
                              "rounding)")
        return dot, active & ~(dot > delta)

    Zr = apply(precond, R, "precond") if precond is not None else R
    rz, stop = curvature(R, Zr, "rᵀM⁻¹r", "preconditioner")
    broken |= stop
    active &= ~stop
    P = Zr.clone()
    iterations = 0
    while bool(active.any()) and iterations < max_iters:
        AP = apply(matvec, P, "matvec")
        iterations += 1
        pAp, stop = curvature(P, AP, "pᵀAp", "operator")
        broken |= stop
        active &= ~stop
        # finished columns take zero steps, so they are frozen where they converged (or broke down)
        alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        X = X + P * alpha
        R = R - AP * alpha
        active = active & (torch.linalg.vector_norm(R, dim=0) > target)
        Zr = apply(precond, R, "precond") if precond is not None else R
        rz_new, stop = curvature(R, Zr, "rᵀM⁻¹r", "preconditioner")
        broken |= stop
        active &= ~stop
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        P = Zr + P * beta
        rz = rz_new

    res = rel_res(R)
    converged = not bool((active | broken).any())
    x = X.squeeze(-1) if squeeze else X
    return x, PCGInfo(iterations=iterations, relative_residual=res.squeeze(-1) if squeeze else res, converged=converged,
                      breakdowns=int(broken.sum()))


def matrix_pcg(
    apply: Callable[[torch.Tensor], torch.Tensor],
    precond: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    lam: float,
    *,
    tol: float,
    max_iters: int | None,
) -> tuple[torch.Tensor, PCGInfo]:
    """(M + λI)⁻¹ vec(X) in matrix form by :func:`pcg`, for a layer block M given by products with
    batches of matrices: ``apply(M_k [k, d_g, d_a])`` -> M vec(M_k) in matrix form,
    ``precond(R [k, d_g, d_a])`` -> the preconditioner's solve; ``X [..., d_g, d_a]``, every
    matrix one PCG column.  Columns are row-major flattenings of the matrices — a fixed
    permutation of vec — so inner products, and hence CG, are unchanged."""
    d_g, d_a = X.shape[-2:]
    n = d_g * d_a
    batch = X.shape[:-2]
    b = X.reshape(-1, n).T

    def matvec(V: torch.Tensor) -> torch.Tensor:
        M = V.T.reshape(-1, d_g, d_a)
        return (apply(M) + lam * M).reshape(-1, n).T

    def solve(R: torch.Tensor) -> torch.Tensor:
        return precond(R.T.reshape(-1, d_g, d_a)).reshape(-1, n).T

    x, info = pcg(matvec, b, precond=solve, tol=tol, max_iters=max_iters)
    return x.T.reshape(*batch, d_g, d_a), info


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
            warn(
                f"{caller}: Cholesky of λm·I + JᵀJ [{n}, {n}] failed (leading minor {int(info)}); "
                "using an eigendecomposition with JᵀJ's eigenvalues clamped at 0",
                NumericalWarning,
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
