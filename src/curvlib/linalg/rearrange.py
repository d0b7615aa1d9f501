"""The zigzag rearrangement Z (Def. 3.3) and nearest Kronecker sums (Thm 3.14).

Z turns a Kronecker product into an outer product, Z(R ⊗ S) = vec(R) vec(S)ᵀ, and
preserves the Frobenius norm entry by entry, so

    ‖M − R ⊗ S‖_F = ‖Z(M) − vec(R) vec(S)ᵀ‖_F                          (3.37)

and the best Frobenius approximation of M by a sum of k Kronecker products comes from
the top k singular triplets of Z(M) (van Loan; Thm 3.14, (3.24)).

Everything here is a **dense reference**: :func:`rearrange` forms a ``d_a² × d_b²``
matrix and :func:`nearest_kronecker` runs a full SVD on it.  Real layer blocks go
through the matrix-free operators of :mod:`curvlib.linalg.zproducts` instead; only
:func:`factors_from_singular` and :func:`normalized_factors` (with their sign convention)
are shared with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvlib.errors import NumericalError, ShapeError
from curvlib.linalg.kron import unvec
from curvlib.linalg.kronecker_sum import KroneckerSum

__all__ = [
    "rearrange", "unrearrange", "factors_from_singular", "normalized_factors", "nearest_kronecker", "NearestKronecker",
]

Shape = int | tuple[int, int]


def _as_shape(shape: Shape, what: str) -> tuple[int, int]:
    if isinstance(shape, int):
        return (shape, shape)
    rows, cols = (int(s) for s in shape)
    if rows < 1 or cols < 1:
        raise ShapeError(f"{what}: expected positive dims, got {tuple(shape)}")
    return rows, cols


def rearrange(M: torch.Tensor, a_shape: Shape, b_shape: Shape) -> torch.Tensor:
    """The zigzag rearrangement Z(M) of Def. 3.3, (3.23), for rectangular blocks.

    M is a uniform block matrix of ``m1 × n1`` blocks M_{μ,ν}, each ``m2 × n2``
    (``a_shape = (m1, n1)``, ``b_shape = (m2, n2)``; an int means a square shape).
    Row ``μ + m1·ν`` of Z(M) — μ running fastest, as in (3.23) — is vec(M_{μ,ν})ᵀ,
    so that Z(R ⊗ S) = vec(R) vec(S)ᵀ for R ``[m1, n1]``, S ``[m2, n2]``.

    A dense reference (reshape and permute; it materialises Z(M)).

    Args:
        M: ``[..., m1·m2, n1·n2]``.

    Returns:
        ``[..., m1·n1, m2·n2]``.
    """
    m1, n1 = _as_shape(a_shape, "rearrange: a_shape")
    m2, n2 = _as_shape(b_shape, "rearrange: b_shape")
    if M.ndim < 2 or M.shape[-2:] != (m1 * m2, n1 * n2):
        raise ShapeError(
            f"rearrange: expected M [..., {m1 * m2}, {n1 * n2}] for a_shape {(m1, n1)}, b_shape {(m2, n2)}; "
            f"got {list(M.shape)}"
        )
    batch = M.shape[:-2]
    nb = len(batch)
    # M4[μ, i, ν, j] = M[μ·m2 + i, ν·n2 + j]; Z wants row ν·m1 + μ and column j·m2 + i
    M4 = M.reshape(*batch, m1, m2, n1, n2)
    Z4 = M4.permute(*range(nb), nb + 2, nb + 0, nb + 3, nb + 1)
    return Z4.reshape(*batch, n1 * m1, n2 * m2)


def unrearrange(Z: torch.Tensor, a_shape: Shape, b_shape: Shape) -> torch.Tensor:
    """The inverse of :func:`rearrange`: ``unrearrange(rearrange(M, a, b), a, b) == M``.

    Args:
        Z: ``[..., m1·n1, m2·n2]``.

    Returns:
        M ``[..., m1·m2, n1·n2]``.
    """
    m1, n1 = _as_shape(a_shape, "unrearrange: a_shape")
    m2, n2 = _as_shape(b_shape, "unrearrange: b_shape")
    if Z.ndim < 2 or Z.shape[-2:] != (m1 * n1, m2 * n2):
        raise ShapeError(
            f"unrearrange: expected Z [..., {m1 * n1}, {m2 * n2}] for a_shape {(m1, n1)}, b_shape {(m2, n2)}; "
            f"got {list(Z.shape)}"
        )
    batch = Z.shape[:-2]
    nb = len(batch)
    Z4 = Z.reshape(*batch, n1, m1, n2, m2)  # [ν, μ, j, i]
    M4 = Z4.permute(*range(nb), nb + 1, nb + 3, nb + 0, nb + 2)  # [μ, i, ν, j]
    return M4.reshape(*batch, m1 * m2, n1 * n2)


def factors_from_singular(
    sigma: float | torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    a_shape: Shape,
    b_shape: Shape,
    *,
    symmetrize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kronecker factors from one singular triplet of Z(M) (after (3.24)).

        A = √σ · MAT(u),   B = √σ · MAT(v),   so that A ⊗ B = unrearrange(σ u vᵀ).

    With ``symmetrize`` (square factors only) each factor is replaced by (X + Xᵀ)/2;
    for a symmetric M the singular vectors are already symmetric (Prop. 3.2), so this
    only removes rounding.

    Sign convention (deterministic; both factors flip together, so A ⊗ B is unchanged):
      1. if A is square and |tr A| > √eps·‖A‖_F, make tr A > 0 — for a PSD block the
         leading pair is then PSD (Prop. 3.2);
      2. otherwise (trace numerically zero, or A rectangular) make the entry of A of
         largest magnitude positive (the first such entry in row-major order on ties).
    Singular vectors carry arbitrary signs; factors averaged across refreshes (EMA)
    must be sign-normalised first, or a flip cancels the average (DESIGN.md §10).

    Args:
        sigma: the singular value σ ≥ 0 (float or 0-d tensor).
        u: left singular vector ``[a_rows·a_cols]``.
        v: right singular vector ``[b_rows·b_cols]``.
        a_shape, b_shape: ``(rows, cols)`` of A and B (an int means square).
        symmetrize: symmetrize both factors (requires square shapes).

    Returns:
        ``(A [a_rows, a_cols], B [b_rows, b_cols])`` in u's dtype and device.
    """
    ar, ac = _as_shape(a_shape, "factors_from_singular: a_shape")
    br, bc = _as_shape(b_shape, "factors_from_singular: b_shape")
    if u.ndim != 1 or u.shape[0] != ar * ac or v.ndim != 1 or v.shape[0] != br * bc:
        raise ShapeError(
            f"factors_from_singular: expected u [{ar * ac}] and v [{br * bc}] for a_shape {(ar, ac)}, "
            f"b_shape {(br, bc)}; got u {list(u.shape)} and v {list(v.shape)}"
        )
    if symmetrize and (ar != ac or br != bc):
        raise ShapeError(
            f"factors_from_singular: symmetrize=True needs square factors; got a_shape {(ar, ac)}, b_shape {(br, bc)}"
        )
    sigma_t = torch.as_tensor(sigma, dtype=u.dtype, device=u.device)
    if bool((sigma_t < 0).any()):
        raise NumericalError(f"factors_from_singular: expected a singular value σ ≥ 0, got {float(sigma_t):.6e}")
    return _signed_pair(unvec(u, ar, ac), unvec(v, br, bc), sigma_t.sqrt(), symmetrize)


