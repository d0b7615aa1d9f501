"""Σ_k A_k ⊗ B_k: the result type of every block approximator (3.20).

A :class:`KroneckerSum` is applied, traced and normed from its factors, never densified
(except by :meth:`KroneckerSum.to_dense`, a reference for tests and small blocks).  It is a
:class:`~curvlib.linalg.blocks.KroneckerFactored` layer block, so every damping can invert it
and every operator expression can contain it; the Kronecker algebra keeps it structured
where it can (sum of two sums, product by the mixed-product rule, scalar multiple, transpose).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from numbers import Real
from typing import Any

import torch

from curvlib.errors import DTypeDeviceError, ShapeError
from curvlib.linalg.blocks import KroneckerFactored
from curvlib.linalg.kron import kron

__all__ = ["KroneckerSum"]


class KroneckerSum(KroneckerFactored):
    """An immutable sum of Kronecker products Σ_k A_k ⊗ B_k.

    Each term is a pair ``(A_k [d_a, d_a], B_k [d_b, d_b])``; the sum is a
    ``[d_a·d_b, d_a·d_b]`` matrix acting on ``vec(X)`` with ``X [d_b, d_a]``
    (for a layer block: A_k on the activation side, B_k on the gradient side, (3.18)).
    All factors share one dtype and one device.

    The tensors are held as given (not copied); the container itself cannot be
    changed, and every operation returns new tensors or a new ``KroneckerSum``.
    """

    __slots__ = ("_terms", "_As", "_Bs")
    # factors need not be symmetric (a deflation term, a product of sums): Sᵀ = Σ A_kᵀ ⊗ B_kᵀ
    symmetric = False

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
        object.__setattr__(self, "_As", None)
        object.__setattr__(self, "_Bs", None)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors stacked, ``[K, d_a, d_a]`` and ``[K, d_b, d_b]``: every product runs as one
        batched matmul over the terms.  Formed on first use (a fit that is only stored or
        inverted never needs them), and views for a single term."""
        if self._As is None:
            if len(self._terms) == 1:
                (A, B), = self._terms
                As, Bs = A.unsqueeze(0), B.unsqueeze(0)
            else:
                As, Bs = torch.stack([A for A, _ in self._terms]), torch.stack([B for _, B in self._terms])
            object.__setattr__(self, "_As", As)
            object.__setattr__(self, "_Bs", Bs)
        return self._As, self._Bs

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
        return self._terms[0][0].shape[-1]

    @property
    def b_dim(self) -> int:
        return self._terms[0][1].shape[-1]

    @property
    def shape(self) -> tuple[int, int]:
        n = self.a_dim * self.b_dim
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self._terms[0][0].dtype

    @property
    def device(self) -> torch.device:
        return self._terms[0][0].device

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
    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        """Σ_k B_k X A_kᵀ, the matrix form of the product (Thm 3.13), for ``X [k, d_b, d_a]``.

        Cost O(K·k·d_a·d_b·(d_a + d_b)) for K terms and k right-hand sides."""
        Xk = X.unsqueeze(-3)  # [k, 1, d_b, d_a], broadcast over the K terms
        As, Bs = self._stacked()
        return (Bs @ Xk @ As.transpose(-1, -2)).sum(dim=-3)

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.transpose()._matmat(Y)

    def __matmul__(self, other: Any) -> Any:
        """``S @ x`` is :meth:`matvec`; ``S @ T`` for another sum uses the mixed
        product (Thm 3.4): (Σ_k A_k⊗B_k)(Σ_l C_l⊗D_l) = Σ_{k,l} A_kC_l ⊗ B_kD_l; any other
        operator gives the lazy product."""
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
        return super().__matmul__(other)

    # ---- algebra ---------------------------------------------------------------------
    def __add__(self, other: Any) -> Any:
        """The sum of two Kronecker sums: their terms concatenated (Thm 3.1 keeps them apart);
        with any other operator, the lazy sum."""
        if not isinstance(other, KroneckerSum):
            return super().__add__(other)
        if (other.a_dim, other.b_dim) != (self.a_dim, self.b_dim):
            raise ShapeError(f"KroneckerSum + KroneckerSum: dims (a_dim, b_dim) = {(self.a_dim, self.b_dim)} vs "
                             f"{(other.a_dim, other.b_dim)}")
        return KroneckerSum(self._terms + other._terms)

    def __mul__(self, c: float) -> KroneckerSum:
        """c·Σ_k A_k ⊗ B_k = Σ_k (c·A_k) ⊗ B_k (Thm 3.1, item 3)."""
        if isinstance(c, bool) or not isinstance(c, Real):
            return NotImplemented
        return KroneckerSum((c * A, B) for A, B in self._terms)

    __rmul__ = __mul__

    def adjoint(self) -> KroneckerSum:
        """The transpose, as a Kronecker sum (:meth:`transpose`)."""
        return self.transpose()

    def transpose(self) -> KroneckerSum:
        """(Σ_k A_k ⊗ B_k)ᵀ = Σ_k A_kᵀ ⊗ B_kᵀ (Thm 3.5, (3.8))."""
        return KroneckerSum((A.T, B.T) for A, B in self._terms)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> KroneckerSum:
        """A copy with every factor moved to ``dtype`` and/or ``device``."""
        return KroneckerSum((A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)) for A, B in self._terms)

    # ---- dense forms and scalars --------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """Σ_k A_k ⊗ B_k as a dense ``[d_a·d_b, d_a·d_b]`` matrix (tests and small blocks only)."""
        return kron(*self._stacked()).sum(dim=0)

    def trace(self) -> torch.Tensor:
        """tr(Σ_k A_k ⊗ B_k) = Σ_k tr(A_k)·tr(B_k) (Thm 3.10, (3.13)).  Returns a 0-d tensor."""
        As, Bs = self._stacked()
        trA = As.diagonal(dim1=-2, dim2=-1).sum(-1)
        trB = Bs.diagonal(dim1=-2, dim2=-1).sum(-1)
        return (trA * trB).sum()

    def frobenius_norm(self) -> torch.Tensor:
        """‖Σ_k A_k ⊗ B_k‖_F from the Gram identity

            ‖Σ_k A_k⊗B_k‖²_F = Σ_{k,l} ⟨A_k, A_l⟩·⟨B_k, B_l⟩

        (⟨A⊗B, C⊗D⟩ = ⟨A, C⟩⟨B, D⟩ by Thm 3.4, 3.5 and 3.10), cost O(K²(d_a² + d_b²)).
        Returns a 0-d tensor.
        """
        As, Bs = self._stacked()
        a = As.reshape(self.rank, -1)
        b = Bs.reshape(self.rank, -1)
        sq = ((a @ a.T) * (b @ b.T)).sum()
        # the Gram sum can round a hair below zero when the terms nearly cancel
        return sq.clamp_min(0).sqrt()
