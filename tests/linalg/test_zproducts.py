"""Matrix-free Z-products (Prop. 3.1, (3.31)–(3.36), §3.2.3.1) against dense references.

The dense block F is built in float64 with Python loops over samples, columns and (for
convolutions) pairs of 2-D positions, with torch.kron; Z(F) of it comes from
``rearrange`` (itself checked against an index loop in test_rearrange.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.linalg.kronecker_sum import KroneckerSum
from curvlib.linalg.zproducts import DenseZOperator
from curvlib.linalg.rearrange import rearrange
from curvlib.linalg.zproducts import AffineZOperator, ConvZOperator, LinearZOperator, deflated, ema_combined
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import dims, seeds

F64 = torch.float64


def tkron(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """torch.kron with inputs re-laid out with standard strides (torch 2.13's kron
    raises on a [n, 1] tensor with strides (1, n))."""
    return torch.kron(A.reshape(-1).reshape(A.shape), B.reshape(-1).reshape(B.shape))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_linear_block(a: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """F = scale · Σ_b Σ_c kron(ā_b ā_bᵀ, g_bc g_bcᵀ), g ``[m, c, d_g]``, by loops (3.18)."""
    m, c, _ = g.shape
    F = 0.0
    for b in range(m):
        for j in range(c):
            F = F + tkron(torch.outer(a[b], a[b]), torch.outer(g[b, j], g[b, j]))
    return scale * F


def dense_conv_block(a, g, H, W, in_band, scale):
    """F = scale · Σ_b Σ_c Σ_{t,t' in band} kron(ā_t ā_t'ᵀ, g_t g_t'ᵀ) (3.28), by loops over
    pairs of 2-D positions (row, col) with t = row·W + col.

    ``in_band(p, q)`` decides whether the pair of 2-D positions p, q is kept.
    Uses kron(ā_t ā_t'ᵀ, g_t g_t'ᵀ) = (ā_t ⊗ g_t)(ā_t' ⊗ g_t')ᵀ over the (b, c) rows.
    """
    m, c, T, d_g = g.shape
    d_a = a.shape[-1]
    x = torch.empty(m * c, T, d_a * d_g, dtype=a.dtype)
    for b in range(m):
        for j in range(c):
            for t in range(T):
                x[b * c + j, t] = tkron(a[b, t], g[b, j, t])
    F = torch.zeros(d_a * d_g, d_a * d_g, dtype=a.dtype)
    positions = list(itertools.product(range(H), range(W)))
    for p in positions:
        for q in positions:
            if in_band(p, q):
                t, s = p[0] * W + p[1], q[0] * W + q[1]
                F += x[:, t].T @ x[:, s]
    return scale * F


def inf_band(r):
    if r is None:
        return lambda p, q: True
    return lambda p, q: max(abs(p[0] - q[0]), abs(p[1] - q[1])) <= r


def check_against_dense(op, F: torch.Tensor, seed: int, k: int = 3) -> None:
    Z = rearrange(F, op.a_dim, op.b_dim)
    assert op.shape == Z.shape
    g = gen(seed)
    v = torch.randn(Z.shape[1], generator=g, dtype=F.dtype)
    V = torch.randn(Z.shape[1], k, generator=g, dtype=F.dtype)
    u = torch.randn(Z.shape[0], generator=g, dtype=F.dtype)
    U = torch.randn(Z.shape[0], k, generator=g, dtype=F.dtype)
    assert_close(op.matvec(v), Z @ v, msg="Z(F) v")
    assert_close(op.matvec(V), Z @ V, msg="Z(F) V")
    assert_close(op.rmatvec(u), Z.T @ u, msg="Z(F)ᵀ u")
    assert_close(op.rmatvec(U), Z.T @ U, msg="Z(F)ᵀ U")


@st.composite
def linear_stats(draw, max_m=6, max_c=3, max_dim=4):
    m, c = draw(dims(1, max_m)), draw(dims(1, max_c))
    d_a, d_g = draw(dims(1, max_dim)), draw(dims(1, max_dim))
    g = gen(draw(seeds))
    a = torch.cat([torch.randn(m, d_a - 1, generator=g, dtype=F64), torch.ones(m, 1, dtype=F64)], dim=1)
    return a, torch.randn(m, c, d_g, generator=g, dtype=F64)


@st.composite
def conv_stats(draw, max_m=2, max_c=2, max_hw=5, max_dim=3):
    m, c = draw(dims(1, max_m)), draw(dims(1, max_c))
    H, W = draw(dims(1, max_hw)), draw(dims(1, max_hw))
    d_a, d_g = draw(dims(1, max_dim)), draw(dims(1, max_dim))
    g = gen(draw(seeds))
    a = torch.randn(m, H * W, d_a, generator=g, dtype=F64)
    return a, torch.randn(m, c, H * W, d_g, generator=g, dtype=F64), (H, W)


# ---- Prop. 3.1: Linear layers ----------------------------------------------------------------------
@given(linear_stats(max_c=1), st.floats(0.01, 10.0), seeds)
def test_prop_3_1_linear_single_column(stats, scale, seed):
    a, g = stats
    op = LinearZOperator(a, g[:, 0], scale)  # g as [m, d_g]: c = 1
    check_against_dense(op, dense_linear_block(a, g, scale), seed)


@given(linear_stats(), st.floats(0.01, 10.0), seeds)
def test_prop_3_1_linear_several_columns(stats, scale, seed):
    a, g = stats
    op = LinearZOperator(a, g, scale)
    check_against_dense(op, dense_linear_block(a, g, scale), seed)


def test_linear_operator_to_dense_is_z_of_the_block():
    g = gen(0)
    a, gr = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 2, 4, generator=g, dtype=F64)
    F = dense_linear_block(a, gr, 0.2)
    assert_close(LinearZOperator(a, gr, 0.2).to_dense(), rearrange(F, 3, 4))


def test_linear_operator_validation():
    a = torch.zeros(4, 3, dtype=F64)
    with pytest.raises(ShapeError, match=r"a \[4, 3\] and g \[5, 1, 2\]"):
        LinearZOperator(a, torch.zeros(5, 2, dtype=F64), 1.0)
    with pytest.raises(DTypeDeviceError, match="float32"):
        LinearZOperator(a, torch.zeros(4, 2), 1.0)


# ---- (3.31)–(3.36): convolutions with a 2-D band -------------------------------------------------------
@pytest.mark.parametrize("radius", [0, 1, 2, None])
@given(stats=conv_stats(), scale=st.floats(0.01, 10.0), seed=seeds)
def test_conv_products_equal_dense_band(radius, stats, scale, seed):
    a, g, (H, W) = stats
    op = ConvZOperator(a, g, (H, W), radius, scale)
    check_against_dense(op, dense_conv_block(a, g, H, W, inf_band(radius), scale), seed, k=2)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_conv_band_is_banded_not_exact_on_a_larger_grid(radius):
    """H, W large enough that the offset loop (not the all-pairs shortcut) runs."""
    g = gen(radius)
    H, W = 5, 4
    a = torch.randn(2, H * W, 3, generator=g, dtype=F64)
    gr = torch.randn(2, 2, H * W, 2, generator=g, dtype=F64)
    op = ConvZOperator(a, gr, (H, W), radius, 0.5)
    F = dense_conv_block(a, gr, H, W, inf_band(radius), 0.5)
    F_all = dense_conv_block(a, gr, H, W, inf_band(None), 0.5)
    assert torch.linalg.matrix_norm(F - F_all) > 1e-3 * torch.linalg.matrix_norm(F_all)
    check_against_dense(op, F, seed=radius)


def test_conv_radius_covering_the_grid_is_the_exact_block():
    g = gen(7)
    a = torch.randn(2, 6, 3, generator=g, dtype=F64)
    gr = torch.randn(2, 6, 2, generator=g, dtype=F64)  # [m, T, d_g]: c = 1
    dense_exact = ConvZOperator(a, gr, (2, 3), None, 1.0).to_dense()
    for r in (2, 5):
        assert_close(ConvZOperator(a, gr, (2, 3), r, 1.0).to_dense(), dense_exact)
    F = dense_conv_block(a, gr.unsqueeze(1), 2, 3, inf_band(None), 1.0)
    assert_close(dense_exact, rearrange(F, 3, 2))


@pytest.mark.parametrize("H, W, radius", [(3, 3, 1), (2, 4, 1), (4, 2, 1), (2, 2, 1), (5, 3, 2)])
def test_conv_band_is_on_2d_positions_not_on_the_flattened_index(H, W, radius):
    """A band |t − t'| ≤ r on the flattened index wraps at row ends and misses vertical
    neighbours (DESIGN.md §10); the operator must match the 2-D band and not it."""
    g = gen(H * 10 + W)
    a = torch.randn(2, H * W, 2, generator=g, dtype=F64)
    gr = torch.randn(2, 1, H * W, 3, generator=g, dtype=F64)
    F_2d = dense_conv_block(a, gr, H, W, inf_band(radius), 1.0)
    F_flat = dense_conv_block(a, gr, H, W, lambda p, q: abs((p[0] * W + p[1]) - (q[0] * W + q[1])) <= radius, 1.0)
    assert torch.linalg.matrix_norm(F_2d - F_flat) > 1e-3 * torch.linalg.matrix_norm(F_2d)
    Z_op = ConvZOperator(a, gr, (H, W), radius, 1.0).to_dense()
    assert_close(Z_op, rearrange(F_2d, 2, 3))
    assert torch.linalg.matrix_norm(Z_op - rearrange(F_flat, 2, 3)) > 1e-3 * torch.linalg.matrix_norm(Z_op)


def test_conv_operator_validation():
    a = torch.zeros(2, 6, 3, dtype=F64)
    g = torch.zeros(2, 1, 6, 2, dtype=F64)
    with pytest.raises(ShapeError, match="T = H·W = 2·2 = 4"):
        ConvZOperator(a, g, (2, 2), 1, 1.0)
    with pytest.raises(ShapeError):
        ConvZOperator(a, torch.zeros(2, 1, 5, 2, dtype=F64), (2, 3), 1, 1.0)
    with pytest.raises(ConfigError, match="radius"):
        ConvZOperator(a, g, (2, 3), -1, 1.0)
    with pytest.raises(DTypeDeviceError):
        ConvZOperator(a, g.float(), (2, 3), 1, 1.0)


# ---- §3.2.3.1: affine combinations with known Kronecker terms -------------------------------------------
def random_terms(d_a: int, d_b: int, K: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = gen(seed)
    return [(torch.randn(d_a, d_a, generator=g, dtype=F64), torch.randn(d_b, d_b, generator=g, dtype=F64)) for _ in range(K)]


def kron_sum_dense(terms) -> torch.Tensor:
    return sum(tkron(R, S) for R, S in terms)


@given(linear_stats(), dims(0, 3), st.floats(-2, 2), st.floats(-2, 2), seeds)
def test_affine_operator_equals_dense(stats, K, base_coeff, term_coeff, seed):
    a, g = stats
    F = dense_linear_block(a, g, 0.3)
    terms = random_terms(a.shape[1], g.shape[2], K, seed)
    op = AffineZOperator(LinearZOperator(a, g, 0.3), terms, base_coeff=base_coeff, term_coeff=term_coeff)
    M = base_coeff * F + (term_coeff * kron_sum_dense(terms) if K else 0.0)
    check_against_dense(op, M, seed)


@given(linear_stats(), dims(1, 3), seeds)
def test_deflated_is_z_of_the_difference(stats, K, seed):
    a, g = stats
    F = dense_linear_block(a, g, 0.5)
    terms = random_terms(a.shape[1], g.shape[2], K, seed)
    for ts in (terms, KroneckerSum(terms)):
        check_against_dense(deflated(LinearZOperator(a, g, 0.5), ts), F - kron_sum_dense(terms), seed)


@given(conv_stats(max_hw=4), st.floats(0.0, 1.0), seeds)
def test_ema_combined_is_z_of_the_averaged_block(stats, rho, seed):
    a, g, (H, W) = stats
    F_batch = dense_conv_block(a, g, H, W, inf_band(1), 1.0)
    previous = KroneckerSum(random_terms(a.shape[-1], g.shape[-1], 2, seed))
    op = ema_combined(ConvZOperator(a, g, (H, W), 1, 1.0), previous, rho)
    check_against_dense(op, rho * previous.to_dense() + (1 - rho) * F_batch, seed)


def test_affine_without_base_is_z_of_the_kronecker_sum():
    terms = random_terms(3, 2, 2, seed=1)
    op = AffineZOperator(None, terms, term_coeff=1.0)
    assert (op.a_dim, op.b_dim, op.dtype) == (3, 2, F64)
    check_against_dense(op, kron_sum_dense(terms), seed=2)


def test_affine_nests_and_accepts_a_dense_base():
    g = gen(3)
    F = torch.randn(6, 6, generator=g, dtype=F64)
    base = DenseZOperator(rearrange(F, 3, 2), 3, 2)
    t1, t2 = random_terms(3, 2, 1, seed=4), random_terms(3, 2, 1, seed=5)
    op = deflated(deflated(base, t1), t2)
    check_against_dense(op, F - kron_sum_dense(t1) - kron_sum_dense(t2), seed=6)


def test_affine_validation():
    base = LinearZOperator(torch.ones(3, 2, dtype=F64), torch.ones(3, 4, dtype=F64), 1.0)
    with pytest.raises(ShapeError, match="neither"):
        AffineZOperator(None, [])
    with pytest.raises(ShapeError, match=r"term 0 must be \(R \[2, 2\], S \[4, 4\]\)"):
        deflated(base, random_terms(3, 4, 1, seed=0))
    with pytest.raises(DTypeDeviceError, match="float32"):
        deflated(base, [(torch.eye(2), torch.eye(4))])
    with pytest.raises(ConfigError, match="rho"):
        ema_combined(base, random_terms(2, 4, 1, seed=0), 1.5)


# ---- dtype and device --------------------------------------------------------------------------------
def float32_operators():
    g = gen(11)
    a = torch.randn(3, 4, 3, generator=g)
    gr = torch.randn(3, 2, 4, 2, generator=g)
    lin = LinearZOperator(a[:, 0], gr[:, :, 0], 1.0 / 3)
    yield lin
    yield ConvZOperator(a, gr, (2, 2), 0, 1.0 / 3)
    yield ConvZOperator(a, gr, (2, 2), None, 1.0 / 3)
    yield deflated(lin, [(torch.eye(3), torch.eye(2))])


@pytest.mark.parametrize("op", list(float32_operators()), ids=["linear", "conv_r0", "conv_exact", "deflated"])
def test_float32_in_float32_out_and_mismatch_raises(op):
    assert op.dtype == torch.float32 and op.device == torch.device("cpu")
    v = torch.randn(op.shape[1], 2)
    u = torch.randn(op.shape[0])
    assert op.matvec(v).dtype == torch.float32 and op.matvec(v).shape == (op.shape[0], 2)
    assert op.rmatvec(u).dtype == torch.float32 and op.rmatvec(u).shape == (op.shape[1],)
    with pytest.raises(DTypeDeviceError, match="float64"):
        op.matvec(v.double())
    with pytest.raises(DTypeDeviceError, match="float64"):
        op.rmatvec(u.double())


def test_float32_products_match_float64_reference():
    g = gen(12)
    a = torch.randn(4, 9, 3, generator=g, dtype=F64)
    gr = torch.randn(4, 2, 9, 2, generator=g, dtype=F64)
    Z = rearrange(dense_conv_block(a, gr, 3, 3, inf_band(1), 0.25), 3, 2)
    op32 = ConvZOperator(a.float(), gr.float(), (3, 3), 1, 0.25)
    v = torch.randn(4, 2, generator=g, dtype=F64)
    assert_close(op32.matvec(v.float()), (Z @ v).float())


@pytest.mark.cuda
def test_operators_follow_the_cuda_device():
    g = gen(13)
    a = torch.randn(2, 9, 3, generator=g, dtype=F64)
    gr = torch.randn(2, 2, 9, 2, generator=g, dtype=F64)
    Z = rearrange(dense_conv_block(a, gr, 3, 3, inf_band(1), 1.0), 3, 2)
    ops = [ConvZOperator(a.cuda(), gr.cuda(), (3, 3), r, 1.0) for r in (1, None)]
    ops.append(deflated(ops[0], [(torch.eye(3, dtype=F64, device="cuda"), torch.eye(2, dtype=F64, device="cuda"))]))
    v = torch.randn(4, dtype=F64, generator=g)
    for op, ref in zip(ops, [Z, None, Z - rearrange(tkron(torch.eye(3, dtype=F64), torch.eye(2, dtype=F64)), 3, 2)]):
        out = op.matvec(v.cuda())
        assert op.device.type == "cuda" and out.device.type == "cuda"
        if ref is not None:
            assert_close(out.cpu(), ref @ v)
        with pytest.raises(DTypeDeviceError):
            op.matvec(v)
