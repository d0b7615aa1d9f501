"""The operator base itself (curvlib.linalg.operator) on DenseOperators: how the lazy algebra
flattens and pushes through the adjoint, the symmetric flags, the errors, IdentityOperator,
rectangular products, and a hypothesis property: random lazy expressions equal their dense
evaluation (float64, column-major conventions irrelevant here: plain matrices)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.sparse.linalg import cg

from curvlib.errors import CurvlibError, DTypeDeviceError, PerformanceWarning, ShapeError
from curvlib.linalg import (
    AdjointOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    ProductOperator,
    ScaledOperator,
    SumOperator,
    VectorLayout,
)
from curvlib.testing.compare import assert_close, default_tolerances
from curvlib.testing.strategies import dims, matrices, seeds

F64 = torch.float64


def randn(*shape: int, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def sym(n: int, seed: int) -> torch.Tensor:
    X = randn(n, n, seed=seed)
    return X + X.T


def close(actual: torch.Tensor, expected: torch.Tensor, *bound_factors: torch.Tensor, msg: str = "") -> None:
    """assert_close with atol = rtol·max(|F_1|…|F_k|) (the rounding scale of the product)."""
    rtol = default_tolerances(F64)[0]
    scale = bound_factors[-1].abs()
    for F in reversed(bound_factors[:-1]):
        scale = F.abs() @ scale
    assert_close(actual, expected, rtol=rtol, atol=rtol * max(float(scale.max()), 1e-300), msg=msg)


class Forward(LinearOperator):
    """A non-symmetric operator with no adjoint product (only ``_matmat``)."""

    def __init__(self, M: torch.Tensor) -> None:
        self.M = M

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.M.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.M.dtype

    @property
    def device(self) -> torch.device:
        return self.M.device

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.M @ X


class SymmetricForward(Forward):
    """Symmetric, ``_matmat`` only: the adjoint comes from the flag."""

    symmetric = True


class TwoParts(VectorLayout):
    """``[n]`` -> ``[2]`` and ``[n - 2]``."""

    def __init__(self, n: int) -> None:
        self.n = n

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [(2,), (self.n - 2,)]

    def to_vector(self, tensors, caller: str) -> torch.Tensor:
        if len(tensors) != 2:
            raise ShapeError(f"{caller}: expected 2 tensors, got {len(tensors)}")
        return torch.cat(list(tensors))

    def to_tensors(self, v: torch.Tensor, caller: str) -> list[torch.Tensor]:
        return [v[:2], v[2:]]


# --------------------------------------------------------------------------- flattening
def test_sums_flatten_into_one_sum_of_the_leaves():
    A, B, C = (DenseOperator(randn(4, 3, seed=s)) for s in (1, 2, 3))
    for expr in ((A + B) + C, A + (B + C), sum([A, B, C])):
        assert isinstance(expr, SumOperator)
        assert expr.terms == (A, B, C)
    close((A + B + C).to_dense(), A.M + B.M + C.M, A.M.abs() + B.M.abs() + C.M.abs())


def test_sum_builtin_of_one_operator_is_the_operator():
    A = DenseOperator(randn(3, 3, seed=4))
    assert sum([A]) is A
    assert 0 + A is A
    with pytest.raises(TypeError):
        1 + A
    with pytest.raises(TypeError):
        A + 0  # only sum()'s start value 0 is absorbed, on the left


def test_multiples_of_multiples_collapse_into_one_scaled_operator():
    A = DenseOperator(randn(3, 5, seed=5))
    expr = 2.0 * (3 * (A / 4))
    assert isinstance(expr, ScaledOperator) and expr.op is A and expr.c == pytest.approx(1.5)
    neg = -(-A)
    assert isinstance(neg, ScaledOperator) and neg.op is A and neg.c == 1.0
    close(expr @ torch.ones(5, dtype=F64), 1.5 * A.M.sum(1), 1.5 * A.M, torch.ones(5, dtype=F64))


def test_difference_is_a_sum_with_a_negated_term():
    A, B = DenseOperator(randn(3, 3, seed=6)), DenseOperator(randn(3, 3, seed=7))
    expr = A - B
    assert isinstance(expr, SumOperator) and expr.terms[0] is A
    assert isinstance(expr.terms[1], ScaledOperator) and expr.terms[1].op is B and expr.terms[1].c == -1.0
    close(expr.to_dense(), A.M - B.M, A.M.abs() + B.M.abs())


@pytest.mark.parametrize("c", [True, "2", None, torch.tensor(2.0), [2.0]])
def test_multiples_need_a_real_number(c):
    A = DenseOperator(torch.eye(2, dtype=F64))
    with pytest.raises(TypeError):
        A * c
    with pytest.raises(TypeError):
        A / c


def test_matmul_with_other_objects_is_not_supported():
    A = DenseOperator(torch.eye(2, dtype=F64))
    for other in (3, 2.0, "x", None):
        with pytest.raises(TypeError):
            A @ other


# --------------------------------------------------------------------------- the adjoint pushed through
def test_adjoint_of_a_product_is_the_reversed_product_of_adjoints():
    A, B = DenseOperator(randn(5, 3, seed=8)), DenseOperator(randn(3, 4, seed=9))
    PT = (A @ B).T
    assert isinstance(PT, ProductOperator) and tuple(PT.shape) == (4, 5)
    assert isinstance(PT.A, AdjointOperator) and PT.A.op is B
    assert isinstance(PT.B, AdjointOperator) and PT.B.op is A
    close(PT.to_dense(), (A.M @ B.M).T, B.M.T, A.M.T)


def test_adjoint_of_sums_and_multiples_is_pushed_to_the_leaves():
    A, B = DenseOperator(randn(4, 2, seed=10)), DenseOperator(randn(4, 2, seed=11))
    ST = (A + B).T
    assert isinstance(ST, SumOperator) and all(isinstance(t, AdjointOperator) for t in ST.terms)
    assert [t.op for t in ST.terms] == [A, B]
    CT = (2.5 * A).T
    assert isinstance(CT, ScaledOperator) and CT.c == 2.5 and isinstance(CT.op, AdjointOperator) and CT.op.op is A
    close(ST.to_dense(), (A.M + B.M).T, A.M.abs().T + B.M.abs().T)
    close(CT.to_dense(), 2.5 * A.M.T, 2.5 * A.M.T)


def test_double_adjoint_is_the_operator_and_H_is_T():
    A = DenseOperator(randn(3, 4, seed=12))
    assert A.T.T is A
    assert A.adjoint().adjoint() is A
    assert type(A.H) is type(A.T) and A.H.op is A


def test_symmetric_operators_are_their_own_adjoint():
    S1, S2 = DenseOperator(sym(4, 13), symmetric=True), DenseOperator(sym(4, 14), symmetric=True)
    assert S1.T is S1 and S1.H is S1 and S1.adjoint() is S1
    expr = S1 + 0.5 * S2
    assert expr.symmetric and expr.T is expr
    scaled = -3 * S1
    assert scaled.symmetric and scaled.T is scaled
    I = IdentityOperator(4, dtype=F64, device="cpu")
    assert I.symmetric and I.T is I


def test_symmetric_flags_of_combinations():
    S = DenseOperator(sym(3, 15), symmetric=True)
    N = DenseOperator(randn(3, 3, seed=16))
    assert not (S + N).symmetric
    assert not (S @ S.T).symmetric  # a product is not declared symmetric (S1 S2 ≠ S2 S1 in general)
    assert not N.T.symmetric
    assert (S - S / 2).symmetric


# --------------------------------------------------------------------------- errors
def test_sum_of_different_shapes_names_both_operators():
    A, B = DenseOperator(randn(3, 4, seed=17)), IdentityOperator(5, dtype=F64, device="cpu")
    for expr in (lambda: A + B, lambda: B + A, lambda: sum([A, B])):
        with pytest.raises(ShapeError) as info:
            expr()
        msg = str(info.value)
        assert "DenseOperator [3, 4]" in msg and "IdentityOperator [5, 5]" in msg, msg
        assert isinstance(info.value, CurvlibError) and isinstance(info.value, ValueError)


def test_sum_of_different_dtypes_names_both_operators():
    A = DenseOperator(randn(3, 3, seed=18))
    B = DenseOperator(randn(3, 3, seed=19, dtype=torch.float32))
    with pytest.raises(DTypeDeviceError) as info:
        A + B
    msg = str(info.value)
    assert "torch.float64" in msg and "torch.float32" in msg and msg.count("DenseOperator") == 2, msg
    assert isinstance(info.value, TypeError)


def test_product_errors_name_both_operators():
    A, B = DenseOperator(randn(3, 4, seed=20)), DenseOperator(randn(5, 2, seed=21))
    with pytest.raises(ShapeError) as info:
        A @ B
    assert "DenseOperator [3, 4]" in str(info.value) and "DenseOperator [5, 2]" in str(info.value)
    C = IdentityOperator(4, dtype=torch.float32, device="cpu")
    with pytest.raises(DTypeDeviceError) as info:
        A @ C
    assert "DenseOperator [3, 4]" in str(info.value) and "IdentityOperator [4, 4]" in str(info.value)


def test_difference_of_different_shapes_names_both_operators():
    A, B = DenseOperator(randn(3, 3, seed=22)), IdentityOperator(4, dtype=F64, device="cpu")
    with pytest.raises(ShapeError) as info:
        A - B
    assert "DenseOperator" in str(info.value) and "IdentityOperator" in str(info.value), str(info.value)


def test_construction_errors():
    with pytest.raises(ShapeError):
        SumOperator([DenseOperator(torch.eye(2, dtype=F64)), torch.eye(2, dtype=F64)])
    with pytest.raises(ShapeError):
        DenseOperator(torch.ones(3, dtype=F64))
    with pytest.raises(ShapeError):
        DenseOperator(torch.ones(2, 3, dtype=F64), symmetric=True)
    with pytest.raises(ShapeError) as info:
        DenseOperator(torch.ones(2, 2, dtype=F64)) @ [torch.ones(2, dtype=F64)]
    assert "no list form" in str(info.value)


def test_rmatvec_without_an_adjoint_raises_not_implemented_naming_the_class():
    op = Forward(randn(3, 4, seed=23))
    for call in (lambda: op.rmatvec(torch.ones(3, dtype=F64)), lambda: op.rmatmat(torch.ones(3, 2, dtype=F64)),
                 lambda: op.T @ torch.ones(3, dtype=F64), lambda: (2.0 * op).T @ torch.ones(3, dtype=F64)):
        with pytest.raises(NotImplementedError) as info:
            call()
        assert "Forward" in str(info.value), str(info.value)
    close(op @ torch.ones(4, dtype=F64), op.M.sum(1), op.M, torch.ones(4, dtype=F64))


def test_symmetric_operator_without_rmatmat_gets_its_adjoint_from_the_flag():
    S = sym(4, 24)
    op = SymmetricForward(S)
    y = randn(4, 2, seed=25)
    close(op.rmatmat(y), S @ y, S, y)
    close(op.T @ y, S @ y, S, y)


def test_operand_errors_are_checked_once_in_the_public_products():
    A = DenseOperator(randn(3, 4, seed=26))
    with pytest.raises(ShapeError) as info:
        A @ torch.ones(3, dtype=F64)
    assert "expected [4] or [4, k], got [3]" in str(info.value)
    with pytest.raises(DTypeDeviceError) as info:
        A @ torch.ones(4, dtype=torch.float32)
    assert "torch.float64" in str(info.value) and "torch.float32" in str(info.value)
    with pytest.raises(ShapeError):
        A.rmatvec(torch.ones(4, dtype=F64))
    with pytest.raises(ShapeError):
        A.matmat(torch.ones(4, dtype=F64))


def test_check_result_sees_every_public_product():
    seen = []

    class Checked(DenseOperator):
        def _check_result(self, Y, X, caller):
            seen.append((caller, tuple(Y.shape), tuple(X.shape)))

    op = Checked(randn(3, 2, seed=27))
    op @ torch.ones(2, dtype=F64)
    op.matmat(torch.ones(2, 4, dtype=F64))
    op.rmatvec(torch.ones(3, dtype=F64))
    op.rmatmat(torch.ones(3, 5, dtype=F64))
    assert seen == [("Checked.matvec", (3, 1), (2, 1)), ("Checked.matmat", (3, 4), (2, 4)),
                    ("Checked.rmatvec", (2, 1), (3, 1)), ("Checked.rmatmat", (2, 5), (3, 5))]


# --------------------------------------------------------------------------- identity, layouts, products
def test_identity_operator():
    A = DenseOperator(randn(3, 5, seed=28), layout=None)
    I = IdentityOperator.like(A)
    assert tuple(I.shape) == (5, 5) and I.dtype == F64 and I.device == torch.device("cpu") and I.layout is None
    x = randn(5, 2, seed=29)
    out = I @ x
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()  # a copy: writing to it leaves x alone
    assert torch.equal(I.to_dense(), torch.eye(5, dtype=F64))
    close((A @ I).to_dense(), A.M, A.M)
    lay = TwoParts(4)
    I4 = IdentityOperator(4, dtype=F64, device="cpu", layout=lay)
    assert IdentityOperator.like(DenseOperator(torch.eye(4, dtype=F64), layout=lay)).layout is lay
    xs = [torch.ones(2, dtype=F64), torch.arange(2, dtype=F64)]
    out = I4 @ xs
    assert isinstance(out, list) and all(torch.equal(a, b) for a, b in zip(out, xs))


def test_damped_operator_with_identity():
    S = sym(4, 30)
    F = DenseOperator(S, symmetric=True)
    damped = F + 0.3 * IdentityOperator.like(F)
    assert damped.symmetric
    close(damped.to_dense(), S + 0.3 * torch.eye(4, dtype=F64), S.abs() + 0.3 * torch.eye(4, dtype=F64))


def test_layouts_of_combinations():
    lay = TwoParts(4)
    A = DenseOperator(randn(4, 4, seed=31), layout=lay)
    B = DenseOperator(randn(4, 4, seed=32))
    assert (B + A).layout is lay and (2 * A).layout is lay and (B @ A).layout is lay and A.T.layout is lay
    R = DenseOperator(randn(4, 3, seed=33))
    assert (A @ R).layout is None  # a rectangular product has no list form
    xs = [torch.ones(2, dtype=F64), torch.ones(2, dtype=F64)]
    out = (B + A) @ xs
    close(torch.cat(out), (B.M + A.M) @ torch.ones(4, dtype=F64), B.M.abs() + A.M.abs(), torch.ones(4, dtype=F64))


def test_rectangular_products_and_their_adjoints():
    A, B, C = randn(5, 3, seed=34), randn(3, 4, seed=35), randn(4, 2, seed=36)
    P = DenseOperator(A) @ DenseOperator(B) @ DenseOperator(C)
    assert tuple(P.shape) == (5, 2) and tuple(P.T.shape) == (2, 5)
    X, Y = randn(2, 3, seed=37), randn(5, 3, seed=38)
    close(P @ X, A @ B @ C @ X, A, B, C, X)
    close(P.rmatmat(Y), (A @ B @ C).T @ Y, C.T, B.T, A.T, Y)
    close(P.T @ Y, (A @ B @ C).T @ Y, C.T, B.T, A.T, Y)
    close(P.to_dense(), A @ B @ C, A, B, C)


def test_to_dense_warns_above_the_dense_warning_size():
    class Small(Forward):
        dense_warning_size = 3

    with pytest.warns(PerformanceWarning, match="Small.to_dense"):
        D = Small(torch.eye(4, dtype=F64)).to_dense()
    assert torch.equal(D, torch.eye(4, dtype=F64))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerformanceWarning)
        Small(torch.eye(3, dtype=F64)).to_dense()  # at the size: no warning
        (2 * Forward(torch.eye(5, dtype=F64))).to_dense()  # default 4096


def test_to_scipy_of_an_expression_feeds_scipy_solvers():
    S = sym(6, 39)
    S = S @ S.T + torch.eye(6, dtype=F64)
    F = DenseOperator(S, symmetric=True)
    op = (F + 0.5 * IdentityOperator.like(F)).to_scipy()
    b = np.arange(6, dtype=np.float64)
    x, info = cg(op, b, rtol=1e-12, atol=0.0, maxiter=200)
    assert info == 0
    expected = torch.linalg.solve(S + 0.5 * torch.eye(6, dtype=F64), torch.from_numpy(b))
    assert_close(torch.from_numpy(x), expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))


# --------------------------------------------------------------------------- property: lazy = dense
@st.composite
def expressions(draw, max_depth: int = 3):
    """``(operator, dense value, dense bound)`` of a random lazy expression of square
    DenseOperators ``[n, n]`` (n drawn first; bound: the same expression on |leaves| with
    |scalars|, the rounding scale)."""
    n = draw(dims(1, 5))
    leaves = []
    for k in range(draw(st.integers(1, 3))):
        M = draw(matrices(n, n))
        symmetric = draw(st.booleans())
        if symmetric:
            M = M + M.T
        leaves.append((DenseOperator(M, symmetric=symmetric), M, M.abs()))
    leaves.append((IdentityOperator(n, dtype=F64, device="cpu"), torch.eye(n, dtype=F64), torch.eye(n, dtype=F64)))

    def build(depth: int):
        choices = ["leaf"] if depth == 0 else ["leaf", "sum", "difference", "scaled", "division", "negation",
                                               "product", "adjoint", "builtin_sum"]
        kind = draw(st.sampled_from(choices))
        if kind == "leaf":
            return draw(st.sampled_from(leaves))
        a = build(depth - 1)
        if kind in ("sum", "difference", "product", "builtin_sum"):
            b = build(depth - 1)
            if kind == "sum":
                return a[0] + b[0], a[1] + b[1], a[2] + b[2]
            if kind == "difference":
                return a[0] - b[0], a[1] - b[1], a[2] + b[2]
            if kind == "builtin_sum":
                return sum([a[0], b[0], a[0]]), 2 * a[1] + b[1], 2 * a[2] + b[2]
            return a[0] @ b[0], a[1] @ b[1], a[2] @ b[2]
        if kind == "scaled":
            c = draw(st.floats(-3, 3, allow_nan=False, allow_subnormal=False))
            return c * a[0], c * a[1], abs(c) * a[2]
        if kind == "division":
            c = draw(st.sampled_from([-4.0, 0.5, 3.0]))
            return a[0] / c, a[1] / c, a[2] / abs(c)
        if kind == "negation":
            return -a[0], -a[1], a[2]
        return a[0].T, a[1].T, a[2].T

    return build(draw(st.integers(0, max_depth)))


@given(expr=expressions(), seed=seeds)
def test_random_lazy_expressions_equal_their_dense_evaluation(expr, seed):
    op, D, bound = expr
    n = D.shape[0]
    X = randn(n, 3, seed=seed)
    close(op @ X, D @ X, bound, X.abs(), msg=f"{op!r} @ X")
    close(op @ X[:, 0], D @ X[:, 0], bound, X.abs(), msg=f"{op!r} @ x")
    close(op.rmatmat(X), D.T @ X, bound.T, X.abs(), msg=f"{op!r}.rmatmat(X)")
    close(op.T @ X, D.T @ X, bound.T, X.abs(), msg=f"({op!r}).T @ X")
    close(op.to_dense(), D, bound, msg=f"{op!r}.to_dense()")
    if op.symmetric:
        close(D, D.T, bound, msg=f"{op!r} is declared symmetric")


@given(m=dims(1, 5), r=dims(1, 5), n=dims(1, 5), seed=seeds, c=st.floats(-2, 2, allow_nan=False, allow_subnormal=False))
def test_random_rectangular_products_equal_their_dense_evaluation(m, r, n, seed, c):
    A, B, E = randn(m, r, seed=seed), randn(r, n, seed=seed + 1), randn(m, n, seed=seed + 2)
    op = DenseOperator(A) @ (c * DenseOperator(B)) - DenseOperator(E)
    D = c * A @ B - E
    bound = abs(c) * A.abs() @ B.abs() + E.abs()
    X, Y = randn(n, 2, seed=seed + 3), randn(m, 2, seed=seed + 4)
    assert tuple(op.shape) == (m, n) and tuple(op.T.shape) == (n, m)
    close(op @ X, D @ X, bound, X.abs())
    close(op.T @ Y, D.T @ Y, bound.T, Y.abs())
    close(op.to_scipy().matmat(X.numpy()), D @ X, bound, X.abs())