def normalized_factors(A: torch.Tensor, B: torch.Tensor, *, symmetrize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor pair with the symmetrization and sign convention of :func:`factors_from_singular`.

    (A, B) ↦ (s·A', s·B') with A' = (A + Aᵀ)/2, B' = (B + Bᵀ)/2 (``symmetrize``; bitwise
    symmetric) or A' = A, B' = B, and s = ±1 chosen as there (tr A' > 0, else the entry of
    A' of largest magnitude positive), so A' ⊗ B' is unchanged.  For factors formed
    directly, e.g. MAT(Xα) = Σ_i α_i ā_i ā_iᵀ in the Gram space of the solvers.

    Args:
        A: ``[a_rows, a_cols]``.
        B: ``[b_rows, b_cols]``.
        symmetrize: symmetrize both (square factors only).

    Returns:
        new tensors ``(A [a_rows, a_cols], B [b_rows, b_cols])``.
    """
    if symmetrize and (A.shape[0] != A.shape[1] or B.shape[0] != B.shape[1]):
        raise ShapeError(
            f"normalized_factors: symmetrize=True needs square factors; got {list(A.shape)} and {list(B.shape)}"
        )
    return _signed_pair(A, B, 1.0, symmetrize)


def _signed_pair(A: torch.Tensor, B: torch.Tensor, scale: float | torch.Tensor,
                 symmetrize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(c·A', c·B') with c = scale·s (module convention above): new tensors, three passes over
    a symmetrized factor (the sum, its norm, the scaling) — the largest entry is looked up
    only when the trace does not decide."""
    if symmetrize:
        # A + Aᵀ is bitwise symmetric; the ½ goes into the final scaling
        A, B, scale = A + A.mT, B + B.mT, 0.5 * scale
    largest = None
    if A.shape[0] == A.shape[1]:
        trace = A.diagonal().sum()
        tol = torch.finfo(A.dtype).eps ** 0.5 * torch.linalg.matrix_norm(A)
        if bool(trace.abs() > tol):
            sign = torch.sign(trace)
        else:
            largest = True
    if A.shape[0] != A.shape[1] or largest:
        flat = A.reshape(-1)
        sign = torch.sign(flat[flat.abs().argmax()])
        # an all-zero A (σ = 0) keeps its sign rather than being zeroed by sign 0
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    c = scale * sign
    if symmetrize:  # A and B are new tensors already
        return A.mul_(c), B.mul_(c)
    return A * c, B * c


@dataclass(frozen=True)
class NearestKronecker:
    """The best Frobenius approximation of M by a sum of ``rank`` Kronecker products.

    Attributes:
        terms: Σ_{k≤rank} A_k ⊗ B_k, A_k ``[d_a, d_a]``, B_k ``[d_b, d_b]``, ordered by
            decreasing singular value.
        singular_values: the top singular values σ_1 ≥ … ≥ σ_rank of Z(M), ``[rank]``.
        residual_sq: ‖M − Σ_k A_k ⊗ B_k‖²_F = Σ_{j>rank} σ_j², a 0-d tensor.
    """

    terms: KroneckerSum
    singular_values: torch.Tensor
    residual_sq: torch.Tensor


def nearest_kronecker(
    M: torch.Tensor,
    a_shape: Shape,
    b_shape: Shape,
    rank: int = 1,
    *,
    symmetrize: bool = False,
) -> NearestKronecker:
    """argmin over Σ_{k≤rank} A_k ⊗ B_k of ‖M − Σ_k A_k ⊗ B_k‖_F (Thm 3.14, (3.22)/(3.25)).

    By (3.37) this is the best rank-``rank`` approximation of Z(M), given by its top
    singular triplets (Eckart–Young); each triplet becomes a pair of factors through
    :func:`factors_from_singular` (same sign convention).  Dense reference: a full
    SVD of the ``d_a² × d_b²`` matrix Z(M).  Rectangular factors: use
    :func:`rearrange` and :func:`factors_from_singular` directly.

    Args:
        M: ``[d_a·d_b, d_a·d_b]``.
        a_shape: ``d_a`` or ``(d_a, d_a)``.
        b_shape: ``d_b`` or ``(d_b, d_b)``.
        rank: number of Kronecker terms, ``1 ≤ rank ≤ min(d_a², d_b²)``.
        symmetrize: symmetrize the factors (off by default: M may be non-symmetric).

    Returns:
        A :class:`NearestKronecker`.
    """
    da, da2 = _as_shape(a_shape, "nearest_kronecker: a_shape")
    db, db2 = _as_shape(b_shape, "nearest_kronecker: b_shape")
    if da != da2 or db != db2:
        raise ShapeError(
            f"nearest_kronecker: expected square factor shapes; got a_shape {(da, da2)}, b_shape {(db, db2)} "
            "(use rearrange and factors_from_singular for rectangular factors)"
        )
    if M.ndim != 2:
        raise ShapeError(f"nearest_kronecker: expected a matrix M [{da * db}, {da * db}], got {list(M.shape)}")
    Z = rearrange(M, da, db)
    max_rank = min(Z.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ShapeError(
            f"nearest_kronecker: expected 1 ≤ rank ≤ min(d_a², d_b²) = {max_rank} for Z(M) {list(Z.shape)}, got {rank!r}"
        )
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    terms = KroneckerSum(
        factors_from_singular(S[k], U[:, k], Vh[k], da, db, symmetrize=symmetrize) for k in range(rank)
    )
    return NearestKronecker(terms=terms, singular_values=S[:rank], residual_sq=(S[rank:] ** 2).sum())
