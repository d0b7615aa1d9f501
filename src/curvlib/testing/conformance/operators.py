"""Conformance checks of a linear operator (any :class:`curvlib.linalg.LinearOperator`):
the operand forms, products and adjoint products against an independent dense float64
reference, the lazy algebra, the dense and scipy exports, and the errors."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from curvlib.errors import DTypeDeviceError, ShapeError
from curvlib.linalg.operator import DenseOperator, IdentityOperator, LinearOperator, SumOperator
from curvlib.testing.compare import assert_close, assert_symmetric, default_tolerances
from curvlib.testing.conformance._common import _expect, _NoPerformanceWarnings

__all__ = ["OperatorConformance"]

_F64 = torch.float64


def _bound(*factors: torch.Tensor) -> float:
    """max entry of |F_1|·|F_2|·…·|F_k| (float64): the scale of the rounding of the product
    F_1 F_2 … F_k, so that a tolerance means the same for tiny and huge operators."""
    out = factors[-1].detach().to(_F64).cpu().abs()
    for F in reversed(factors[:-1]):
        out = F.detach().to(_F64).cpu().abs() @ out
    return float(out.max()) if out.numel() else 0.0


def _other_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.float64 else torch.float64


class OperatorConformance:
    """Checks of one :class:`~curvlib.linalg.LinearOperator` (scipy's ``LinearOperator``
    contract, written for curvlib's operator base).

    The subclass implements :meth:`make_operator`, returning ``(op, dense)``: the operator
    under test and an **independent** dense float64 reference ``[m, n]`` of it (built
    another way: ``torch.func``, ``torch.kron`` of the factors, ``torch.linalg.solve`` of
    the dense damped matrix — never ``op.to_dense()``), and sets:

    - ``linear`` (default ``True``): the map is linear.  ``False`` (e.g. a two-level
      preconditioner whose coarse basis is built from u) runs the form checks only:
      operand forms, shapes, dtypes and errors; ``dense`` may then be ``None``;
    - ``has_adjoint`` (default ``True``): ``rmatvec``/``rmatmat``/``op.T`` are available and
      equal ``denseᵀ``; ``False``: ``rmatvec`` must raise ``NotImplementedError``;
    - ``rtol``: relative tolerance (default: the dtype's, :func:`~curvlib.testing.compare.default_tolerances`);
      the absolute tolerance is ``rtol`` times max|D|·|X| of the product compared (the
      operator's scale), so an iterative operator sets its solver tolerance times κ;
    - ``num_columns``: k of the ``[n, k]`` operands; ``seed``: of the random operands.

    Checks (each a ``test_*`` method; :meth:`case` builds the operator once per class):

    - forms: ``[n]`` -> ``[m]``, ``[n, k]`` -> ``[m, k]``, a list shaped like ``op.layout``
      -> the same list form (a list without a layout raises ShapeError); ``op @ x`` is
      ``matvec``; ``matmat`` only takes matrices; the k columns are k products; operands
      are not modified; non-contiguous operands work;
    - values (``linear``): products, ``matmat``, ``rmatvec``/``rmatmat`` and the adjoints
      ``op.T``, ``op.H``, ``op.adjoint()`` against ``dense`` and ``denseᵀ``; ``symmetric``
      operators are symmetric;
    - the lazy algebra against dense: ``op + op``, ``op - 0.5 * op``, ``2.0 * op``,
      ``op / 4``, ``-op``, ``(op + 0.5 * op) @ x``, ``sum([op, op])``, products with
      :class:`~curvlib.linalg.IdentityOperator` and rectangular
      :class:`~curvlib.linalg.DenseOperator` s on both sides, ``op @ op``, ``op.T @ op``,
      ``(A @ B).T = BᵀAᵀ`` and the adjoint of sums and multiples;
    - exports: ``to_dense()`` and ``to_scipy()`` (matvec, rmatvec, matmat, rmatmat in float64);
    - errors: a wrong length raises ShapeError, another dtype DTypeDeviceError, a
      non-tensor ShapeError; combining with an operator of another shape (ShapeError) or
      dtype (DTypeDeviceError) names both classes in the message.

    Random operands come from a ``torch.Generator`` seeded from ``seed``.  A check can be
    run outside pytest too: ``TestMyOperator().test_matvec_vector_form()``.
    """

    #: the map u -> op @ u is linear (False: only the form checks run)
    linear: ClassVar[bool] = True
    #: rmatvec / rmatmat / op.T are implemented and equal denseᵀ
    has_adjoint: ClassVar[bool] = True
    #: relative tolerance (None: the dtype's)
    rtol: ClassVar[float | None] = None
    #: k, the columns of the matrix operands
    num_columns: ClassVar[int] = 3
    #: seed of the random operands
    seed: ClassVar[int] = 0

    # -- what the subclass provides ------------------------------------------------------------
    def make_operator(self) -> tuple[LinearOperator, torch.Tensor | None]:
        """``(op, dense)``: the operator under test and its independent dense float64
        reference ``[m, n]`` (``None`` allowed only with ``linear = False``)."""
        raise NotImplementedError(
            f"{type(self).__name__}: implement make_operator() returning (op, dense) with dense an independent "
            "float64 reference matrix of op"
        )

    # -- helpers ---------------------------------------------------------------------------------
    def case(self) -> tuple[LinearOperator, torch.Tensor | None]:
        """:meth:`make_operator`, built once per test class and checked (the checks never
        modify the operator)."""
        cls = type(self)
        if "_operator_case" not in cls.__dict__:
            with _NoPerformanceWarnings():
                op, dense = self.make_operator()
            name = cls.__name__
            _expect(isinstance(op, LinearOperator),
                    f"{name}.make_operator(): expected a curvlib.linalg.LinearOperator, got {type(op).__name__}")
            if dense is None:
                _expect(not self.linear, f"{name}.make_operator(): a linear operator needs its dense reference, got None")
            else:
                _expect(isinstance(dense, torch.Tensor) and dense.dtype == _F64 and dense.ndim == 2,
                        f"{name}.make_operator(): expected a dense float64 reference [m, n], got "
                        f"{getattr(dense, 'dtype', type(dense).__name__)} {list(getattr(dense, 'shape', []))}")
                dense = dense.detach().cpu()
            cls._operator_case = (op, dense)
        return cls.__dict__["_operator_case"]

    def _name(self, op: Any) -> str:
        return type(op).__name__

    def _names_op(self, op: LinearOperator, msg: str) -> bool:
        """Whether an error message names ``op``: its class, or for a :class:`SumOperator`
        (flattened into the sums it takes part in) the class of one of its terms."""
        names = {type(op).__name__}
        if isinstance(op, SumOperator):
            names |= {type(t).__name__ for t in op.terms}
        return any(n in msg for n in names)

    def _rtol(self, op: LinearOperator) -> float:
        return float(self.rtol) if self.rtol is not None else default_tolerances(op.dtype)[0]

    def _random(self, shape: tuple[int, ...], salt: int, op: LinearOperator, dtype: torch.dtype | None = None) -> torch.Tensor:
        """N(0, 1) entries drawn in float64 from ``(seed, salt)``, in ``dtype`` (default op's) on op's device."""
        g = torch.Generator().manual_seed(1000 * int(self.seed) + int(salt))
        return torch.randn(*shape, generator=g, dtype=_F64).to(dtype=dtype or op.dtype, device=op.device)

    def _close(self, op: LinearOperator, actual: Any, expected: torch.Tensor, bound: float, what: str) -> None:
        """``actual`` ≈ ``expected`` (float64) with atol = rtol·``bound``."""
        _expect(isinstance(actual, torch.Tensor),
                f"{self._name(op)}: {what}: expected a torch.Tensor, got {type(actual).__name__}")
        rtol = self._rtol(op)
        atol = rtol * max(bound, torch.finfo(_F64).tiny)
        assert_close(actual.detach().to(_F64).cpu(), expected.to(_F64), rtol=rtol, atol=atol,
                     msg=f"{self._name(op)}: {what}")

    def _form(self, op: LinearOperator, out: Any, shape: tuple[int, ...], what: str) -> None:
        """``out`` is a tensor of ``shape`` in op's dtype and on its device."""
        _expect(isinstance(out, torch.Tensor), f"{self._name(op)}: {what}: expected a torch.Tensor, got {type(out).__name__}")
        _expect(tuple(out.shape) == tuple(shape),
                f"{self._name(op)}: {what}: expected shape {list(shape)}, got {list(out.shape)}")
        _expect(out.dtype == op.dtype and out.device == op.device,
                f"{self._name(op)}: {what}: expected {op.dtype} on {op.device}, got {out.dtype} on {out.device}")

    def _linear_case(self) -> tuple[LinearOperator, torch.Tensor]:
        if not self.linear:
            pytest.skip(f"{type(self).__name__} declares linear = False: value checks do not apply")
        op, dense = self.case()
        assert dense is not None
        return op, dense

    def _adjoint_case(self) -> tuple[LinearOperator, torch.Tensor]:
        op, dense = self._linear_case()
        if not self.has_adjoint:
            pytest.skip(f"{type(self).__name__} declares has_adjoint = False")
        return op, dense

    def _square_case(self, adjoint: bool = False) -> tuple[LinearOperator, torch.Tensor]:
        op, dense = self._adjoint_case() if adjoint else self._linear_case()
        if op.shape[0] != op.shape[1]:
            pytest.skip(f"{self._name(op)} is rectangular {list(op.shape)}")
        return op, dense

    def _expression(self, op: LinearOperator, expr: Any, D: torch.Tensor, bound_factors: tuple[torch.Tensor, ...],
                    what: str, salt: int) -> None:
        """An operator expression ``expr`` with dense value D: a LinearOperator of D's shape
        whose vector and matrix products equal D·x (bound from ``bound_factors`` and x)."""
        _expect(isinstance(expr, LinearOperator),
                f"{self._name(op)}: {what}: expected a LinearOperator, got {type(expr).__name__}")
        _expect(tuple(expr.shape) == tuple(D.shape),
                f"{self._name(op)}: {what}: expected shape {list(D.shape)}, got {list(expr.shape)}")
        _expect(expr.dtype == op.dtype and expr.device == op.device,
                f"{self._name(op)}: {what}: expected {op.dtype} on {op.device}, got {expr.dtype} on {expr.device}")
        X = self._random((D.shape[1], self.num_columns), salt, op)
        X64 = X.to(_F64).cpu()
        bound = _bound(*bound_factors, X64)
        out = expr @ X
        self._form(op, out, (D.shape[0], self.num_columns), f"({what}) @ X")
        self._close(op, out, D @ X64, bound, f"expected ({what}) @ X == its dense value @ X")
        out = expr @ X[:, 0]
        self._form(op, out, (D.shape[0],), f"({what}) @ x")
        self._close(op, out, D @ X64[:, 0], bound, f"expected ({what}) @ x == its dense value @ x")

    # -- forms -----------------------------------------------------------------------------------
    def test_describes_shape_dtype_device(self) -> None:
        """``shape`` is ``(m, n)`` of ints (the reference's), ``dtype`` a torch.dtype, ``device`` a torch.device."""
        op, dense = self.case()
        shape = tuple(op.shape)
        _expect(len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape),
                f"{self._name(op)}: expected shape (m, n) of ints ≥ 0, got {op.shape!r}")
        _expect(isinstance(op.dtype, torch.dtype), f"{self._name(op)}: expected a torch.dtype, got {op.dtype!r}")
        _expect(isinstance(op.device, torch.device), f"{self._name(op)}: expected a torch.device, got {op.device!r}")
        if dense is not None:
            _expect(shape == tuple(dense.shape),
                    f"{self._name(op)}: expected op.shape == dense reference shape {list(dense.shape)}, got {list(shape)}")

    def test_matvec_vector_form(self) -> None:
        """``matvec(x [n])`` -> ``[m]`` in op's dtype/device, equal to dense·x."""
        op, dense = self.case()
        m, n = op.shape
        x = self._random((n,), 1, op)
        out = op.matvec(x)
        self._form(op, out, (m,), "matvec(x [n])")
        if self.linear:
            x64 = x.to(_F64).cpu()
            self._close(op, out, dense @ x64, _bound(dense, x64), "expected matvec(x [n]) == dense @ x")

    def test_matvec_matrix_form(self) -> None:
        """``matvec(X [n, k])`` -> ``[m, k]``, equal to dense·X."""
        op, dense = self.case()
        m, n = op.shape
        X = self._random((n, self.num_columns), 2, op)
        out = op.matvec(X)
        self._form(op, out, (m, self.num_columns), "matvec(X [n, k])")
        if self.linear:
            X64 = X.to(_F64).cpu()
            self._close(op, out, dense @ X64, _bound(dense, X64), "expected matvec(X [n, k]) == dense @ X")

    def test_matmul_is_matvec(self) -> None:
        """``op @ x`` and ``op @ X`` are ``matvec``."""
        op, _ = self.case()
        n = op.shape[1]
        for x, form in ((self._random((n,), 3, op), "[n]"), (self._random((n, self.num_columns), 4, op), "[n, k]")):
            a, b = op @ x, op.matvec(x)
            self._form(op, a, tuple(b.shape), f"op @ x {form}")
            self._close(op, a, b.to(_F64).cpu(), _bound(b), f"expected op @ x {form} == op.matvec(x)")

    def test_matmat(self) -> None:
        """``matmat(X [n, k])`` -> ``[m, k]`` equal to dense·X; a vector raises ShapeError."""
        op, dense = self.case()
        m, n = op.shape
        X = self._random((n, self.num_columns), 5, op)
        out = op.matmat(X)
        self._form(op, out, (m, self.num_columns), "matmat(X [n, k])")
        if self.linear:
            X64 = X.to(_F64).cpu()
            self._close(op, out, dense @ X64, _bound(dense, X64), "expected matmat(X) == dense @ X")
        with pytest.raises(ShapeError):
            op.matmat(X[:, 0])

    def test_list_form(self) -> None:
        """With a layout: a list shaped like ``op.layout.shapes`` gives the same list form,
        equal to ``layout.to_tensors(dense @ x)``; without one a list raises ShapeError."""
        op, dense = self.case()
        m, n = op.shape
        x = self._random((n,), 6, op)
        layout = op.layout
        if layout is None:
            with pytest.raises(ShapeError):
                op.matvec([x])
            return
        caller = f"{self._name(op)} conformance"
        xs = layout.to_tensors(x, caller)
        shapes = [tuple(s) for s in layout.shapes]
        _expect([tuple(t.shape) for t in xs] == shapes,
                f"{self._name(op)}: layout.to_tensors gave shapes {[list(t.shape) for t in xs]}, layout.shapes {shapes}")
        out = op.matvec(xs)
        _expect(isinstance(out, list) and len(out) == len(shapes),
                f"{self._name(op)}: expected matvec(list) to return a list of {len(shapes)} tensors, got "
                f"{type(out).__name__}{'' if not isinstance(out, list) else f' of {len(out)}'}")
        _expect([tuple(t.shape) for t in out] == shapes,
                f"{self._name(op)}: expected matvec(list) shaped like layout.shapes {shapes}, got {[list(t.shape) for t in out]}")
        flat = op.matvec(x)
        for k, (a, b) in enumerate(zip(out, layout.to_tensors(flat, caller))):
            self._form(op, a, tuple(b.shape), f"matvec(list)[{k}]")
            self._close(op, a, b.to(_F64).cpu(), _bound(b), f"expected matvec(list)[{k}] == to_tensors(matvec(x))[{k}]")
        self._close(op, layout.to_vector(out, caller), flat.to(_F64).cpu(), _bound(flat),
                    "expected to_vector(matvec(list)) == matvec(to_vector(list))")
        if self.linear:
            x64 = x.to(_F64).cpu()
            self._close(op, layout.to_vector(out, caller), dense @ x64, _bound(dense, x64),
                        "expected matvec(list) == dense @ x in the flat order")
        _expect(torch.equal(layout.to_vector(xs, caller), x),
                f"{self._name(op)}: expected layout.to_vector(layout.to_tensors(x)) == x exactly")

    def test_columns_are_independent_products(self) -> None:
        """The k columns of ``op @ X`` are the products with the k columns of X."""
        op, _ = self.case()
        n = op.shape[1]
        X = self._random((n, self.num_columns), 7, op)
        out = op @ X
        for j in range(self.num_columns):
            col = op @ X[:, j]
            self._close(op, out[:, j], col.to(_F64).cpu(), _bound(col), f"expected (op @ X)[:, {j}] == op @ X[:, {j}]")

    def test_operand_is_not_modified(self) -> None:
        """Products leave their operand unchanged."""
        op, _ = self.case()
        m, n = op.shape
        for x in (self._random((n,), 8, op), self._random((n, self.num_columns), 9, op)):
            before = x.clone()
            op @ x
            _expect(torch.equal(x, before), f"{self._name(op)}: expected op @ x to leave x {list(x.shape)} unchanged")
        if self.has_adjoint and self.linear:
            y = self._random((m, self.num_columns), 10, op)
            before = y.clone()
            op.rmatmat(y)
            _expect(torch.equal(y, before), f"{self._name(op)}: expected rmatmat(Y) to leave Y unchanged")

    def test_non_contiguous_operand(self) -> None:
        """A non-contiguous ``[n, k]`` operand (a transposed ``[k, n]`` tensor) gives the
        product of its contiguous copy."""
        op, _ = self.case()
        n = op.shape[1]
        Xt = self._random((self.num_columns, n), 11, op)
        X = Xt.T
        expected = op @ X.contiguous()
        out = op @ X
        self._form(op, out, tuple(expected.shape), "op @ X (non-contiguous)")
        self._close(op, out, expected.to(_F64).cpu(), _bound(expected), "expected op @ X.T-view == op @ contiguous copy")

    # -- adjoint -----------------------------------------------------------------------------
    def test_rmatvec_forms_and_values(self) -> None:
        """``rmatvec(y [m])`` -> ``[n]``, ``rmatvec(Y [m, k])``/``rmatmat`` -> ``[n, k]``, a list
        with a (square) layout: all equal denseᵀ·y.  Without an adjoint rmatvec raises
        NotImplementedError."""
        op, dense = self.case()
        m, n = op.shape
        y = self._random((m,), 12, op)
        Y = self._random((m, self.num_columns), 13, op)
        if not self.has_adjoint:
            with pytest.raises(NotImplementedError) as info:
                op.rmatvec(y)
            _expect(self._name(op) in str(info.value),
                    f"expected the NotImplementedError of rmatvec to name {self._name(op)}; got: {info.value}")
            return
        if not self.linear:
            pytest.skip(f"{type(self).__name__} declares linear = False")
        assert dense is not None
        y64, Y64 = y.to(_F64).cpu(), Y.to(_F64).cpu()
        out = op.rmatvec(y)
        self._form(op, out, (n,), "rmatvec(y [m])")
        self._close(op, out, dense.T @ y64, _bound(dense.T, y64), "expected rmatvec(y) == denseᵀ @ y")
        out = op.rmatvec(Y)
        self._form(op, out, (n, self.num_columns), "rmatvec(Y [m, k])")
        self._close(op, out, dense.T @ Y64, _bound(dense.T, Y64), "expected rmatvec(Y) == denseᵀ @ Y")
        out = op.rmatmat(Y)
        self._form(op, out, (n, self.num_columns), "rmatmat(Y [m, k])")
        self._close(op, out, dense.T @ Y64, _bound(dense.T, Y64), "expected rmatmat(Y) == denseᵀ @ Y")
        with pytest.raises(ShapeError):
            op.rmatmat(y)
        with pytest.raises(ShapeError):
            op.rmatvec(self._random((m + 1,), 14, op))
        if op.layout is not None and m == n:
            caller = f"{self._name(op)} conformance"
            out = op.rmatvec(op.layout.to_tensors(y, caller))
            _expect(isinstance(out, list), f"{self._name(op)}: expected rmatvec(list) to return a list, got {type(out).__name__}")
            self._close(op, op.layout.to_vector(out, caller), dense.T @ y64, _bound(dense.T, y64),
                        "expected rmatvec(list) == denseᵀ @ y in the flat order")

    def test_adjoint_operators(self) -> None:
        """``op.T``, ``op.H`` and ``op.adjoint()`` are ``[n, m]`` operators equal to denseᵀ
        (products and their own adjoint products); ``op.T.T`` equals dense."""
        op, dense = self._adjoint_case()
        m, n = op.shape
        for what, adj in (("op.T", op.T), ("op.H", op.H), ("op.adjoint()", op.adjoint())):
            self._expression(op, adj, dense.T, (dense.T,), what, 15)
            Y = self._random((m, self.num_columns), 16, op)
            Y64 = Y.to(_F64).cpu()
            X = self._random((n, self.num_columns), 17, op)
            self._close(op, adj.rmatmat(X), dense @ X.to(_F64).cpu(), _bound(dense, X), f"expected {what}.rmatmat(X) == dense @ X")
            self._close(op, adj.matmat(Y), dense.T @ Y64, _bound(dense.T, Y64), f"expected {what}.matmat(Y) == denseᵀ @ Y")
        self._expression(op, op.T.T, dense, (dense,), "op.T.T", 18)

    def test_symmetric_flag_is_truthful(self) -> None:
        """An operator declaring ``symmetric`` is square with a symmetric reference, and its
        adjoint products equal its products."""
        op, dense = self._linear_case()
        if not op.symmetric:
            pytest.skip(f"{self._name(op)} is not declared symmetric")
        _expect(op.shape[0] == op.shape[1], f"{self._name(op)}: declared symmetric but its shape is {list(op.shape)}")
        assert_symmetric(dense, rtol=max(self._rtol(op), default_tolerances(_F64)[0]),
                         msg=f"{self._name(op)} declares symmetric = True: its dense reference")
        X = self._random((op.shape[1], self.num_columns), 19, op)
        a, b = op.rmatmat(X), op.matmat(X)
        self._close(op, a, b.to(_F64).cpu(), _bound(b), "expected rmatmat(X) == matmat(X) for a symmetric operator")

    # -- algebra ---------------------------------------------------------------------------------
    def test_sum_and_difference(self) -> None:
        """``op + op`` = 2·dense, ``op - 0.5 * op`` = 0.5·dense, ``sum([op, op])`` = 2·dense."""
        op, dense = self._linear_case()
        self._expression(op, op + op, 2 * dense, (2 * dense,), "op + op", 20)
        self._expression(op, op - 0.5 * op, 0.5 * dense, (1.5 * dense,), "op - 0.5 * op", 21)
        self._expression(op, sum([op, op]), 2 * dense, (2 * dense,), "sum([op, op])", 22)
        self._expression(op, sum([op, op, op]), 3 * dense, (3 * dense,), "sum([op, op, op])", 23)

    def test_scalar_multiples(self) -> None:
        """``2.0 * op``, ``op * 2``, ``op / 4`` and ``-op`` against dense."""
        op, dense = self._linear_case()
        self._expression(op, 2.0 * op, 2 * dense, (2 * dense,), "2.0 * op", 24)
        self._expression(op, op * 2, 2 * dense, (2 * dense,), "op * 2", 25)
        self._expression(op, op / 4, dense / 4, (dense / 4,), "op / 4", 26)
        self._expression(op, -op, -dense, (dense,), "-op", 27)
        self._expression(op, -(-op), dense, (dense,), "-(-op)", 28)

    def test_mixed_expression(self) -> None:
        """``(op + 0.5 * op) @ x`` = dense·x + 0.5·dense·x (two products, never densified),
        and ``op + 0.5 * op - op / 4`` = 1.25·dense."""
        op, dense = self._linear_case()
        self._expression(op, op + 0.5 * op, 1.5 * dense, (1.5 * dense,), "op + 0.5 * op", 29)
        self._expression(op, op + 0.5 * op - op / 4, 1.25 * dense, (1.75 * dense,), "op + 0.5 * op - op / 4", 30)
        self._expression(op, 2.0 * (op + op), 4 * dense, (4 * dense,), "2.0 * (op + op)", 31)

    def test_identity_products(self) -> None:
        """``op @ IdentityOperator.like(op)`` and ``IdentityOperator(m) @ op`` equal dense;
        ``op + c·I`` (square) equals dense + c·I."""
        op, dense = self._linear_case()
        m, n = op.shape
        I_n = IdentityOperator.like(op)
        _expect(tuple(I_n.shape) == (n, n) and I_n.dtype == op.dtype and I_n.device == op.device,
                f"{self._name(op)}: expected IdentityOperator.like(op) [{n}, {n}] in {op.dtype} on {op.device}, got {I_n!r}")
        self._expression(op, op @ I_n, dense, (dense,), "op @ IdentityOperator.like(op)", 32)
        I_m = IdentityOperator(m, dtype=op.dtype, device=op.device)
        self._expression(op, I_m @ op, dense, (dense,), "IdentityOperator(m) @ op", 33)
        if m == n:
            eye = torch.eye(n, dtype=_F64)
            self._expression(op, op + 0.3 * I_n, dense + 0.3 * eye, (dense.abs() + 0.3 * eye,), "op + 0.3 * I", 34)

    def test_dense_operator_products(self) -> None:
        """Products with rectangular :class:`DenseOperator` s on both sides:
        ``op @ DenseOperator(B [n, 2])`` = dense·B and ``DenseOperator(C [2, m]) @ op`` = C·dense."""
        op, dense = self._linear_case()
        m, n = op.shape
        B = self._random((n, 2), 35, op)
        C = self._random((2, m), 36, op)
        B64, C64 = B.to(_F64).cpu(), C.to(_F64).cpu()
        self._expression(op, op @ DenseOperator(B), dense @ B64, (dense, B64), "op @ DenseOperator(B)", 37)
        self._expression(op, DenseOperator(C) @ op, C64 @ dense, (C64, dense), "DenseOperator(C) @ op", 38)
        self._expression(op, DenseOperator(C) @ op @ DenseOperator(B), C64 @ dense @ B64, (C64, dense, B64),
                         "DenseOperator(C) @ op @ DenseOperator(B)", 39)

    def test_square_products(self) -> None:
        """``op @ op`` = dense², and (with an adjoint) ``op.T @ op`` = denseᵀ·dense."""
        op, dense = self._square_case()
        self._expression(op, op @ op, dense @ dense, (dense, dense), "op @ op", 40)
        if self.has_adjoint:
            self._expression(op, op.T @ op, dense.T @ dense, (dense.T, dense), "op.T @ op", 41)

    def test_adjoint_of_expressions(self) -> None:
        """The algebra pushed through the adjoint: ``(op @ B).T`` = Bᵀ·denseᵀ,
        ``(C @ op).T`` = denseᵀ·Cᵀ, ``(op + 0.5 * op).T`` = 1.5·denseᵀ, ``(2.0 * op).T``,
        ``(-op).T``; each also through ``rmatmat``."""
        op, dense = self._adjoint_case()
        m, n = op.shape
        B = self._random((n, 2), 42, op)
        C = self._random((2, m), 43, op)
        B64, C64 = B.to(_F64).cpu(), C.to(_F64).cpu()
        cases = [
            ("op @ DenseOperator(B)", op @ DenseOperator(B), dense @ B64, (B64.T, dense.T)),
            ("DenseOperator(C) @ op", DenseOperator(C) @ op, C64 @ dense, (dense.T, C64.T)),
            ("op + 0.5 * op", op + 0.5 * op, 1.5 * dense, (1.5 * dense.T,)),
            ("2.0 * op", 2.0 * op, 2 * dense, (2 * dense.T,)),
            ("-op", -op, -dense, (dense.T,)),
        ]
        for k, (what, expr, D, bound) in enumerate(cases):
            self._expression(op, expr.T, D.T, bound, f"({what}).T", 44 + k)
            Y = self._random((D.shape[0], self.num_columns), 50 + k, op)
            Y64 = Y.to(_F64).cpu()
            self._close(op, expr.rmatmat(Y), D.T @ Y64, _bound(*bound, Y64), f"expected ({what}).rmatmat(Y) == Dᵀ @ Y")

    # -- exports ---------------------------------------------------------------------------------
    def test_to_dense(self) -> None:
        """``to_dense()`` ``[m, n]`` in op's dtype/device equals the reference, and so does
        ``(op + 0.5 * op).to_dense()`` (1.5·dense)."""
        op, dense = self._linear_case()
        with _NoPerformanceWarnings():
            D = op.to_dense()
            D2 = (op + 0.5 * op).to_dense()
        self._form(op, D, tuple(dense.shape), "to_dense()")
        eye = torch.eye(dense.shape[1], dtype=_F64)
        self._close(op, D, dense, _bound(dense, eye), "expected to_dense() == dense reference")
        self._form(op, D2, tuple(dense.shape), "(op + 0.5 * op).to_dense()")
        self._close(op, D2, 1.5 * dense, _bound(1.5 * dense, eye), "expected (op + 0.5 * op).to_dense() == 1.5·dense")

    def test_to_scipy(self) -> None:
        """``to_scipy()``: a float64 scipy ``LinearOperator`` of op's shape whose matvec,
        matmat (and with an adjoint rmatvec, rmatmat) equal dense in numpy."""
        op, dense = self._linear_case()
        m, n = op.shape
        A = op.to_scipy()
        _expect(tuple(A.shape) == (m, n), f"{self._name(op)}: expected to_scipy().shape == {(m, n)}, got {A.shape}")
        _expect(A.dtype == np.float64, f"{self._name(op)}: expected to_scipy().dtype float64, got {A.dtype}")
        X64 = self._random((n, self.num_columns), 60, op, dtype=_F64).cpu()
        Y64 = self._random((m, self.num_columns), 61, op, dtype=_F64).cpu()
        x, X = X64[:, 0].numpy(), X64.numpy()
        checks = [("matvec(x)", A.matvec(x), dense @ X64[:, 0], _bound(dense, X64)),
                  ("matmat(X)", A.matmat(X), dense @ X64, _bound(dense, X64)),
                  ("@ x", A @ x, dense @ X64[:, 0], _bound(dense, X64))]
        if self.has_adjoint:
            checks += [("rmatvec(y)", A.rmatvec(Y64[:, 0].numpy()), dense.T @ Y64[:, 0], _bound(dense.T, Y64)),
                       ("rmatmat(Y)", A.rmatmat(Y64.numpy()), dense.T @ Y64, _bound(dense.T, Y64)),
                       (".T @ y", A.T @ Y64[:, 0].numpy(), dense.T @ Y64[:, 0], _bound(dense.T, Y64))]
        for what, got, expected, bound in checks:
            _expect(isinstance(got, np.ndarray) and got.dtype == np.float64 and got.shape == tuple(expected.shape),
                    f"{self._name(op)}: expected to_scipy().{what} a float64 ndarray {list(expected.shape)}, got "
                    f"{type(got).__name__} {getattr(got, 'dtype', '')} {list(getattr(got, 'shape', []))}")
            self._close(op, torch.from_numpy(np.ascontiguousarray(got)), expected, bound,
                        f"expected to_scipy().{what} == dense in float64")

    # -- errors --------------------------------------------------------------------------------
    def test_wrong_length_raises_shape_error(self) -> None:
        """Operands ``[n + 1]``, ``[n + 1, k]``, ``[n - 1]`` (n > 0) and 3-D raise ShapeError."""
        op, _ = self.case()
        n = op.shape[1]
        bad = [self._random((n + 1,), 62, op), self._random((n + 1, 2), 63, op), self._random((n, 2, 1), 64, op)]
        if n > 0:
            bad.append(self._random((n - 1,), 65, op))
        for x in bad:
            with pytest.raises(ShapeError):
                op @ x
            with pytest.raises(ShapeError):
                op.matvec(x)

    def test_wrong_dtype_raises_dtype_device_error(self) -> None:
        """An operand of another floating dtype (float32 for a float64 operator) raises DTypeDeviceError."""
        op, _ = self.case()
        m, n = op.shape
        other = _other_dtype(op.dtype)
        for x in (self._random((n,), 66, op, dtype=other), self._random((n, 2), 67, op, dtype=other)):
            with pytest.raises(DTypeDeviceError):
                op @ x
        with pytest.raises(DTypeDeviceError):
            op.matmat(self._random((n, 2), 68, op, dtype=other))
        if self.has_adjoint and self.linear:
            with pytest.raises(DTypeDeviceError):
                op.rmatvec(self._random((m,), 69, op, dtype=other))

    def test_non_tensor_raises_shape_error(self) -> None:
        """A numpy array, a number, a string or ``None`` raises ShapeError from ``matvec``;
        with a layout, a list of the wrong length too."""
        op, _ = self.case()
        n = op.shape[1]
        for x in (np.zeros(n), 1.0, "x", None):
            with pytest.raises(ShapeError):
                op.matvec(x)
        with pytest.raises(ShapeError):
            op.matmat(np.zeros((n, 2)))
        layout = op.layout
        if layout is not None:
            xs = layout.to_tensors(self._random((n,), 70, op), f"{self._name(op)} conformance")
            with pytest.raises(ShapeError):
                op.matvec(xs[:-1] if len(xs) > 1 else xs + xs)

    def test_combining_with_another_shape_raises(self) -> None:
        """``op + D`` and ``D + op`` with D of another shape raise ShapeError naming both
        classes, and so does ``op @ D`` with mismatched inner dimensions; ``op - D`` raises
        ShapeError naming op."""
        op, _ = self.case()
        m, n = op.shape
        name = self._name(op)
        other = DenseOperator(torch.zeros(m + 1, n + 1, dtype=op.dtype, device=op.device))
        inner = DenseOperator(torch.zeros(n + 1, 2, dtype=op.dtype, device=op.device))
        for what, fn in (("op + D", lambda: op + other), ("D + op", lambda: other + op), ("op @ D", lambda: op @ inner)):
            with pytest.raises(ShapeError) as info:
                fn()
            msg = str(info.value)
            _expect(self._names_op(op, msg) and "DenseOperator" in msg,
                    f"{name}: expected the ShapeError of {what} to name both {name} and DenseOperator; got: {msg}")
        with pytest.raises(ShapeError) as info:
            op - other
        _expect(self._names_op(op, str(info.value)),
                f"{name}: expected the ShapeError of op - D to name {name}; got: {info.value}")

    def test_combining_with_another_dtype_raises(self) -> None:
        """``op + D``, ``D + op`` and ``op @ D`` with D of another dtype raise DTypeDeviceError
        naming both classes."""
        op, _ = self.case()
        m, n = op.shape
        name = self._name(op)
        dt = _other_dtype(op.dtype)
        same = DenseOperator(torch.zeros(m, n, dtype=dt, device=op.device))
        right = DenseOperator(torch.zeros(n, 2, dtype=dt, device=op.device))
        for what, fn in (("op + D", lambda: op + same), ("D + op", lambda: same + op), ("op @ D", lambda: op @ right)):
            with pytest.raises(DTypeDeviceError) as info:
                fn()
            msg = str(info.value)
            _expect(self._names_op(op, msg) and "DenseOperator" in msg,
                    f"{name}: expected the DTypeDeviceError of {what} to name both {name} and DenseOperator; got: {msg}")
