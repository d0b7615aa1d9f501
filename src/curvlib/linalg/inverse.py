"""Inverses of Kronecker-factored curvature blocks.

- :func:`eigh_safe` — symmetric eigendecomposition with the documented float64 retry
  (DESIGN.md §10, "float32 eigh on CPU fails").
- :func:`kron_solve` — (A⊗B)⁻¹ vec(X) = vec(B⁻¹ X A⁻ᵀ) (Thm 3.6 with Thm 3.13).
- :class:`KroneckerEigen` — (A⊗B + λI)⁻¹ in the joint eigenbasis ("normal damping", (4.54)).
- :func:`pi_split` — the factored damping (A + π√λ I) ⊗ (B + π⁻¹√λ I) of (2.95)–(2.96).
- :class:`TwoTermKroneckerInverse` — (A⊗B + C⊗D)⁻¹ by simultaneous diagonalization (§3.2.5),
  with an explicit floor on the joint eigenvalues when C⊗D is indefinite.

The generic solvers that use them (conjugate gradients, Woodbury) are in
:mod:`curvlib.linalg.solvers`.

Orientation (DESIGN.md §1): a vector acted on by A⊗B, with A ``[d_a, d_a]`` and B
``[d_b, d_b]``, is vec(X) of a matrix X ``[d_b, d_a]`` (column-major vec), and
(A⊗B) vec(X) = vec(B X Aᵀ).  Every solve here takes and returns X in that matrix form,
batched over leading dimensions ``[..., d_b, d_a]``.

All computations run in the inputs' dtype and device.  The one documented upcast is the
float64 retry of :func:`eigh_safe`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from curvlib.errors import (
    ConfigError,
    DTypeDeviceError,
    NotPSDError,
    NumericalError,
    NumericalWarning,
    ShapeError,
    warn,
)

__all__ = [
    "eigh_safe",
    "kron_solve",
    "KroneckerEigen",
    "pi_split",
    "cholesky_inverses",
    "TwoTermKroneckerInverse",
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
    warn(
        f"{caller}: {S.dtype} eigh of a {list(S.shape)} matrix {reason}; retrying in float64",
        NumericalWarning,
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


def pi_split(
    A: torch.Tensor, B: torch.Tensor, lam: float | torch.Tensor, *, traces: tuple[float, float] | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The factored ("heuristic") Tikhonov damping of KFAC, (2.95)–(2.96) and end of §3.1.2.

        A⊗B + λI ≈ (A + π√λ I) ⊗ (B + π⁻¹√λ I),   π = sqrt( (tr A / d_a) / (tr B / d_b) ),

    with d_a, d_b the sizes of the factors (d_in + 1 and d_out for a Linear layer).
    If either trace is non-positive or non-finite, π = 1 with a :class:`NumericalWarning`.

    Args:
        A: ``[d_a, d_a]``.
        B: ``[d_b, d_b]``.
        lam: λ ≥ 0.
        traces: ``(tr A, tr B)`` when the caller has read them already (e.g. every layer's in
            one host synchronisation); read here otherwise.

    Returns:
        ``(A + π√λ I [d_a, d_a], B + π⁻¹√λ I [d_b, d_b], π)``.
    """
    caller = "pi_split"
    d_a = _check_square(A, "A", caller)
    d_b = _check_square(B, "B", caller)
    _check_same(A, B, "A and B", caller)
    lam = _positive_lambda(lam, caller, allow_zero=True)
    tr_a, tr_b = (float(torch.diagonal(A).sum()), float(torch.diagonal(B).sum())) if traces is None else traces
    mean_a, mean_b = tr_a / d_a, tr_b / d_b
    if math.isfinite(mean_a) and math.isfinite(mean_b) and mean_a > 0 and mean_b > 0:
        pi = math.sqrt(mean_a / mean_b)
    else:
        warn(
            f"{caller}: traces must be positive and finite for (2.96), got tr(A)/d_a = {mean_a:.3e}, "
            f"tr(B)/d_b = {mean_b:.3e}; using π = 1",
            NumericalWarning,
        )
        pi = 1.0
    root = math.sqrt(lam)
    return _shifted(A, pi * root), _shifted(B, root / pi), pi


def _shifted(M: torch.Tensor, c: float) -> torch.Tensor:
    """M + c·I in one pass over M (no identity matrix built)."""
    out = M.clone(memory_format=torch.contiguous_format)
    out.diagonal().add_(c)
    return out


