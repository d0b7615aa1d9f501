"""Kronecker identities of §3.1.1 (Thm 3.1–3.13) and the kernels of curvlib.linalg.kron.

References are dense float64 and independent of the code under test: torch.kron,
torch.linalg, and vec written as explicit column stacking.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.errors import DTypeDeviceError, ShapeError
from curvlib.linalg.kron import kron, kron_matvec, unvec, vec
from curvlib.linalg.kronecker_sum import KroneckerSum
from curvlib.testing.compare import assert_close, default_tolerances
from curvlib.testing.strategies import dims, matrices, seeds, spd_matrices

F64 = torch.float64


def col_stack(X: torch.Tensor) -> torch.Tensor:
    """vec by explicit column stacking (Def. 3.2, (3.14))."""
    return torch.cat([X[:, j] for j in range(X.shape[1])])


def tkron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch.kron as the dense reference.

    torch 2.13's kron raises a view error on a [n, 1] tensor with strides (1, n) (the
    transpose of a row vector), so inputs are re-laid out with standard strides first.
    """
    return torch.kron(A.reshape(-1).reshape(A.shape), B.reshape(-1).reshape(B.shape))


def randn(*shape: int, seed: int, dtype=F64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@st.composite
def kronecker_sums(draw, max_terms: int = 3, max_dim: int = 4):
    """A list of K pairs (A_k [d_a, d_a], B_k [d_b, d_b]) of general square matrices."""
    K = draw(dims(1, max_terms))
    d_a = draw(dims(1, max_dim))
    d_b = draw(dims(1, max_dim))
    g = torch.Generator().manual_seed(draw(seeds))
    return [(torch.randn(d_a, d_a, generator=g, dtype=F64), torch.randn(d_b, d_b, generator=g, dtype=F64)) for _ in range(K)]


def dense_sum(terms) -> torch.Tensor:
    return sum(tkron(A, B) for A, B in terms)


# ---- vec and kron -------------------------------------------------------------------
@given(matrices())
def test_vec_stacks_columns_and_unvec_inverts(X):
    assert_close(vec(X), col_stack(X))
    assert_close(unvec(vec(X), *X.shape), X)


def test_vec_is_batched():
    X = randn(2, 3, 4, 5, seed=0)
    out = vec(X)
    assert out.shape == (2, 3, 20)
    assert_close(out[1, 2], col_stack(X[1, 2]))
    assert_close(unvec(out, 4, 5), X)


def test_vec_unvec_shape_errors():
    with pytest.raises(ShapeError, match="rows=2, cols=3"):
        unvec(torch.zeros(5, dtype=F64), 2, 3)
    with pytest.raises(ShapeError):
        vec(torch.zeros(4, dtype=F64))


@given(matrices(), matrices())
def test_kron_equals_torch_kron(A, B):
    assert_close(kron(A, B), tkron(A, B))


def test_kron_broadcasts_batch_dims():
    A = randn(3, 2, 4, seed=1)
    B = randn(1, 3, 2, seed=2)
    out = kron(A, B)
    assert out.shape == (3, 6, 8)
    for i in range(3):
        assert_close(out[i], tkron(A[i], B[0]))


def test_kron_dtype_mismatch_raises():
    with pytest.raises(DTypeDeviceError, match="float32"):
        kron(torch.eye(2, dtype=F64), torch.eye(2, dtype=torch.float32))


# ---- Thm 3.1: bilinearity and associativity ------------------------------------------------
@given(st.data(), dims(1, 4), dims(1, 4), dims(1, 3), dims(1, 3), st.floats(-3, 3))
def test_thm_3_1_bilinearity_and_associativity(data, r, c, r2, c2, gamma):
    A = data.draw(matrices(r, c))
    B = data.draw(matrices(r, c))
    C = data.draw(matrices(r2, c2))
    assert_close(kron(A + B, C), tkron(A, C) + tkron(B, C))
    assert_close(kron(C, A + B), tkron(C, A) + tkron(C, B))
    assert_close(kron(gamma * A, C), gamma * tkron(A, C))
    assert_close(kron(A, gamma * C), gamma * tkron(A, C))
    D = data.draw(matrices(max_dim=3))
    assert_close(kron(kron(A, C), D), kron(A, kron(C, D)))


# ---- Thm 3.2 and Thm 3.3 ------------------------------------------------------------------------
@given(dims(), dims(), seeds)
def test_thm_3_2_vector_kronecker_is_outer_product(mx, my, seed):
    x = randn(mx, 1, seed=seed)
    y = randn(my, 1, seed=seed + 1)
    assert_close(kron(x, y.T), x @ y.T)
    assert_close(kron(y.T, x), x @ y.T)


@given(dims(), dims(), seeds)
def test_thm_3_3_kronecker_of_diagonals_is_diagonal(a, b, seed):
    K = kron(torch.diag(randn(a, seed=seed)), torch.diag(randn(b, seed=seed + 1)))
    assert_close(K - torch.diag(torch.diagonal(K)), torch.zeros_like(K))


# ---- Thm 3.4 and Cor. 3.1: mixed product and powers ----------------------------------------------
@given(st.data(), dims(1, 4), dims(1, 4), dims(1, 4), dims(1, 4), dims(1, 3), dims(1, 3))
def test_thm_3_4_mixed_product(data, mA, nA, mB, nB, nC, nD):
    A = data.draw(matrices(mA, nA))
    B = data.draw(matrices(mB, nB))
    C = data.draw(matrices(nA, nC))
    D = data.draw(matrices(nB, nD))
    assert_close(kron(A, B) @ kron(C, D), tkron(A @ C, B @ D))


@given(st.data(), dims(1, 4), dims(1, 4), st.integers(1, 4))
def test_cor_3_1_powers(data, a, b, n):
    A = data.draw(matrices(a, a))
    B = data.draw(matrices(b, b))
    power = torch.linalg.matrix_power
    assert_close(power(kron(A, B), n), tkron(power(A, n), power(B, n)))


# ---- Thm 3.5, 3.6: transpose and inverse -----------------------------------------------------
@given(matrices(), matrices())
def test_thm_3_5_transpose(A, B):
    assert_close(kron(A, B).T, tkron(A.T, B.T))


@given(spd_matrices(max_dim=4), spd_matrices(max_dim=4), st.data())
def test_thm_3_6_inverse(A, B, data):
    # non-symmetric invertible factors: SPD times a random sign pattern on the columns
    sA = torch.where(randn(A.shape[0], seed=data.draw(seeds)) > 0, 1.0, -1.0).to(F64)
    A = A * sA
    assert_close(kron(torch.linalg.inv(A), torch.linalg.inv(B)), torch.linalg.inv(tkron(A, B)))


# ---- Thm 3.7, Cor. 3.4: singular values and rank --------------------------------------------------
@given(matrices(max_dim=4), matrices(max_dim=4))
def test_thm_3_7_singular_values_are_products(A, B):
    prods = torch.outer(torch.linalg.svdvals(A), torch.linalg.svdvals(B)).reshape(-1)
    expected = torch.linalg.svdvals(tkron(A, B))
    padded = torch.cat([prods, torch.zeros(expected.numel() - prods.numel(), dtype=F64)])
    assert_close(torch.sort(padded, descending=True).values, expected)


@given(dims(1, 5), dims(1, 5), st.data())
def test_cor_3_4_rank_is_product(a, b, data):
    ra = data.draw(st.integers(1, a))
    rb = data.draw(st.integers(1, b))
    s = data.draw(seeds)
    A = randn(a, ra, seed=s) @ randn(ra, a, seed=s + 1)
    B = randn(b, rb, seed=s + 2) @ randn(rb, b, seed=s + 3)
    rank = torch.linalg.matrix_rank
    assert int(rank(A)) == ra and int(rank(B)) == rb
    assert int(rank(kron(A, B))) == ra * rb
    assert int(rank(kron(B, A))) == ra * rb


# ---- Thm 3.8: eigenpairs ----------------------------------------------------------------------------
@given(st.data(), dims(1, 4), dims(1, 4))
def test_thm_3_8_eigenpairs(data, a, b):
    A = data.draw(matrices(a, a))
    B = data.draw(matrices(b, b))
    mu, X = torch.linalg.eig(A)
    lam, Y = torch.linalg.eig(B)
    K = kron(A, B).to(torch.complex128)
    # the residual of an eigenpair is relative to the operator's norm, not to μλ
    rtol, atol = default_tolerances(F64, scale=(torch.linalg.matrix_norm(A, 2) * torch.linalg.matrix_norm(B, 2)).item())
    for i in range(a):
        for j in range(b):
            xy = tkron(X[:, i], Y[:, j])
            assert_close(torch.view_as_real(K @ xy), torch.view_as_real(mu[i] * lam[j] * xy), rtol=rtol, atol=atol)


@given(st.data(), dims(1, 4), dims(1, 4))
def test_thm_3_8_symmetric_spectrum_is_products(data, a, b):
    A = data.draw(matrices(a, a))
    B = data.draw(matrices(b, b))
    A, B = A + A.T, B + B.T
    prods = torch.outer(torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(B)).reshape(-1)
    assert_close(torch.sort(prods).values, torch.linalg.eigvalsh(kron(A, B)))


# ---- Thm 3.9, 3.10: determinant and trace --------------------------------------------------------
def _signed_spd(M: torch.Tensor, seed: int) -> torch.Tensor:
    """An invertible, well-conditioned matrix whose determinant may be negative."""
    signs = torch.where(randn(M.shape[0], seed=seed) > 0, 1.0, -1.0).to(M.dtype)
    return M * signs


@given(spd_matrices(max_dim=4), spd_matrices(max_dim=4), seeds)
def test_thm_3_9_determinant(A, B, seed):
    A, B = _signed_spd(A, seed), _signed_spd(B, seed + 1)
    mA, mB = A.shape[0], B.shape[0]
    expected = torch.linalg.det(A) ** mB * torch.linalg.det(B) ** mA
    assert_close(torch.linalg.det(kron(A, B)), expected)


def test_thm_3_9_exponents_are_the_other_factors_size():
    A = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=F64)  # det 2, size 2
    B = torch.diag(torch.tensor([3.0, 1.0, 1.0], dtype=F64))  # det 3, size 3
    det = torch.linalg.det(kron(A, B))
    assert_close(det, torch.tensor(2.0**3 * 3.0**2, dtype=F64))
    assert abs(det.item() - 2.0**2 * 3.0**3) > 1.0  # swapped exponents would be wrong


