"""One operator base for every linear operator of curvlib, with a lazy algebra.

Modelled on scipy's ``LinearOperator`` (``scipy/sparse/linalg/_interface.py``): the public
:meth:`LinearOperator.matvec` / :meth:`~LinearOperator.matmat` / ``@`` check and normalise
their operand **once** and subclasses implement only the private :meth:`~LinearOperator._matmat`
(and :meth:`~LinearOperator._rmatmat` for the adjoint) on a checked ``[n, k]`` matrix.

Accepted operands (the result comes back in the same form):

- a flat vector ``[n]``;
- k vectors as the columns of a matrix ``[n, k]``;
- a list of tensors, one per parameter (shapes given by the operator's
  :class:`VectorLayout`, e.g. ``model.parameters()``-shaped gradients), for operators over a
  model's parameters.

Combining operators is lazy: ``A + B``, ``A - B``, ``-A``, ``c * A``, ``A / c``, ``A @ B`` and
``A.T`` (the adjoint, ``A.H`` the same for real operators) return new operators whose
products call the operands' products; nothing is densified.  The algebra is pushed
through the adjoint ((AB)ᵀ = BᵀAᵀ, (A + B)ᵀ = Aᵀ + Bᵀ, (cA)ᵀ = cAᵀ, (Aᵀ)ᵀ = A).  Shapes,
dtypes and devices are checked when operators are combined, naming both sides.

``(F1 + 0.5 * F2) @ v`` therefore is F1·v + 0.5·F2·v, computed with two products.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from numbers import Real
from typing import Any, ClassVar

import numpy as np
import torch

from curvlib.errors import DTypeDeviceError, PerformanceWarning, ShapeError, warn

__all__ = [
    "AdjointOperator",
    "DenseOperator",
    "IdentityOperator",
    "LinearOperator",
    "PermutationOperator",
    "ProductOperator",
    "ScaledOperator",
    "SubmatrixOperator",
    "SumOperator",
    "VectorLayout",
    "finite_screen",
]

Operand = torch.Tensor | Sequence[torch.Tensor]


def finite_screen(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """0-d bool tensor, no host synchronisation: ``True`` proves every entry finite.

    One reduction per floating-point tensor (its sum), against the four passes of
    ``isfinite(t).all()``: a NaN or an infinity makes the sum non-finite, and one ``isfinite``
    reads all the sums (stacked in the widest of their dtypes, so none overflows there).
    Integer and bool tensors are finite.  ``False`` may also be a false alarm (finite entries
    whose sum overflows), so a caller that sees ``False`` checks the entries exactly.
    """
    sums = [t.sum() for t in tensors if t.is_floating_point() or t.is_complex()]
    if not sums:
        return torch.tensor(True, device=tensors[0].device if tensors else None)
    return torch.isfinite(torch.stack(sums)).all()


def host_values(tensors: Sequence[torch.Tensor]) -> list[Any]:
    """The values of several tensors of one shape (0-d flags, short vectors of scalars), read to
    the host in one synchronisation: stacked on the first one's device, then ``tolist()``."""
    return torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()


class VectorLayout(abc.ABC):
    """How an operator's flat vector ``[n]`` is split into a list of tensors.

    Operators over a model's parameters carry one, so that their products accept and return
    lists of parameter-shaped tensors (e.g. ``[p.grad for p in params]``).
    """

    @property
    @abc.abstractmethod
    def shapes(self) -> list[tuple[int, ...]]:
        """The shape of each tensor of the list form."""

    @abc.abstractmethod
    def to_vector(self, tensors: Sequence[torch.Tensor], caller: str) -> torch.Tensor:
        """A list shaped like :attr:`shapes` -> the flat vector ``[n]``."""

    @abc.abstractmethod
    def to_tensors(self, v: torch.Tensor, caller: str) -> list[torch.Tensor]:
        """The flat vector ``[n]`` -> a list shaped like :attr:`shapes`."""


def _describe(op: Any) -> str:
    return f"{type(op).__name__} {list(op.shape)} ({op.dtype} on {op.device})"


