"""Kronecker algebra in the column-major ``vec`` convention of the thesis (§3.1.1).

``vec`` stacks columns (Def. 3.2), so for a matrix X ``vec(X) = X.T.reshape(-1)``,
and the identity that makes Kronecker products cheap is

    (A ⊗ B) vec(X) = vec(B X Aᵀ)                                    Thm 3.13, (3.17)

:class:`~curvlib.linalg.kronecker_sum.KroneckerSum` builds on these kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from curvlib.errors import DTypeDeviceError, ShapeError

__all__ = ["vec", "unvec", "kron", "kron_matvec", "matvec_from_matrix_form", "aligned_empty", "row_aligned", "two_sided"]

#: the rows of :func:`aligned_empty` matrices start on multiples of this many bytes (a cache line)
ROW_ALIGNMENT = 64


def vec(X: torch.Tensor) -> torch.Tensor:
    """Column-major vectorisation (Def. 3.2, (3.14)).

    Args:
        X: ``[..., r, c]``.

    Returns:
        ``[..., r*c]`` with entry ``i + r·j`` equal to ``X[..., i, j]``.
    """
    if X.ndim < 2:
        raise ShapeError(f"vec: expected a tensor [..., r, c] with at least 2 dims, got {list(X.shape)}")
    return X.transpose(-1, -2).reshape(*X.shape[:-2], X.shape[-1] * X.shape[-2])


def unvec(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of :func:`vec` ("MAT" in the thesis, after (3.24)).

    Args:
        x: ``[..., rows*cols]``.
        rows, cols: the shape of the matrix to rebuild.

    Returns:
        ``[..., rows, cols]`` with ``X[..., i, j] = x[..., i + rows·j]``.
    """
    rows, cols = int(rows), int(cols)
    if x.ndim < 1 or x.shape[-1] != rows * cols:
        raise ShapeError(f"unvec: expected [..., {rows * cols}] (rows={rows}, cols={cols}), got {list(x.shape)}")
    return x.reshape(*x.shape[:-1], cols, rows).transpose(-1, -2)


def _check_same(what: str, *tensors: torch.Tensor) -> None:
    first = tensors[0]
    for t in tensors[1:]:
        if t.dtype != first.dtype or t.device != first.device:
            raise DTypeDeviceError(
                f"{what}: all operands must share dtype and device; got {first.dtype} on {first.device} "
                f"and {t.dtype} on {t.device}"
            )