@given(st.data(), dims(), dims())
def test_thm_3_10_trace(data, a, b):
    A = data.draw(matrices(a, a))
    B = data.draw(matrices(b, b))
    assert_close(torch.trace(kron(A, B)), torch.trace(A) * torch.trace(B))


# ---- Thm 3.11–3.13: vec identities ------------------------------------------------------------------
@given(st.data(), dims(), dims(), st.floats(-3, 3), st.floats(-3, 3))
def test_thm_3_11_vec_is_linear(data, r, c, l1, l2):
    A1 = data.draw(matrices(r, c))
    A2 = data.draw(matrices(r, c))
    assert_close(vec(l1 * A1 + l2 * A2), l1 * col_stack(A1) + l2 * col_stack(A2))


@given(dims(), dims(), seeds)
def test_thm_3_12_vec_of_outer_product(mx, my, seed):
    x = randn(mx, seed=seed)
    y = randn(my, seed=seed + 1)
    assert_close(vec(torch.outer(x, y)), tkron(y, x))


@given(st.data(), dims(1, 4), dims(1, 4), dims(1, 4), dims(1, 4))
def test_thm_3_13_kron_times_vec(data, mA, nA, nB, nC):
    A = data.draw(matrices(mA, nA))
    B = data.draw(matrices(nA, nB))
    C = data.draw(matrices(nB, nC))
    assert_close(tkron(C.T, A) @ col_stack(B), col_stack(A @ B @ C))


