"""Kronecker algebra in the column-major ``vec`` convention of the thesis (§3.1.1).

``vec`` stacks columns (Def. 3.2), so for a matrix X ``vec(X) = X.T.reshape(-1)``,
and the identity that makes Kronecker products cheap is

    (A ⊗ B) vec(X) = vec(B X Aᵀ)                                    Thm 3.13, (3.17)

:class:`KroneckerSum` Σ_k A_k ⊗ B_k is the result type of every block approximator:
it is applied, traced and normed from its factors, never densified (except by
:meth:`KroneckerSum.to_dense`, a reference for tests and small blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from numbers import Real

import torch

from curvlib.errors import DTypeDeviceError, ShapeError

__all__ = ["vec", "unvec", "kron", "kron_matvec", "matvec_from_matrix_form", "KroneckerSum"]


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


class KroneckerSum:
    """An immutable sum of Kronecker products Σ_k A_k ⊗ B_k.

    Each term is a pair ``(A_k [d_a, d_a], B_k [d_b, d_b])``; the sum is a
    ``[d_a·d_b, d_a·d_b]`` matrix acting on ``vec(X)`` with ``X [d_b, d_a]``
    (for a layer block: A_k on the activation side, B_k on the gradient side, (3.18)).
    All factors share one dtype and one device.

    The tensors are held as given (not copied); the container itself cannot be
    changed, and every operation returns new tensors or a new ``KroneckerSum``.
    """

    __slots__ = ("_terms", "_As", "_Bs")

    def __init__(self, terms: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        pairs = tuple((A, B) for A, B in terms)
        if not pairs:
            raise ShapeError("KroneckerSum: expected at least one term (A_k, B_k), got none")
        A0, B0 = pairs[0]
        if A0.ndim != 2 or A0.shape[0] != A0.shape[1] or B0.ndim != 2 or B0.shape[0] != B0.shape[1]:
            raise ShapeError(
                f"KroneckerSum: term 0 must be (A [d_a, d_a], B [d_b, d_b]); got {list(A0.shape)} and {list(B0.shape)}"
            )
        for k, (A, B) in enumerate(pairs):
            if A.shape != A0.shape or B.shape != B0.shape:
                raise ShapeError(
                    f"KroneckerSum: term {k} has shapes {list(A.shape)} and {list(B.shape)}; "
                    f"expected {list(A0.shape)} and {list(B0.shape)} like term 0"
                )
            for name, t in (("A", A), ("B", B)):
                if t.dtype != A0.dtype or t.device != A0.device:
                    raise DTypeDeviceError(
                        f"KroneckerSum: term {k} factor {name} is {t.dtype} on {t.device}; "
                        f"expected {A0.dtype} on {A0.device} like term 0"
                    )
        object.__setattr__(self, "_terms", pairs)
        # stacked copies let every product run as one batched matmul over the terms
        object.__setattr__(self, "_As", torch.stack([A for A, _ in pairs]))
        object.__setattr__(self, "_Bs", torch.stack([B for _, B in pairs]))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"KroneckerSum is immutable; cannot set {name!r}")

    def __reduce__(self):
        # pickling and deepcopy rebuild through __init__ (the default path would setattr)
        return (KroneckerSum, (self._terms,))

    # ---- description -------------------------------------------------------------
    @property
    def terms(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The pairs ``(A_k [d_a, d_a], B_k [d_b, d_b])``."""
        return self._terms

    @property
    def rank(self) -> int:
        """The number of Kronecker terms (the Kronecker rank of the representation)."""
        return len(self._terms)

    @property
    def a_dim(self) -> int:
        return self._As.shape[-1]

    @property
    def b_dim(self) -> int:
        return self._Bs.shape[-1]

    @property
    def shape(self) -> tuple[int, int]:
        n = self.a_dim * self.b_dim
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self._As.dtype

    @property
    def device(self) -> torch.device:
        return self._As.device

    def __len__(self) -> int:
        return self.rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._terms)

    def __repr__(self) -> str:
        return (
            f"KroneckerSum(rank={self.rank}, a_dim={self.a_dim}, b_dim={self.b_dim}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # ---- products ------------------------------------------------------------------
    def _check_operand(self, x: torch.Tensor, what: str) -> None:
        if x.dtype != self.dtype or x.device != self.device:
            raise DTypeDeviceError(
                f"KroneckerSum.{what}: factors are {self.dtype} on {self.device}, operand is {x.dtype} on {x.device}"
            )

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """Σ_k B_k X A_kᵀ, the matrix form of the product (Thm 3.13).

        Args:
            X: ``[..., d_b, d_a]``.

        Returns:
            ``[..., d_b, d_a]``.
        """
        self._check_operand(X, "apply")
        if X.ndim < 2 or X.shape[-2:] != (self.b_dim, self.a_dim):
            raise ShapeError(f"KroneckerSum.apply: expected X [..., {self.b_dim}, {self.a_dim}], got {list(X.shape)}")
        Xk = X.unsqueeze(-3)  # [..., 1, d_b, d_a], broadcast over the K terms
        return (self._Bs @ Xk @ self._As.transpose(-1, -2)).sum(dim=-3)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """(Σ_k A_k ⊗ B_k)·x without forming the Kronecker products (Thm 3.13).

        Cost O(K·k·d_a·d_b·(d_a + d_b)) for K terms and k right-hand sides.

        Args:
            x: ``[d_a·d_b]`` or ``[d_a·d_b, k]``.

        Returns:
            ``[d_a·d_b]`` or ``[d_a·d_b, k]``.
        """
        self._check_operand(x, "matvec")
        return matvec_from_matrix_form(self.apply, x, self.b_dim, self.a_dim, "KroneckerSum.matvec")

    def __matmul__(self, other: torch.Tensor | KroneckerSum) -> torch.Tensor | KroneckerSum:
        """``S @ x`` is :meth:`matvec`; ``S @ T`` for another sum uses the mixed
        product (Thm 3.4): (Σ_k A_k⊗B_k)(Σ_l C_l⊗D_l) = Σ_{k,l} A_kC_l ⊗ B_kD_l."""
        if isinstance(other, KroneckerSum):
            if (other.a_dim, other.b_dim) != (self.a_dim, self.b_dim):
                raise ShapeError(
                    f"KroneckerSum @ KroneckerSum: dims (a_dim, b_dim) = {(self.a_dim, self.b_dim)} vs "
                    f"{(other.a_dim, other.b_dim)}"
                )
            if other.dtype != self.dtype or other.device != self.device:
                raise DTypeDeviceError(
                    f"KroneckerSum @ KroneckerSum: {self.dtype} on {self.device} vs {other.dtype} on {other.device}"
                )
            return KroneckerSum((A @ C, B @ D) for A, B in self._terms for C, D in other._terms)
        if isinstance(other, torch.Tensor):
            return self.matvec(other)
        return NotImplemented

    # ---- algebra ---------------------------------------------------------------------
    def __add__(self, other: KroneckerSum) -> KroneckerSum:
        """The sum of two Kronecker sums: their terms concatenated (Thm 3.1 keeps them apart)."""
        if not isinstance(other, KroneckerSum):
            return NotImplemented
        return KroneckerSum(self._terms + other._terms)

    def __mul__(self, c: float) -> KroneckerSum:
        """c·Σ_k A_k ⊗ B_k = Σ_k (c·A_k) ⊗ B_k (Thm 3.1, item 3)."""
        if isinstance(c, bool) or not isinstance(c, Real):
            return NotImplemented
        return KroneckerSum((c * A, B) for A, B in self._terms)

    __rmul__ = __mul__

    def transpose(self) -> KroneckerSum:
        """(Σ_k A_k ⊗ B_k)ᵀ = Σ_k A_kᵀ ⊗ B_kᵀ (Thm 3.5, (3.8))."""
        return KroneckerSum((A.T, B.T) for A, B in self._terms)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KroneckerSum:
        """A copy with every factor moved to ``dtype`` and/or ``device``."""
        return KroneckerSum((A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)) for A, B in self._terms)

    # ---- dense forms and scalars --------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """Σ_k A_k ⊗ B_k as a dense ``[d_a·d_b, d_a·d_b]`` matrix (tests and small blocks only)."""
        return kron(self._As, self._Bs).sum(dim=0)

    def trace(self) -> torch.Tensor:
        """tr(Σ_k A_k ⊗ B_k) = Σ_k tr(A_k)·tr(B_k) (Thm 3.10, (3.13)).  Returns a 0-d tensor."""
        trA = self._As.diagonal(dim1=-2, dim2=-1).sum(-1)
        trB = self._Bs.diagonal(dim1=-2, dim2=-1).sum(-1)
        return (trA * trB).sum()

    def frobenius_norm(self) -> torch.Tensor:
        """‖Σ_k A_k ⊗ B_k‖_F from the Gram identity

            ‖Σ_k A_k⊗B_k‖²_F = Σ_{k,l} ⟨A_k, A_l⟩·⟨B_k, B_l⟩

        (⟨A⊗B, C⊗D⟩ = ⟨A, C⟩⟨B, D⟩ by Thm 3.4, 3.5 and 3.10), cost O(K²(d_a² + d_b²)).
        Returns a 0-d tensor.
        """
        a = self._As.reshape(self.rank, -1)
        b = self._Bs.reshape(self.rank, -1)
        sq = ((a @ a.T) * (b @ b.T)).sum()
        # the Gram sum can round a hair below zero when the terms nearly cancel
        return sq.clamp_min(0).sqrt()