def kron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Dense Kronecker product (Def. 3.1, (3.5)), batched over leading dims.

    A dense reference: it forms the full ``[a·b, a'·b']`` matrix.  Leading batch dims
    broadcast.

    Args:
        A: ``[..., a, a']``.
        B: ``[..., b, b']``.

    Returns:
        ``[..., a*b, a'*b']`` whose block (i, j) of size ``[b, b']`` is ``A[..., i, j]·B``.
    """
    if A.ndim < 2 or B.ndim < 2:
        raise ShapeError(f"kron: expected matrices [..., r, c]; got A {list(A.shape)} and B {list(B.shape)}")
    _check_same("kron", A, B)
    a, a2 = A.shape[-2:]
    b, b2 = B.shape[-2:]
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    prod = A[..., :, None, :, None] * B[..., None, :, None, :]
    return prod.reshape(*batch, a * b, a2 * b2)


def kron_matvec(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B)·x computed as vec(B X Aᵀ), X = MAT(x), without forming A ⊗ B (Thm 3.13).

    Cost O(k·(b·b'·a' + b·a·a')) for k right-hand sides instead of O(k·a·a'·b·b').

    Args:
        A: ``[a, a']``.
        B: ``[b, b']``.
        x: ``[a'*b']`` or ``[a'*b', k]``.

    Returns:
        ``[a*b]`` or ``[a*b, k]``.
    """
    if A.ndim != 2 or B.ndim != 2:
        raise ShapeError(f"kron_matvec: expected matrices A [a, a'] and B [b, b']; got {list(A.shape)} and {list(B.shape)}")
    _check_same("kron_matvec", A, B, x)
    a, a2 = A.shape
    b, b2 = B.shape
    n = a2 * b2
    if x.ndim == 1 and x.shape[0] == n:
        X = unvec(x, b2, a2)
        return vec(B @ X @ A.T)
    if x.ndim == 2 and x.shape[0] == n:
        Xs = unvec(x.T, b2, a2)  # [k, b', a']
        return vec(B @ Xs @ A.T).T
    raise ShapeError(f"kron_matvec: expected x [{n}] or [{n}, k] for A {list(A.shape)}, B {list(B.shape)}; got {list(x.shape)}")



def matvec_from_matrix_form(apply: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, b_dim: int, a_dim: int,
                            who: str) -> torch.Tensor:
    """M·x for an operator M ``[p, p]``, p = d_a·d_b, given by its matrix form (Thm 3.13).

    ``apply`` maps X ``[..., d_b, d_a]`` to MAT(M vec(X)) ``[..., d_b, d_a]``; x is unvec-ed
    (column-major, Def. 3.2), applied, and vec-ed back — k columns in one batched call.

    Args:
        apply: the matrix form of M.
        x: ``[p]`` or ``[p, k]``.
        b_dim, a_dim: d_b (rows of X) and d_a (columns of X).
        who: the caller, for the error message.

    Returns:
        ``[p]`` or ``[p, k]``.

    Raises:
        ShapeError: x is neither ``[p]`` nor ``[p, k]``.
    """
    n = a_dim * b_dim
    if x.ndim == 1 and x.shape[0] == n:
        return vec(apply(unvec(x, b_dim, a_dim)))
    if x.ndim == 2 and x.shape[0] == n:
        return vec(apply(unvec(x.T, b_dim, a_dim))).T
    raise ShapeError(f"{who}: expected x [{n}] or [{n}, k], got {list(x.shape)}")


# --------------------------------------------------------------------------- B X A


def aligned_empty(rows: int, cols: int, *, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised ``[rows, cols]`` matrix (``like``'s dtype and device) whose rows start on
    :data:`ROW_ALIGNMENT`-byte boundaries: the first ``cols`` columns of a buffer whose row
    length is rounded up to that (the plain matrix when ``cols`` already fills whole lines).

    BLAS reads such a matrix with its padded leading dimension.  Measured with MKL on one CPU
    thread: (B X) A with X ``[1000, 785]`` (a Linear layer's 784 inputs and its bias column)
    ran at 86 GFLOP/s and at 100 with 784 or 800 columns; ``[784, 1001]`` at 74 against 101.
    """
    per_row = max(1, ROW_ALIGNMENT // like.element_size())
    width = -(-cols // per_row) * per_row
    buffer = torch.empty(rows, width, dtype=like.dtype, device=like.device)
    return buffer if width == cols else buffer[:, :cols]


def row_aligned(M: torch.Tensor) -> torch.Tensor:
    """``M`` ``[rows, cols]`` in the layout of :func:`aligned_empty` (``M`` itself when its rows
    are contiguous and start on :data:`ROW_ALIGNMENT`-byte boundaries already, else a copy)."""
    size = M.element_size()
    if M.stride(-1) == 1 and (M.stride(0) * size) % ROW_ALIGNMENT == 0 and M.data_ptr() % ROW_ALIGNMENT == 0:
        return M
    out = aligned_empty(*M.shape, like=M)
    out.copy_(M)
    return out


#: :func:`two_sided` computes a row-major (B X) A when X ``[m, n]`` has n ≥ m and m·n ≥ this
ROW_MAJOR_MIN = 8192


def two_sided(B: torch.Tensor, X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """B X A for one matrix X ``[m, n]`` (B ``[m, m]``, A ``[n, n]``, any matrices), in the GEMM
    layout that MKL ran fastest, measured per shape on the MNIST auto-encoders' layers (one CPU
    thread; the parameter update with the result included):

    * n ≥ m and m·n ≥ :data:`ROW_MAJOR_MIN`: (B X) A into two :func:`aligned_empty` matrices.
      The result is row-major, so an update with it reads rows (the transposed result's
      update of the full auto-encoder took 3.3 ms against 0.4), and with B, X and A
      row-aligned (:func:`row_aligned`) both GEMMs run at full speed: e.g. X ``[784, 1001]``
      28.4 ms against 31.1, ``[100, 785]`` 1.49 against 1.63;
    * otherwise ((Aᵀ Xᵀ) Bᵀ)ᵀ, a transposed result: with more rows than columns its GEMMs ran
      faster (``[784, 101]`` 1.52 ms against 1.78, ``[500, 251]`` 2.06 against 2.30), and for a
      small X two allocations more cost more than they save.

    Under autograd (an operand that requires a gradient) it is the plain ``(B @ X) @ A``.
    """
    if torch.is_grad_enabled() and (B.requires_grad or X.requires_grad or A.requires_grad):
        return (B @ X) @ A
    m, n = X.shape
    if n < m or m * n < ROW_MAJOR_MIN:
        return ((A.mT @ X.mT) @ B.mT).mT
    left = aligned_empty(m, n, like=X)
    torch.mm(B, X, out=left)
    out = aligned_empty(m, n, like=X)
    return torch.mm(left, A, out=out)