@given(matrices(max_dim=4), matrices(max_dim=4), dims(1, 3), seeds)
def test_kron_matvec_equals_dense(A, B, k, seed):
    n = A.shape[1] * B.shape[1]
    x = randn(n, seed=seed)
    X = randn(n, k, seed=seed + 1)
    K = tkron(A, B)
    assert_close(kron_matvec(A, B, x), K @ x)
    assert_close(kron_matvec(A, B, X), K @ X)


def test_kron_matvec_errors():
    A, B = torch.eye(2, dtype=F64), torch.eye(3, dtype=F64)
    with pytest.raises(ShapeError, match=r"\[6\]"):
        kron_matvec(A, B, torch.zeros(5, dtype=F64))
    with pytest.raises(DTypeDeviceError):
        kron_matvec(A, B, torch.zeros(6, dtype=torch.float32))


# ---- KroneckerSum ----------------------------------------------------------------------------------
@given(kronecker_sums(), dims(1, 3), seeds)
def test_kronecker_sum_products_equal_dense(terms, k, seed):
    S = KroneckerSum(terms)
    dense = dense_sum(terms)
    d_a, d_b = terms[0][0].shape[0], terms[0][1].shape[0]
    assert S.rank == len(terms) and S.a_dim == d_a and S.b_dim == d_b
    assert S.shape == (d_a * d_b, d_a * d_b)
    assert_close(S.to_dense(), dense)
    x = randn(d_a * d_b, seed=seed)
    X = randn(d_a * d_b, k, seed=seed + 1)
    assert_close(S.matvec(x), dense @ x)
    assert_close(S @ X, dense @ X)
    Xm = randn(2, d_b, d_a, seed=seed + 2)
    for i in range(2):
        assert_close(col_stack(S.apply(Xm)[i]), dense @ col_stack(Xm[i]))


