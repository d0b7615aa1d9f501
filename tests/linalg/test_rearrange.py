"""The zigzag rearrangement Z (Def. 3.3), Thm 3.14 / (3.37), nearest Kronecker sums,
the sign convention of factors_from_singular, and Prop. 3.2.

Z is checked against an explicit index-loop construction; errors of approximations are
computed densely with torch.kron; singular values with torch.linalg on the loop-built Z.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.errors import NumericalError, ShapeError
from curvlib.linalg.kronecker_sum import KroneckerSum
from curvlib.linalg.rearrange import factors_from_singular, nearest_kronecker, rearrange, unrearrange
from curvlib.testing.compare import assert_close, default_tolerances
from curvlib.testing.strategies import dims, linear_statistics, matrices, seeds

F64 = torch.float64


def tkron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch.kron with inputs re-laid out with standard strides (torch 2.13's kron
    raises on a [n, 1] tensor with strides (1, n))."""
    return torch.kron(A.reshape(-1).reshape(A.shape), B.reshape(-1).reshape(B.shape))


def col_stack(X: torch.Tensor) -> torch.Tensor:
    return torch.cat([X[:, j] for j in range(X.shape[1])])


def zigzag_loop(M: torch.Tensor, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> torch.Tensor:
    """Z(M) by explicit index loops over (3.23): row μ + m1·ν holds vec(M_{μ,ν})ᵀ."""
    m1, n1 = a_shape
    m2, n2 = b_shape
    Z = torch.empty(m1 * n1, m2 * n2, dtype=M.dtype)
    for nu in range(n1):
        for mu in range(m1):
            for j in range(n2):
                for i in range(m2):
                    Z[mu + m1 * nu, i + m2 * j] = M[mu * m2 + i, nu * n2 + j]
    return Z


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


@st.composite
def block_shapes(draw, max_dim: int = 4):
    return (draw(dims(1, max_dim)), draw(dims(1, max_dim))), (draw(dims(1, max_dim)), draw(dims(1, max_dim)))


# ---- Def. 3.3 ----------------------------------------------------------------------------------
@given(block_shapes(), seeds)
def test_rearrange_equals_index_loop(shapes, seed):
    (m1, n1), (m2, n2) = shapes
    M = randn(m1 * m2, n1 * n2, seed=seed)
    assert_close(rearrange(M, (m1, n1), (m2, n2)), zigzag_loop(M, (m1, n1), (m2, n2)))


@given(block_shapes(), seeds)
def test_unrearrange_inverts_rearrange(shapes, seed):
    a_shape, b_shape = shapes
    M = randn(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1], seed=seed)
    Z = randn(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1], seed=seed + 1)
    assert torch.equal(unrearrange(rearrange(M, a_shape, b_shape), a_shape, b_shape), M)
    assert torch.equal(rearrange(unrearrange(Z, a_shape, b_shape), a_shape, b_shape), Z)


def test_rearrange_square_int_shapes_and_batches():
    M = randn(2, 3, 12, 12, seed=0)
    Z = rearrange(M, 3, 4)
    assert Z.shape == (2, 3, 9, 16)
    assert_close(Z[1, 2], zigzag_loop(M[1, 2], (3, 3), (4, 4)))
    assert_close(unrearrange(Z, 3, 4), M)


def test_rearrange_shape_errors():
    with pytest.raises(ShapeError, match=r"\[\.\.\., 6, 6\]"):
        rearrange(torch.zeros(6, 5, dtype=F64), 2, 3)
    with pytest.raises(ShapeError, match=r"\[\.\.\., 4, 9\]"):
        unrearrange(torch.zeros(9, 4, dtype=F64), 2, 3)


# ---- Thm 3.14 and (3.37) ---------------------------------------------------------------------------
@given(block_shapes(), seeds)
def test_thm_3_14_kronecker_product_becomes_outer_product(shapes, seed):
    a_shape, b_shape = shapes
    R = randn(*a_shape, seed=seed)
    S = randn(*b_shape, seed=seed + 1)
    assert_close(rearrange(tkron(R, S), a_shape, b_shape), torch.outer(col_stack(R), col_stack(S)))