def cholesky_inverses(matrices: Sequence[torch.Tensor], *, batch: bool | None = None) -> list[torch.Tensor | None]:
    """M⁻¹ of each symmetric matrix that is positive definite in its dtype, ``None`` for the others.

    On an accelerator the matrices of one shape, dtype and device are factored together: one
    batched ``torch.linalg.cholesky_ex`` and one batched ``torch.cholesky_inverse`` per group
    (the layers of equal width of a network, e.g. the mirrored halves of an auto-encoder),
    and one host synchronisation in all reads every factorisation's status.  On the CPU each
    matrix is factored alone, its Cholesky factor in one reused scratch buffer: LAPACK loops
    over a batch anyway, and stacking copies every matrix (the full MNIST auto-encoder's 16
    factors, one thread: 132–133 ms batched, 120–121 ms alone, in two runs).  Each matrix goes
    through the same LAPACK (or cuSOLVER) routine as it would alone, so the result equals
    ``cholesky_inverse(cholesky(M))`` per matrix to rounding (a matrix inside a batch is not
    aligned in memory as one alone is, and BLAS may round its last bits differently; the
    same matrices in the same order give the same bits).  Cholesky reads one triangle, and
    the inverse returned is exactly symmetric — and row-major: LAPACK's column-major result is
    returned transposed, the same matrix, so that a row-major copy of it (e.g.
    :func:`~curvlib.linalg.row_aligned`) reads it in order (d = 1001, one CPU thread: 0.09 ms
    against 0.65 for the strided read).  The inverses of a group are views into one batch
    tensor.

    Args:
        matrices: ``[n_i, n_i]`` symmetric matrices (any mix of sizes, dtypes, devices).
        batch: factor the matrices of one shape together (``True``) or each alone
            (``False``); ``None`` (default): together on an accelerator, alone on the CPU.

    Returns:
        the inverses, in order; ``None`` where the Cholesky factorisation failed (M not
        numerically positive definite): the caller decides what to do with such a matrix.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    alone: list[int] = []
    for i, M in enumerate(matrices):
        _check_square(M, f"matrices[{i}]", "cholesky_inverses")
        together = batch if batch is not None else M.device.type != "cpu"
        if together:
            groups.setdefault((M.shape, M.dtype, M.device), []).append(i)
        else:
            alone.append(i)
    out: list[torch.Tensor | None] = [None] * len(matrices)
    _factor_alone(matrices, alone, out)
    factored, infos = [], []
    for members in groups.values():
        stacked = torch.stack([matrices[i] for i in members])
        L, info = torch.linalg.cholesky_ex(stacked)
        factored.append((members, L))
        infos.append(info.to(device=infos[0].device) if infos else info)
    ok = torch.cat(infos).eq(0).tolist() if infos else []  # the one host synchronisation
    position = 0
    for members, L in factored:
        good = ok[position:position + len(members)]
        position += len(members)
        kept = [j for j, g in enumerate(good) if g]  # a failed factor is never handed to cholesky_inverse
        if kept:
            inverse = torch.cholesky_inverse(L if len(kept) == len(members) else L[kept])
            for row, j in enumerate(kept):
                out[members[j]] = inverse[row].mT  # exactly symmetric: the same matrix, row-major
    return out


def _factor_alone(matrices: Sequence[torch.Tensor], indices: list[int], out: list[torch.Tensor | None]) -> None:
    """:func:`cholesky_inverses` of ``matrices[i]`` for i in ``indices``, one at a time (the CPU
    path: reading a status is no device synchronisation there).  The Cholesky factors are
    written into one scratch buffer per dtype and device, sized for the largest matrix and
    reused (column-major, LAPACK's layout): a factor never leaves this function, and the
    inversion asks the allocator for the inverses only, not for a second matrix per factor."""
    scratch: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
    for i in indices:
        M = matrices[i]
        if M.requires_grad and torch.is_grad_enabled():  # out= does not differentiate
            L, info = torch.linalg.cholesky_ex(M)
        else:
            key = (M.dtype, M.device)
            if key not in scratch:
                size = max(matrices[j].shape[0] ** 2 for j in indices if (matrices[j].dtype, matrices[j].device) == key)
                scratch[key] = (torch.empty(size, dtype=M.dtype, device=M.device),
                                torch.empty((), dtype=torch.int32, device=M.device))
            flat, status = scratch[key]
            n = M.shape[0]
            L, info = torch.linalg.cholesky_ex(M, out=(flat[:n * n].view(n, n).mT, status))
        if int(info) == 0:  # a failed factor is never handed to cholesky_inverse
            out[i] = torch.cholesky_inverse(L).mT  # exactly symmetric: the same matrix, row-major


# --------------------------------------------------------------------------- A ⊗ B + C ⊗ D


def _whitening(M: torch.Tensor, name: str, caller: str) -> torch.Tensor:
    """W ``[n, n]`` with W M Wᵀ = I for a symmetric M ``[n, n]`` that is positive definite in
    its dtype (smallest eigenvalue above eps·the largest; :class:`NotPSDError` otherwise).

    W = L⁻¹ of the Cholesky factor M = LLᵀ (the reduction LAPACK's ``sygv`` makes) when the
    factorisation succeeds and two cheap bounds certify the eigenvalue condition:
    λ_min ≥ 1/tr(M⁻¹) = 1/‖L⁻¹‖²_F and λ_max ≤ ‖M‖_∞.  Otherwise the condition is checked
    exactly on M's eigendecomposition and W = M^{-1/2}.  Any whitening gives the same
    simultaneous diagonalization; the Cholesky one costs a factorisation and a triangular
    inverse instead of an eigendecomposition (n = 785, one CPU thread: 15 ms against 51 ms,
    plus the GEMM that forms M^{-1/2}).
    """
    n = M.shape[0]
    eps = torch.finfo(M.dtype).eps
    L, info = torch.linalg.cholesky_ex(M)
    W = torch.linalg.solve_triangular(L, torch.eye(n, dtype=M.dtype, device=M.device), upper=False)
    lowest = 1.0 / torch.linalg.vector_norm(W).square()  # ≤ λ_min when L is M's factor
    certified = (info == 0) & (lowest > eps * M.abs().sum(-1).amax())  # NaN of a failed factor: False
    if bool(certified):  # the one host read of the Cholesky route
        return W
    e, Q = eigh_safe(M)
    e_max = float(e.abs().max())
    e_min = float(e.min())
    # an eigenvalue within rounding (eps·‖M‖) of zero makes any whitening noise: M is not
    # numerically positive definite
    if not e_min > eps * e_max:
        raise NotPSDError(
            f"{caller}: {name} must be symmetric positive definite; its smallest eigenvalue is {e_min:.3e} "
            f"(largest {e_max:.3e}). Damp it first (e.g. with pi_split) before inverting A⊗B + C⊗D."
        )
    return (Q / e.sqrt()) @ Q.T


class TwoTermKroneckerInverse:
    """(A⊗B + C⊗D)⁻¹ by simultaneous diagonalization (§3.2.5, after Martens & Grosse).

    With A ``[d_a, d_a]``, B ``[d_b, d_b]`` SPD and C ``[d_a, d_a]``, D ``[d_b, d_b]``
    symmetric (possibly indefinite), and whitenings W_A A W_Aᵀ = I, W_B B W_Bᵀ = I
    (:func:`_whitening`: L⁻¹ of the Cholesky factor, or A^{-1/2} — §3.2.5 writes A^{-1/2};
    every whitening gives the same operator):

        W_A C W_Aᵀ = E1 diag(s1) E1ᵀ,   W_B D W_Bᵀ = E2 diag(s2) E2ᵀ,
        K1 = W_Aᵀ E1,  K2 = W_Bᵀ E2,

    so K1ᵀ A K1 = I, K1ᵀ C K1 = diag(s1) (likewise for K2), and

        (K1⊗K2)ᵀ (A⊗B + C⊗D) (K1⊗K2) = diag(μ),   μ [d_b, d_a],  μ_ji = 1 + s2_j s1_i.

    The solve is X ↦ K2 [(K2ᵀ X K1) ⊘ μ] K1ᵀ.

    Indefinite correction rule (DESIGN.md §10).  When C⊗D is indefinite (the second
    term of deflation or KFAC-corrected usually is), some μ_ji may be ≤ 0 and the sum is
    not positive definite.  Every μ_ji is replaced by max(μ_ji, ``floor``); the operator
    inverted is then exactly

        M = (A K1 ⊗ B K2) diag(vec(max(μ, floor))) (A K1 ⊗ B K2)ᵀ      (A K1 = K1⁻ᵀ),

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

        W_A, W_B = _whitening(0.5 * (A + A.T), "A", caller), _whitening(0.5 * (B + B.T), "B", caller)
        s1, E1 = eigh_safe(W_A @ C @ W_A.T)
        s2, E2 = eigh_safe(W_B @ D @ W_B.T)

        self.floor = floor
        self.s1, self.s2 = s1, s2
        self.K1, self.K2 = W_A.T @ E1, W_B.T @ E2
        # the caller's factors (references, no copy): K⁻ᵀ = A K (KᵀAK = I) for the symmetrized A,
        # formed by to_dense_matrix only
        self._A, self._B = A, B
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
        A, B = 0.5 * (self._A + self._A.T), 0.5 * (self._B + self._B.T)
        W = torch.kron(A @ self.K1, B @ self.K2)
        # vec of μ [d_b, d_a] stacks columns: entry (j, i) lands at i·d_b + j
        mu_vec = self.mu_clamped.T.reshape(-1)
        return (W * mu_vec) @ W.T