@given(kronecker_sums())
def test_kronecker_sum_trace_and_frobenius_norm(terms):
    S = KroneckerSum(terms)
    dense = dense_sum(terms)
    assert_close(S.trace(), torch.trace(dense))
    assert_close(S.frobenius_norm(), torch.linalg.matrix_norm(dense))


def test_kronecker_sum_frobenius_norm_of_cancelling_terms_is_zero():
    A, B = randn(3, 3, seed=0), randn(2, 2, seed=1)
    S = KroneckerSum([(A, B), (-A, B)])
    assert S.frobenius_norm().item() == pytest.approx(0.0, abs=1e-12)


@given(kronecker_sums(), st.data(), st.floats(-2, 2))
def test_kronecker_sum_algebra(terms, data, c):
    S = KroneckerSum(terms)
    d_a, d_b = S.a_dim, S.b_dim
    other_terms = [(data.draw(matrices(d_a, d_a)), data.draw(matrices(d_b, d_b))) for _ in range(2)]
    T = KroneckerSum(other_terms)
    assert_close(S.transpose().to_dense(), dense_sum(terms).T)
    assert_close((S @ T).to_dense(), dense_sum(terms) @ dense_sum(other_terms))  # Thm 3.4
    assert (S @ T).rank == S.rank * T.rank
    assert_close((S + T).to_dense(), dense_sum(terms) + dense_sum(other_terms))
    assert_close((c * S).to_dense(), c * dense_sum(terms))
    assert_close((S * c).to_dense(), c * dense_sum(terms))


def test_kronecker_sum_to_changes_dtype_and_keeps_values():
    terms = [(randn(3, 3, seed=0), randn(2, 2, seed=1))]
    S32 = KroneckerSum(terms).to(dtype=torch.float32)
    assert S32.dtype == torch.float32 and S32.device == torch.device("cpu")
    assert S32.matvec(torch.ones(6)).dtype == torch.float32
    assert_close(S32.to_dense(), dense_sum(terms).float())


def test_kronecker_sum_validation():
    A, B = torch.eye(3, dtype=F64), torch.eye(2, dtype=F64)
    with pytest.raises(ShapeError, match="at least one term"):
        KroneckerSum([])
    with pytest.raises(ShapeError, match=r"term 1 .*\[4, 4\]"):
        KroneckerSum([(A, B), (torch.eye(4, dtype=F64), B)])
    with pytest.raises(ShapeError, match=r"\[3, 2\]"):
        KroneckerSum([(torch.zeros(3, 2, dtype=F64), B)])
    with pytest.raises(DTypeDeviceError, match="float32"):
        KroneckerSum([(A, B), (A, B.float())])
    S = KroneckerSum([(A, B)])
    with pytest.raises(DTypeDeviceError, match="float32"):
        S.matvec(torch.zeros(6, dtype=torch.float32))
    with pytest.raises(ShapeError, match=r"\[6\]"):
        S.matvec(torch.zeros(5, dtype=F64))
    with pytest.raises(ShapeError):
        S.apply(torch.zeros(3, 2, dtype=F64))  # X must be [d_b, d_a] = [2, 3]
    with pytest.raises(AttributeError, match="immutable"):
        S.rank = 3  # type: ignore[misc]