@given(block_shapes(), seeds)
def test_eq_3_37_frobenius_distance_is_preserved(shapes, seed):
    a_shape, b_shape = shapes
    M = randn(a_shape[0] * b_shape[0], a_shape[1] * b_shape[1], seed=seed)
    R = randn(*a_shape, seed=seed + 1)
    S = randn(*b_shape, seed=seed + 2)
    lhs = torch.linalg.matrix_norm(M - tkron(R, S))
    rhs = torch.linalg.matrix_norm(rearrange(M, a_shape, b_shape) - torch.outer(col_stack(R), col_stack(S)))
    assert_close(rhs, lhs)


# ---- nearest_kronecker -----------------------------------------------------------------------------
def dense_error_sq(M: torch.Tensor, terms: KroneckerSum) -> torch.Tensor:
    return (torch.linalg.matrix_norm(M - sum(tkron(A, B) for A, B in terms)) ** 2)


@given(dims(1, 4), dims(1, 4), st.data())
def test_nearest_kronecker_attains_the_tail_of_the_spectrum(d_a, d_b, data):
    M = data.draw(matrices(d_a * d_b, d_a * d_b))
    rank = data.draw(st.integers(1, min(d_a, d_b) ** 2))
    nk = nearest_kronecker(M, d_a, d_b, rank=rank)
    sv = torch.linalg.svdvals(zigzag_loop(M, (d_a, d_a), (d_b, d_b)))
    tail = (sv[rank:] ** 2).sum()
    scale = (M**2).sum().item()
    _, atol = default_tolerances(F64, scale=scale)
    assert nk.terms.rank == rank
    assert_close(nk.singular_values, sv[:rank])
    assert_close(nk.residual_sq, tail, atol=atol)
    assert_close(dense_error_sq(M, nk.terms), tail, atol=atol)


@given(dims(1, 3), dims(1, 3), st.data())
def test_nearest_kronecker_is_not_beaten_by_perturbations(d_a, d_b, data):
    M = data.draw(matrices(d_a * d_b, d_a * d_b))
    rank = data.draw(st.integers(1, min(2, min(d_a, d_b) ** 2)))
    nk = nearest_kronecker(M, d_a, d_b, rank=rank)
    best = dense_error_sq(M, nk.terms)
    _, atol = default_tolerances(F64, scale=(M**2).sum().item())
    g = torch.Generator().manual_seed(data.draw(seeds))
    for eps in (1e-4, 1e-2, 1.0):
        for _ in range(5):
            perturbed = KroneckerSum(
                (A + eps * torch.randn(A.shape, generator=g, dtype=F64), B + eps * torch.randn(B.shape, generator=g, dtype=F64))
                for A, B in nk.terms
            )
            assert dense_error_sq(M, perturbed) >= best - atol


@given(dims(1, 4), dims(1, 4), st.data())
def test_nearest_kronecker_recovers_an_exact_kronecker_sum(d_a, d_b, data):
    rank = data.draw(st.integers(1, min(3, min(d_a, d_b) ** 2)))
    seed = data.draw(seeds)
    terms = [(randn(d_a, d_a, seed=seed + 2 * k), randn(d_b, d_b, seed=seed + 2 * k + 1)) for k in range(rank)]
    M = sum(tkron(A, B) for A, B in terms)
    nk = nearest_kronecker(M, (d_a, d_a), (d_b, d_b), rank=rank)
    assert_close(nk.terms.to_dense(), M)
    _, atol = default_tolerances(F64, scale=(M**2).sum().item())
    assert_close(nk.residual_sq, torch.zeros((), dtype=F64), atol=atol)


def test_nearest_kronecker_validation():
    M = randn(6, 6, seed=0)
    with pytest.raises(ShapeError, match=r"1 ≤ rank ≤ min\(d_a², d_b²\) = 4.*got 5"):
        nearest_kronecker(M, 3, 2, rank=5)
    with pytest.raises(ShapeError, match="got 0"):
        nearest_kronecker(M, 3, 2, rank=0)
    with pytest.raises(ShapeError, match="square"):
        nearest_kronecker(M, (3, 2), (2, 3))
    with pytest.raises(ShapeError):
        nearest_kronecker(M, 2, 2)


