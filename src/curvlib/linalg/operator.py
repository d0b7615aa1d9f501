"""The matrix-free operator interface shared by the SVD solvers and the Z-products.

A :class:`ZOperator` stands for the rearranged block Z(M) ∈ R^{d_a² × d_b²} of
Def. 3.3 (M ≈ Σ_k A_k ⊗ B_k with A_k [d_a, d_a], B_k [d_b, d_b]); only its products
with vectors are ever computed.  Public methods check shapes; subclasses implement
``_matvec``/``_rmatvec`` (the scipy ``LinearOperator`` split).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from curvlib.errors import DTypeDeviceError, ShapeError

__all__ = ["ZOperator", "DenseZOperator"]


class ZOperator(ABC):
    """Matrix-free Z(M) of shape ``[a_dim², b_dim²]``.

    ``matvec(v)`` computes Z(M)·v for ``v [b_dim²]`` (or ``[b_dim², k]``) and returns
    ``[a_dim²]`` (or ``[a_dim², k]``); ``rmatvec(u)`` computes Z(M)ᵀ·u.  Vectors use
    the column-major ``vec`` of Def. 3.2, so ``MAT(v)`` is ``[b_dim, b_dim]``.
    """

    def __init__(self, a_dim: int, b_dim: int, *, dtype: torch.dtype, device: torch.device) -> None:
        self.a_dim = int(a_dim)
        self.b_dim = int(b_dim)
        self.dtype = dtype
        self.device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a_dim**2, self.b_dim**2)

    def _check(self, x: torch.Tensor, n: int, what: str) -> tuple[torch.Tensor, bool]:
        if x.dtype != self.dtype or x.device != self.device:
            raise DTypeDeviceError(
                f"{type(self).__name__}.{what}: operator is {self.dtype} on {self.device}, "
                f"vector is {x.dtype} on {x.device}"
            )
        if x.ndim == 1 and x.shape[0] == n:
            return x.unsqueeze(-1), True
        if x.ndim == 2 and x.shape[0] == n:
            return x, False
        raise ShapeError(f"{type(self).__name__}.{what}: expected [{n}] or [{n}, k], got {list(x.shape)}")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Z(M)·v.  v: ``[b_dim²]`` or ``[b_dim², k]`` -> ``[a_dim²]`` or ``[a_dim², k]``."""
        V, squeeze = self._check(v, self.shape[1], "matvec")
        out = self._matvec(V)
        return out.squeeze(-1) if squeeze else out

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """Z(M)ᵀ·u.  u: ``[a_dim²]`` or ``[a_dim², k]`` -> ``[b_dim²]`` or ``[b_dim², k]``."""
        U, squeeze = self._check(u, self.shape[0], "rmatvec")
        out = self._rmatvec(U)
        return out.squeeze(-1) if squeeze else out

    @abstractmethod
    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        """V: ``[b_dim², k]`` -> ``[a_dim², k]``."""

    @abstractmethod
    def _rmatvec(self, U: torch.Tensor) -> torch.Tensor:
        """U: ``[a_dim², k]`` -> ``[b_dim², k]``."""

    def to_dense(self) -> torch.Tensor:
        """Z(M) as a dense ``[a_dim², b_dim²]`` matrix (tests and small blocks only)."""
        return self._matvec(torch.eye(self.shape[1], dtype=self.dtype, device=self.device))


class DenseZOperator(ZOperator):
    """A :class:`ZOperator` backed by a dense ``[a_dim², b_dim²]`` matrix (reference)."""

    def __init__(self, Z: torch.Tensor, a_dim: int, b_dim: int) -> None:
        if Z.shape != (a_dim**2, b_dim**2):
            raise ShapeError(f"DenseZOperator: expected [{a_dim**2}, {b_dim**2}], got {list(Z.shape)}")
        super().__init__(a_dim, b_dim, dtype=Z.dtype, device=Z.device)
        self.Z = Z

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self.Z @ V

    def _rmatvec(self, U: torch.Tensor) -> torch.Tensor:
        return self.Z.T @ U