def test_kronecker_sum_pickles_and_deep_copies():
    terms = [(randn(3, 3, seed=0), randn(2, 2, seed=1)), (randn(3, 3, seed=2), randn(2, 2, seed=3))]
    S = KroneckerSum(terms)
    for T in (copy.deepcopy(S), pickle.loads(pickle.dumps(S))):
        assert isinstance(T, KroneckerSum) and T.rank == 2
        assert_close(T.to_dense(), S.to_dense())


@pytest.mark.cuda
def test_kronecker_sum_follows_device():
    terms = [(randn(3, 3, seed=0).cuda(), randn(2, 2, seed=1).cuda())]
    S = KroneckerSum(terms)
    x = torch.randn(6, dtype=F64, device="cuda")
    assert S.device.type == "cuda" and S.matvec(x).device.type == "cuda"
    assert_close(S.matvec(x), dense_sum(terms) @ x)
    assert S.to(device="cpu").device == torch.device("cpu")


# --------------------------------------------------------------------------- B X A in BLAS layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, n", [(3, 5), (5, 3), (100, 101), (101, 100), (64, 785), (785, 64), (90, 91)])
def test_two_sided_equals_dense_product_in_both_layouts(m, n, dtype):
    """B X A for general (non-symmetric) B, A: the row-major aligned (B X) A (n ≥ m, m·n ≥
    ROW_MAJOR_MIN) and the transposed ((Aᵀ Xᵀ) Bᵀ)ᵀ both equal the float64 product."""
    from curvlib.linalg.kron import ROW_MAJOR_MIN, two_sided

    B, X, A = (randn(*s, seed=i) for i, s in enumerate([(m, m), (m, n), (n, n)]))
    Y = two_sided(B.to(dtype), X.to(dtype), A.to(dtype))
    assert Y.shape == (m, n) and Y.dtype == dtype
    rtol, atol = default_tolerances(dtype, scale=float((B.abs() @ X.abs() @ A.abs()).max()))
    assert_close(Y, B @ X @ A, rtol=rtol, atol=atol)
    row_major = n >= m and m * n >= ROW_MAJOR_MIN
    assert (Y.stride(-1) == 1) == row_major  # the transposed layout otherwise
    if row_major:  # rows start on cache lines
        assert (Y.stride(0) * Y.element_size()) % 64 == 0 and Y.data_ptr() % 64 == 0


def test_two_sided_under_autograd_differentiates():
    from curvlib.linalg.kron import two_sided

    B, X, A = (randn(*s, seed=i).requires_grad_() for i, s in enumerate([(100, 100), (100, 101), (101, 101)]))
    two_sided(B, X, A).sum().backward()
    ones = torch.ones(100, 101, dtype=F64)
    assert_close(X.grad, B.detach().T @ ones @ A.detach().T)


@pytest.mark.parametrize("dtype, cols, padded", [(torch.float32, 785, 800), (torch.float32, 784, 784),
                                                 (torch.float64, 101, 104), (torch.float16, 31, 32)])
def test_aligned_empty_and_row_aligned(dtype, cols, padded):
    from curvlib.linalg.kron import aligned_empty, row_aligned

    E = aligned_empty(7, cols, like=torch.empty(0, dtype=dtype))
    assert E.shape == (7, cols) and E.dtype == dtype and E.stride() == (padded, 1)
    M = randn(7, cols, seed=0).to(dtype)
    R = row_aligned(M)
    assert torch.equal(R, M) and R.stride() == (padded, 1) and R.data_ptr() % 64 == 0
    assert row_aligned(R) is R  # aligned already: no copy
    if padded == cols:
        assert row_aligned(M) is M
