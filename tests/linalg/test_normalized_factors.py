"""``normalized_factors`` (the sign convention of ``factors_from_singular`` applied to a factor
pair formed directly) and the lazily stacked factors of ``KroneckerSum``, against float64
references written from the definitions."""

from __future__ import annotations

import copy
import pickle

import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.linalg.kron import kron
from curvlib.linalg.kronecker_sum import KroneckerSum
from curvlib.linalg.rearrange import factors_from_singular, normalized_factors
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import dims, seeds

F64 = torch.float64


def reference(A: torch.Tensor, B: torch.Tensor, symmetrize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented convention, step by step: symmetrize, then tr A > 0 when |tr A| >
    √eps‖A‖_F, else the largest-magnitude entry of A positive (first in row-major order)."""
    if symmetrize:
        A, B = 0.5 * (A + A.T), 0.5 * (B + B.T)
    flat = A.reshape(-1).tolist()
    largest = max(range(len(flat)), key=lambda i: (abs(flat[i]), -i))
    sign = 1.0 if flat[largest] >= 0 else -1.0
    if A.shape[0] == A.shape[1]:
        trace = float(A.trace())
        if abs(trace) > torch.finfo(A.dtype).eps ** 0.5 * float(torch.linalg.matrix_norm(A)):
            sign = 1.0 if trace > 0 else -1.0
    return sign * A, sign * B


@given(d_a=dims(1, 5), d_b=dims(1, 5), seed=seeds, symmetrize=st.booleans(), traceless=st.booleans())
def test_normalized_factors_follow_the_documented_convention(d_a, d_b, seed, symmetrize, traceless):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_a, d_a, generator=g, dtype=F64)
    B = torch.randn(d_b, d_b, generator=g, dtype=F64)
    if traceless:  # the fallback rule
        A = A - A.trace() / d_a * torch.eye(d_a, dtype=F64)
    got = normalized_factors(A, B, symmetrize=symmetrize)
    want = reference(A, B, symmetrize)
    assert_close(got[0], want[0])
    assert_close(got[1], want[1])
    assert_close(kron(*got), kron(*reference(A, B, symmetrize)))
    if symmetrize:
        assert torch.equal(got[0], got[0].T) and torch.equal(got[1], got[1].T)  # bitwise
    # the inputs are untouched (new tensors come back)
    assert got[0].data_ptr() != A.data_ptr()


@given(d_a=dims(1, 5), d_b=dims(1, 5), seed=seeds, sigma=st.floats(0.0, 10.0))
def test_factors_from_singular_is_normalized_factors_of_the_scaled_matrices(d_a, d_b, seed, sigma):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d_a * d_a, generator=g, dtype=F64)
    v = torch.randn(d_b * d_b, generator=g, dtype=F64)
    A, B = factors_from_singular(sigma, u, v, d_a, d_b)
    root = sigma**0.5
    R, S = normalized_factors(root * u.reshape(d_a, d_a).T, root * v.reshape(d_b, d_b).T)
    assert_close(A, R)
    assert_close(B, S)


@given(rank=st.integers(1, 3), seed=seeds)
def test_kronecker_sum_with_lazily_stacked_factors(rank, seed):
    """Products, trace and norm from the stacked factors, formed on first use (a view for one
    term), also after a copy or a pickle round trip."""
    g = torch.Generator().manual_seed(seed)
    terms = [(torch.randn(3, 3, generator=g, dtype=F64), torch.randn(2, 2, generator=g, dtype=F64)) for _ in range(rank)]
    dense = sum(kron(A, B) for A, B in terms)
    x = torch.randn(6, 2, generator=g, dtype=F64)
    for K in (KroneckerSum(terms), copy.deepcopy(KroneckerSum(terms)), pickle.loads(pickle.dumps(KroneckerSum(terms)))):
        assert (K.a_dim, K.b_dim, K.dtype) == (3, 2, F64)
        assert_close(K @ x, dense @ x)
        assert_close(K.to_dense(), dense)
        assert_close(torch.as_tensor(K.trace()), dense.trace())
        assert_close(torch.as_tensor(K.frobenius_norm()), torch.linalg.matrix_norm(dense))