# ---- factors_from_singular and its sign convention --------------------------------------------------
@given(block_shapes(), seeds, st.floats(0.0, 10.0))
def test_factors_from_singular_rebuild_the_rank_one_term(shapes, seed, sigma):
    a_shape, b_shape = shapes
    u = randn(a_shape[0] * a_shape[1], seed=seed)
    v = randn(b_shape[0] * b_shape[1], seed=seed + 1)
    A, B = factors_from_singular(sigma, u, v, a_shape, b_shape, symmetrize=False)
    assert A.shape == a_shape and B.shape == b_shape
    assert_close(tkron(A, B), unrearrange(sigma * torch.outer(u, v), a_shape, b_shape))


@given(dims(1, 4), dims(1, 4), seeds)
def test_sign_convention_is_invariant_to_a_joint_flip(d_a, d_b, seed):
    u = randn(d_a * d_a, seed=seed)
    v = randn(d_b * d_b, seed=seed + 1)
    A, B = factors_from_singular(2.0, u, v, d_a, d_b)
    A2, B2 = factors_from_singular(2.0, -u, -v, d_a, d_b)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    assert_close(A, A.T)
    assert_close(B, B.T)
    if abs(torch.trace(A).item()) > 1e-6 * torch.linalg.matrix_norm(A).item():
        assert torch.trace(A).item() > 0


def test_sign_convention_falls_back_to_the_largest_entry_for_traceless_factors():
    U = torch.tensor([[1.0, -3.0], [-3.0, -1.0]], dtype=F64)  # trace 0, largest |entry| negative
    u = col_stack(U)
    v = col_stack(torch.eye(2, dtype=F64))
    for s in (1.0, -1.0):
        A, B = factors_from_singular(4.0, s * u, s * v, 2, 2)
        assert_close(A, -2.0 * U)
        assert_close(B, -2.0 * torch.eye(2, dtype=F64))


def test_sign_convention_for_rectangular_factors_uses_the_largest_entry():
    u = torch.tensor([0.5, -2.0, 1.0, 0.1, 0.2, 0.3], dtype=F64)  # MAT is [2, 3]
    v = torch.tensor([1.0, 2.0], dtype=F64)
    A, B = factors_from_singular(1.0, u, v, (2, 3), (2, 1), symmetrize=False)
    assert A.abs().max().item() == A.max().item() == 2.0
    assert_close(tkron(A, B), unrearrange(torch.outer(u, v), (2, 3), (2, 1)))


def test_factors_from_singular_validation():
    u, v = torch.ones(6, dtype=F64), torch.ones(4, dtype=F64)
    with pytest.raises(ShapeError, match="square"):
        factors_from_singular(1.0, u, v, (2, 3), (2, 2))
    with pytest.raises(ShapeError, match=r"u \[9\]"):
        factors_from_singular(1.0, u, v, 3, 2)
    with pytest.raises(NumericalError, match="σ ≥ 0"):
        factors_from_singular(-1.0, torch.ones(4, dtype=F64), v, 2, 2)


# ---- Prop. 3.2 ------------------------------------------------------------------------------------
@given(linear_statistics(max_m=8, max_dim=4), st.floats(0.1, 10.0))
def test_prop_3_2_leading_factors_of_a_psd_block_are_symmetric_psd(stats, scale):
    a, g = stats
    F = scale * sum(tkron(torch.outer(a[b], a[b]), torch.outer(g[b], g[b])) for b in range(a.shape[0]))
    nk = nearest_kronecker(F, a.shape[1], g.shape[1], rank=1)  # no symmetrization asked
    (A, B), = nk.terms.terms
    assert_close(A, A.T)
    assert_close(B, B.T)
    for X in (A, B):
        eig = torch.linalg.eigvalsh(0.5 * (X + X.T))
        rtol, _ = default_tolerances(F64)
        assert eig.min().item() >= -rtol * eig.abs().max().item(), f"not PSD: eigenvalues {eig.tolist()}"