class LinearOperator(abc.ABC):
    """A linear map ``[m, n]`` applied matrix-free (module docstring).

    Subclasses define :attr:`shape` and :meth:`_matmat`, and either set ``self._dtype`` /
    ``self._device`` (and ``self._layout`` for list operands) or override the properties;
    optionally :meth:`_rmatmat` (the adjoint; symmetric operators set ``symmetric = True``
    and get it for free) and :meth:`_check_result` (e.g. a finiteness check of the result).

    Class attributes:
        symmetric: the operator equals its adjoint (curvature matrices, their inverses).
        dense_warning_size: :meth:`to_dense` emits a :class:`PerformanceWarning` when the
            larger dimension exceeds it.
    """

    symmetric: ClassVar[bool] = False
    dense_warning_size: ClassVar[int] = 4096
    _layout: VectorLayout | None = None

    # -- description -----------------------------------------------------------------
    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """``(m, n)``: products map ``[n]`` to ``[m]``."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype every operand must have."""
        return self._stored("_dtype")

    @property
    def device(self) -> torch.device:
        """The device every operand must live on."""
        return self._stored("_device")

    @property
    def layout(self) -> VectorLayout | None:
        """How the flat vector maps to a list of tensors (``None``: no list form)."""
        return self._layout

    def _stored(self, name: str) -> Any:
        try:
            return self.__dict__[name]
        except KeyError:
            raise NotImplementedError(f"{type(self).__name__} must set self.{name} or override the property") from None

    # -- what subclasses implement ---------------------------------------------------------
    @abc.abstractmethod
    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        """A·X for a checked ``X [n, k]`` -> ``[m, k]``."""

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """Aᵀ·Y for a checked ``Y [m, k]`` -> ``[n, k]``."""
        if self.symmetric:
            return self._matmat(Y)
        raise NotImplementedError(f"{type(self).__name__} does not implement its adjoint product")

    def _check_result(self, Y: torch.Tensor, X: torch.Tensor, caller: str) -> None:
        """Called on every public product's result ``Y`` (operand ``X``); default: nothing."""

    def _product(self, X: torch.Tensor, adjoint: bool, caller: str) -> torch.Tensor:
        """The checked product of a normalised ``X [n, k]`` (k = 0 gives an empty ``[m, 0]``)."""
        if X.shape[1] == 0:
            return X.new_zeros(self.shape[1] if adjoint else self.shape[0], 0)
        Y = self._rmatmat(X) if adjoint else self._matmat(X)
        self._check_result(Y, X, caller)
        return Y

    # -- checks --------------------------------------------------------------------------
    def _normalise(self, x: Operand, n: int, caller: str) -> tuple[torch.Tensor, str]:
        """Operand -> (``[n, k]``, form) with form ``"vector"``, ``"matrix"`` or ``"list"``."""
        if isinstance(x, (list, tuple)):
            layout = self.layout
            if layout is None:
                raise ShapeError(f"{caller}: {type(self).__name__} has no list form; pass a tensor [{n}] or [{n}, k]")
            x = layout.to_vector(list(x), caller)
            form = "list"
        elif not isinstance(x, torch.Tensor):
            raise ShapeError(f"{caller}: expected a tensor [{n}] / [{n}, k] or a list of tensors, got {type(x).__name__}")
        else:
            form = "vector" if x.ndim == 1 else "matrix"
        if x.dtype != self.dtype or x.device != self.device:
            raise DTypeDeviceError(
                f"{caller}: the operator is {self.dtype} on {self.device}, the operand is {x.dtype} on {x.device}"
            )
        if x.ndim == 1 and x.shape[0] == n:
            return x.unsqueeze(1), form
        if x.ndim == 2 and x.shape[0] == n:
            return x, form
        raise ShapeError(f"{caller}: expected [{n}] or [{n}, k], got {list(x.shape)}")

    def _restore(self, Y: torch.Tensor, form: str, caller: str) -> Operand:
        if form == "matrix":
            return Y
        if form == "list":
            assert self.layout is not None
            return self.layout.to_tensors(Y[:, 0], caller)
        return Y[:, 0]

    # -- public products --------------------------------------------------------------------
    def _public(self, x: Any, adjoint: bool, matrix: bool, name: str) -> Any:
        """Check and normalise ``x`` once, apply A (or Aᵀ), restore the operand's form."""
        caller = f"{type(self).__name__}.{name}"
        n = self.shape[0] if adjoint else self.shape[1]
        if matrix and (not isinstance(x, torch.Tensor) or x.ndim != 2):
            raise ShapeError(f"{caller}: expected a matrix [{n}, k], got {_shape_of(x)}")
        X, form = self._normalise(x, n, caller)
        return self._restore(self._product(X, adjoint, caller), form, caller)

    def matvec(self, x: Operand) -> Operand:
        """A·x for x ``[n]``, ``[n, k]`` or a list shaped like :attr:`layout` (same form out)."""
        return self._public(x, False, False, "matvec")

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """A·X for ``X [n, k]`` -> ``[m, k]``."""
        return self._public(X, False, True, "matmat")

    def rmatvec(self, y: Operand) -> Operand:
        """Aᵀ·y for y ``[m]``, ``[m, k]`` or a list (same form out)."""
        return self._public(y, True, False, "rmatvec")

    def rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        """Aᵀ·Y for ``Y [m, k]`` -> ``[n, k]``."""
        return self._public(Y, True, True, "rmatmat")

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, LinearOperator):
            return ProductOperator(self, other)
        if isinstance(other, (torch.Tensor, list, tuple)):
            return self.matvec(other)
        return NotImplemented

    # -- lazy algebra --------------------------------------------------------------------
    def __add__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return SumOperator((self, other))
        return NotImplemented

    def __radd__(self, other: Any) -> LinearOperator:
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:  # sum([A, B, ...])
            return self
        return NotImplemented

    def __sub__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            _check_combinable((self, other), "operator difference")  # before wrapping: both names in errors
            return SumOperator((self, ScaledOperator(other, -1.0)))
        return NotImplemented

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def __mul__(self, c: Any) -> LinearOperator:
        if isinstance(c, bool) or not isinstance(c, Real):
            return NotImplemented
        return ScaledOperator(self, float(c))

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> LinearOperator:
        if isinstance(c, bool) or not isinstance(c, Real):
            return NotImplemented
        return ScaledOperator(self, 1.0 / float(c))

    def adjoint(self) -> LinearOperator:
        """Aᵀ as an operator (``self`` for a symmetric operator)."""
        return self if self.symmetric else AdjointOperator(self)

    @property
    def T(self) -> LinearOperator:
        """The transpose (= adjoint: curvlib's operators are real)."""
        return self.adjoint()

    H = T

    # -- exports ---------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """A as a dense ``[m, n]`` matrix, column j = A e_j (tests and small operators;
        :class:`PerformanceWarning` above :attr:`dense_warning_size`)."""
        m, n = self.shape
        if max(m, n) > self.dense_warning_size:
            warn(
                f"{type(self).__name__}.to_dense() forms a dense {m} × {n} matrix",
                PerformanceWarning,
            )
        return self._matmat(torch.eye(n, dtype=self.dtype, device=self.device))

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` of the same shape: float64 numpy in and out,
        converted to the operator's dtype and device for each product."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator  # scipy is optional at import time

        m, n = self.shape

        def wrap(fn, rows: int):
            def apply(x: np.ndarray) -> np.ndarray:
                x = np.asarray(x)
                X = torch.as_tensor(x.reshape(rows, -1), dtype=self.dtype, device=self.device)
                out = fn(X).detach().to(torch.float64).cpu().numpy()
                return out.reshape(-1) if x.ndim == 1 else out
            return apply

        return ScipyOperator((m, n), matvec=wrap(self.matmat, n), rmatvec=wrap(self.rmatmat, m),
                             matmat=wrap(self.matmat, n), rmatmat=wrap(self.rmatmat, m), dtype=np.float64)

    def __repr__(self) -> str:
        return f"<{_describe(self)}>"


def _shape_of(x: Any) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_combinable(ops: Sequence[LinearOperator], what: str, shapes_equal: bool = True) -> None:
    first = ops[0]
    for other in ops[1:]:
        if shapes_equal and tuple(other.shape) != tuple(first.shape):
            raise ShapeError(f"{what}: shapes differ: {_describe(first)} and {_describe(other)}")
        if other.dtype != first.dtype or other.device != first.device:
            raise DTypeDeviceError(f"{what}: dtypes/devices differ: {_describe(first)} and {_describe(other)}")


def _first_layout(ops: Sequence[LinearOperator]) -> VectorLayout | None:
    return next((op.layout for op in ops if op.layout is not None), None)


class SumOperator(LinearOperator):
    """A₁ + A₂ + … (lazy); all terms of one shape, dtype and device."""

    def __init__(self, terms: Sequence[LinearOperator]) -> None:
        flat: list[LinearOperator] = []
        for t in terms:
            if not isinstance(t, LinearOperator):
                raise ShapeError(f"SumOperator: expected LinearOperator terms, got {type(t).__name__}")
            flat.extend(t.terms if isinstance(t, SumOperator) else (t,))
        _check_combinable(flat, "operator sum")
        self.terms: tuple[LinearOperator, ...] = tuple(flat)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.terms[0].shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.terms[0].dtype

    @property
    def device(self) -> torch.device:
        return self.terms[0].device

    @property
    def layout(self) -> VectorLayout | None:
        return _first_layout(self.terms)

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return all(t.symmetric for t in self.terms)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        out = self.terms[0]._matmat(X)
        for t in self.terms[1:]:
            out = out + t._matmat(X)
        return out

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        out = self.terms[0]._rmatmat(Y)
        for t in self.terms[1:]:
            out = out + t._rmatmat(Y)
        return out

    def adjoint(self) -> LinearOperator:
        return self if self.symmetric else SumOperator([t.adjoint() for t in self.terms])

    def __repr__(self) -> str:
        return " + ".join(repr(t) for t in self.terms)


class ScaledOperator(LinearOperator):
    """c·A (lazy), c a real number."""

    def __init__(self, op: LinearOperator, c: float) -> None:
        if isinstance(op, ScaledOperator):
            op, c = op.op, op.c * c
        self.op, self.c = op, float(c)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.op.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    @property
    def layout(self) -> VectorLayout | None:
        return self.op.layout

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self.op.symmetric

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.c * self.op._matmat(X)

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.c * self.op._rmatmat(Y)

    def adjoint(self) -> LinearOperator:
        return self if self.symmetric else ScaledOperator(self.op.adjoint(), self.c)

    def __repr__(self) -> str:
        return f"{self.c:g} * {self.op!r}"


class ProductOperator(LinearOperator):
    """A·B (lazy): B is applied first; A ``[m, r]``, B ``[r, n]``."""

    def __init__(self, A: LinearOperator, B: LinearOperator) -> None:
        _check_combinable((A, B), "operator product", shapes_equal=False)
        if A.shape[1] != B.shape[0]:
            raise ShapeError(f"operator product: inner dimensions differ: {_describe(A)} @ {_describe(B)}")
        self.A, self.B = A, B

    @property
    def shape(self) -> tuple[int, int]:
        return (self.A.shape[0], self.B.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    @property
    def layout(self) -> VectorLayout | None:
        return _first_layout((self.A, self.B)) if self.shape[0] == self.shape[1] else None

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.A._matmat(self.B._matmat(X))

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.B._rmatmat(self.A._rmatmat(Y))

    def adjoint(self) -> LinearOperator:
        return ProductOperator(self.B.adjoint(), self.A.adjoint())

    def __repr__(self) -> str:
        return f"({self.A!r} @ {self.B!r})"


class AdjointOperator(LinearOperator):
    """Aᵀ (lazy): products are A's adjoint products."""

    def __init__(self, op: LinearOperator) -> None:
        self.op = op

    @property
    def shape(self) -> tuple[int, int]:
        return (self.op.shape[1], self.op.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    @property
    def layout(self) -> VectorLayout | None:
        return self.op.layout

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.op._rmatmat(X)

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.op._matmat(Y)

    def adjoint(self) -> LinearOperator:
        return self.op

    def __repr__(self) -> str:
        return f"{self.op!r}.T"


class DenseOperator(LinearOperator):
    """A dense matrix ``M [m, n]`` as an operator (references, small blocks, user matrices).

    Args:
        M: the matrix.
        symmetric: declare M = Mᵀ (not checked beyond the shape).
        layout: optional list form of the vectors.
    """

    def __init__(self, M: torch.Tensor, *, symmetric: bool = False, layout: VectorLayout | None = None) -> None:
        if not isinstance(M, torch.Tensor) or M.ndim != 2:
            raise ShapeError(f"DenseOperator: expected a matrix [m, n], got {_shape_of(M)}")
        if symmetric and M.shape[0] != M.shape[1]:
            raise ShapeError(f"DenseOperator: a symmetric matrix must be square, got {list(M.shape)}")
        self.M = M
        self._symmetric = bool(symmetric)
        self._layout = layout

    @property
    def shape(self) -> tuple[int, int]:
        return (self.M.shape[0], self.M.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.M.dtype

    @property
    def device(self) -> torch.device:
        return self.M.device

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self._symmetric

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.M @ X

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self.M.T @ Y

    def to_dense(self) -> torch.Tensor:
        return self.M.clone()


class IdentityOperator(LinearOperator):
    """I ``[n, n]`` (e.g. ``F + lam * IdentityOperator.like(F)`` for the damped curvature)."""

    symmetric = True

    def __init__(self, n: int, *, dtype: torch.dtype, device: torch.device | str,
                 layout: VectorLayout | None = None) -> None:
        self.n, self._dtype, self._device, self._layout = int(n), dtype, torch.device(device), layout

    @classmethod
    def like(cls, op: LinearOperator) -> IdentityOperator:
        """The identity on ``op``'s domain, with its dtype, device and layout."""
        return cls(op.shape[1], dtype=op.dtype, device=op.device, layout=op.layout)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.n)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return X.clone()


class PermutationOperator(LinearOperator):
    """P ``[n, n]`` with (P x)_j = x_{index[j]}: a reordering of the coordinates (Pᵀ = P⁻¹).

    Args:
        index: ``[n]`` a permutation of ``0 … n−1`` (checked).
        dtype, device: of the vectors it reorders.
    """

    def __init__(self, index: torch.Tensor, *, dtype: torch.dtype, device: torch.device | str) -> None:
        index = torch.as_tensor(index, dtype=torch.long, device=device)
        n = index.numel()
        if index.ndim != 1 or not bool((index.sort().values == torch.arange(n, device=index.device)).all()):
            raise ShapeError(f"PermutationOperator: expected a permutation of 0…{n - 1}, got {index.tolist()[:8]}…")
        self.index = index
        self._dtype, self._device = dtype, torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.index.numel()
        return (n, n)

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return X[self.index]

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(Y)
        out[self.index] = Y
        return out


class SubmatrixOperator(LinearOperator):
    """A[rows, cols] of an operator A, applied matrix-free: A·(embedded x), then the rows kept.

    Args:
        op: A ``[m, n]``.
        rows, cols: contiguous ``slice``s of A's rows and columns.
    """

    def __init__(self, op: LinearOperator, rows: slice, cols: slice) -> None:
        m, n = op.shape
        for what, s, size in (("rows", rows, m), ("cols", cols, n)):
            if not isinstance(s, slice) or s.step not in (None, 1) or not 0 <= s.start < s.stop <= size:
                raise ShapeError(f"SubmatrixOperator: {what} must be a slice inside [0, {size}), got {s!r}")
        self.op, self.rows, self.cols = op, rows, cols

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)

    @property
    def dtype(self) -> torch.dtype:
        return self.op.dtype

    @property
    def device(self) -> torch.device:
        return self.op.device

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return self.op.symmetric and self.rows == self.cols

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        full = X.new_zeros(self.op.shape[1], X.shape[1])
        full[self.cols] = X
        return self.op._matmat(full)[self.rows]

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        full = Y.new_zeros(self.op.shape[0], Y.shape[1])
        full[self.rows] = Y
        return self.op._rmatmat(full)[self.cols]
