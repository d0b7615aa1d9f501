"""The Gram form Z(F) = X C Yᵀ of :mod:`curvlib.linalg.zproducts` and the solvers iterating on
its coefficients (:class:`~curvlib.linalg.svd.GramOperator`), against dense float64
references: Z(F) from ``rearrange`` of the block built by loops, and ``torch.linalg.svd``.

What must hold: every product and Gram entry of the form is the dense one; the derived
forms (deflated, extended, scaled, transposed, symmetrized) are the dense operators of
:class:`AffineZOperator`/:class:`TransposedZOperator`; the solvers on the form run the same
iteration as on the direct operator (same iterations, same triplets) and find the dense
SVD; and the blocked kernels (3/4 of a GEMM for symmetric products) equal one GEMM.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from curvlib.errors import NumericalError
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.kron import unvec, vec
from curvlib.linalg.rearrange import rearrange
from curvlib.linalg.rows import DenseRows, OneHotRows
from curvlib.linalg.svd import GramOperator, lanczos_svd, power_svd
from curvlib.linalg.zproducts import (
    START_SKETCH_RANK,
    AffineZOperator,
    ConvZOperator,
    DenseZOperator,
    ExactZOperator,
    GramForm,
    LinearZOperator,
    PositionZOperator,
    SumZOperator,
    TransposedZOperator,
    _quadratic_forms,
    _range_sketch,
    _symmetric_product,
    _weighted_gram,
    deflated,
    ema_combined,
)
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import seeds

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_z(op) -> torch.Tensor:
    """Z of a ZOperator as a dense matrix, column by column (its own products)."""
    return op.matvec(torch.eye(op.shape[1], dtype=op.dtype))


def linear_block(a: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """F = scale Σ_b Σ_c (ā_b ā_bᵀ) ⊗ (g_bc g_bcᵀ) by loops, ``g [m, c, d_g]``."""
    F = 0.0
    for b in range(a.shape[0]):
        for j in range(g.shape[1]):
            F = F + torch.kron(torch.outer(a[b], a[b]), torch.outer(g[b, j], g[b, j]))
    return scale * F


def linear_op(m=9, d_a=4, d_g=3, c=2, seed=0, dtype=F64):
    g_ = gen(seed)
    a = torch.randn(m, d_a, generator=g_, dtype=F64)
    g = torch.randn(m, c, d_g, generator=g_, dtype=F64)
    Z = rearrange(linear_block(a, g, 0.7), d_a, d_g)
    return LinearZOperator(a.to(dtype), g.to(dtype), 0.7), Z


def form_dense(form: GramForm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, C, Y) of a form as dense matrices, built from its own materialization of unit
    coefficient vectors (X = [vec(MAT(X e_i))]) and its core applied to the identity."""
    N_a, N_b = form.coefficient_shape
    X = vec(form.left_matrices(torch.eye(N_a, dtype=F64))).T.to(F64)
    Y = vec(form.right_matrices(torch.eye(N_b, dtype=F64))).T.to(F64)
    C = form.forward(torch.eye(N_b, dtype=F64))
    return X, C, Y


def check_form(form: GramForm, Z: torch.Tensor, seed: int = 0) -> None:
    """Every piece of a form against the dense Z ``[d_a², d_b²]`` it represents."""
    X, C, Y = form_dense(form)
    assert form.shape == tuple(Z.shape)
    assert_close(X @ C @ Y.T, Z, msg="X C Yᵀ")
    N_a, N_b = form.coefficient_shape
    g_ = gen(seed)
    alpha = torch.randn(N_a, 3, generator=g_, dtype=F64)
    beta = torch.randn(N_b, 3, generator=g_, dtype=F64)
    assert_close(form.metric_a(alpha), X.T @ X @ alpha, msg="G_a α")
    assert_close(form.metric_b(beta), Y.T @ Y @ beta, msg="G_b β")
    assert_close(form.backward(alpha), C.T @ alpha, msg="Cᵀ")
    v = torch.randn(Z.shape[1], 2, generator=g_, dtype=F64).to(form.dtype)
    u = torch.randn(Z.shape[0], 2, generator=g_, dtype=F64).to(form.dtype)
    assert_close(form.right_images(v).to(F64), Y.T @ v.to(F64), msg="Yᵀv")
    assert_close(form.left_images(u).to(F64), X.T @ u.to(F64), msg="Xᵀu")
    # Z v = X C (Yᵀ v), one vector and a block
    assert_close(X @ form.forward(form.right_images(v[:, 0])), Z @ v[:, 0].to(F64), msg="Z v")
    p, q = torch.randn(2, form.b_dim, generator=g_, dtype=F64)
    assert_close(form.right_outer_images(p, q), Y.T @ vec(torch.outer(p, q)), msg="Yᵀ vec(p qᵀ)")
    P, Q = torch.randn(2, form.b_dim, 3, generator=g_, dtype=F64)
    assert_close(form.side_b.outer_images(P, Q), Y.T @ vec(P @ Q.T), msg="Yᵀ vec(P Qᵀ)")
    Pa, Qa = torch.randn(2, form.a_dim, 3, generator=g_, dtype=F64)
    assert_close(form.side_a.outer_images(Pa, Qa), X.T @ vec(Pa @ Qa.T), msg="Xᵀ vec(P Qᵀ)")
    # a narrow side takes a warm start exactly
    if form.b_dim <= 4 * START_SKETCH_RANK:
        assert torch.equal(form.start_right_images(v), form.right_images(v))


# --------------------------------------------------------------------------- the form of a block


@pytest.mark.parametrize("c", [1, 3])
def test_linear_form_is_the_dense_z(c):
    op, Z = linear_op(c=c, seed=c)
    form = op.gram_form()
    assert isinstance(form, GramOperator) and form.coefficient_shape == (9, 9)
    assert_close(dense_z(op), Z)
    check_form(form, Z)


def test_positions_with_radius_zero_have_a_form_over_the_rows():
    """r = 0 (positions as independent samples): X has m·T columns, ordered (b, t)."""
    g_ = gen(3)
    m, H, W, d_a, d_g, c = 3, 2, 2, 3, 2, 2
    a = torch.randn(m, H * W, d_a, generator=g_, dtype=F64)
    g = torch.randn(m, c, H * W, d_g, generator=g_, dtype=F64)
    op = ConvZOperator(a, g, (H, W), 0, 0.5)
    F = 0.0
    for b in range(m):
        for t in range(H * W):
            for j in range(c):
                F = F + torch.kron(torch.outer(a[b, t], a[b, t]), torch.outer(g[b, j, t], g[b, j, t]))
    form = op.gram_form()
    assert form.coefficient_shape == (m * H * W, m * H * W)
    check_form(form, rearrange(0.5 * F, d_a, d_g))


def test_one_hot_rows_form():
    g_ = gen(4)
    m, T, d, d_g = 5, 3, 6, 2
    idx = torch.randint(-1, d, (m, T), generator=g_)
    rows = OneHotRows(idx, d, dtype=F64)
    g = torch.randn(m, 1, T, d_g, generator=g_, dtype=F64)
    op = PositionZOperator(rows, g, Geometry.sequence(T), 0, 0.25)
    dense_op = PositionZOperator(DenseRows(rows.dense()), g, Geometry.sequence(T), 0, 0.25)
    check_form(op.gram_form(), dense_z(dense_op))


def test_operators_without_a_form():
    g_ = gen(5)
    a = torch.randn(2, 4, 3, generator=g_, dtype=F64)
    g = torch.randn(2, 1, 4, 2, generator=g_, dtype=F64)
    assert ConvZOperator(a, g, (2, 2), 1, 1.0).gram_form() is None  # a band
    assert ConvZOperator(a, g, (2, 2), None, 1.0).gram_form() is None  # every pair
    assert ExactZOperator(torch.randn(3, 2, 3, generator=g_, dtype=F64), 1.0).gram_form() is None
    assert DenseZOperator(torch.randn(9, 4, generator=g_, dtype=F64), 3, 2).gram_form() is None
    op, _ = linear_op()
    assert SumZOperator([op, op]).gram_form() is None  # cross Grams of several uses: not supported
    assert AffineZOperator(None, [(torch.eye(4, dtype=F64), torch.eye(3, dtype=F64))]).gram_form() is None


# --------------------------------------------------------------------------- derived forms


def _sym(M: torch.Tensor) -> torch.Tensor:
    return M + M.T


def test_derived_forms_are_the_dense_operators():
    op, Z = linear_op(seed=6)
    g_ = gen(6)
    terms = [(_sym(torch.randn(4, 4, generator=g_, dtype=F64)), _sym(torch.randn(3, 3, generator=g_, dtype=F64)))
             for _ in range(2)]
    for derived in (deflated(op, terms), ema_combined(op, terms, 0.3), AffineZOperator(op, terms, 0.5, 2.0)):
        check_form(derived.gram_form(), dense_z(derived))
    t = TransposedZOperator(op)
    check_form(t.gram_form(), Z.T)
    form = op.gram_form()
    check_form(form.scaled(-1.5), -1.5 * Z)
    # deflation by coefficient triplets: Z − Σ σ_j (Xα_j)(Yβ_j)ᵀ
    X, _, Y = form_dense(form)
    sigma = torch.tensor([2.0, 0.5], dtype=F64)
    alpha = torch.randn(9, 2, generator=g_, dtype=F64)
    beta = torch.randn(9, 2, generator=g_, dtype=F64)
    check_form(form.deflated(sigma, alpha, beta), Z - (X @ alpha * sigma) @ (Y @ beta).T)


def test_symmetrized_form_is_the_projected_operator():
    """Extra columns that are not symmetric: P_a Z P_b replaces each by its symmetric part."""
    op, _ = linear_op(seed=7)
    g_ = gen(7)
    R, S = torch.randn(4, 4, generator=g_, dtype=F64), torch.randn(3, 3, generator=g_, dtype=F64)
    ext = deflated(op, [(R, S)])

    def projector(d):
        P = torch.zeros(d * d, d * d, dtype=F64)
        for i in range(d):
            for j in range(d):
                P[i + d * j, i + d * j] += 0.5
                P[i + d * j, j + d * i] += 0.5
        return P

    check_form(ext.gram_form().symmetrized(), projector(4) @ dense_z(ext) @ projector(3))


def test_gram_of_non_finite_statistics_raises():
    a = torch.ones(3, 2, dtype=torch.float32)
    g = torch.full((3, 1, 2), 3e38, dtype=torch.float32)  # g gᵀ overflows float32
    form = LinearZOperator(a, g, 1.0).gram_form()
    with pytest.raises(NumericalError, match="non-finite"):
        form.metric_b(torch.ones(3, dtype=F64))


# --------------------------------------------------------------------------- solvers on the form


def _vectors_from(form: GramForm, U: torch.Tensor, side: str) -> torch.Tensor:
    mats = form.left_matrices(U) if side == "a" else form.right_matrices(U)
    return vec(mats).T.to(F64)


def _check_svd(form: GramForm, Z: torch.Tensor, res, k: int, tol: float, solver: str) -> None:
    assert res.converged
    U_ref, s_ref, Vh_ref = torch.linalg.svd(Z, full_matrices=False)
    assert_close(res.sigma, s_ref[:k], rtol=10 * tol, atol=0.0)
    U, V = _vectors_from(form, res.U, "a"), _vectors_from(form, res.V, "b")
    cos_tol = 1e-8 if tol < 1e-10 else 1e-4
    assert_close((U * U_ref[:, :k]).sum(0).abs(), torch.ones(k, dtype=F64), rtol=0, atol=cos_tol)
    assert_close((V * Vh_ref[:k].T).sum(0).abs(), torch.ones(k, dtype=F64), rtol=0, atol=cos_tol)
    # the materialized triplets meet the tolerance (power: the first on Z itself, the others
    # on the deflated operator)
    r = torch.maximum(torch.linalg.vector_norm(Z @ V - U * res.sigma, dim=0),
                      torch.linalg.vector_norm(Z.T @ U - V * res.sigma, dim=0)) / res.sigma
    last = 1 if solver == "power" else k
    assert bool((r[:last] <= 2 * tol).all()), r


@pytest.mark.parametrize("solver", ["power", "lanczos"])
@pytest.mark.parametrize("c", [1, 2])
def test_solvers_on_the_form_find_the_dense_svd(solver, c):
    """Full-rank Gram matrices (m ≤ d(d+1)/2 generic rows): down to float64 tolerances."""
    op, Z = linear_op(m=9, d_a=4, d_g=4, c=c, seed=10 + c)
    form = op.gram_form()
    assert float(torch.linalg.eigvalsh(form.side_b.gram())[0]) > 1e-8
    k, tol = 3, 1e-12
    res = power_svd(form, k, tol=tol, max_iters=20000) if solver == "power" else lanczos_svd(form, k, tol=tol)
    _check_svd(form, Z, res, k, tol, solver)
    assert_close(res.residuals[:1], res.residuals[:1].clamp(max=tol), rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_solvers_on_singular_gram_matrices(solver):
    """m > d_g(d_g+1)/2: G_b is singular and coefficients are defined up to its null space;
    norms are square roots of quadratic forms, good to ~√eps(float64) relative — ample for
    the float32 tolerances (the approximators go direct below 1e-7, svd_based module)."""
    op, Z = linear_op(m=11, d_a=4, d_g=3, c=1, seed=11)
    form = op.gram_form()
    assert float(torch.linalg.eigvalsh(form.side_b.gram())[4]) < 1e-10  # 11 columns, rank ≤ 6
    k, tol = 3, 1e-6
    res = power_svd(form, k, tol=tol, max_iters=20000) if solver == "power" else lanczos_svd(form, k, tol=tol)
    _check_svd(form, Z, res, k, tol, solver)


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_same_iteration_as_the_direct_operator(solver):
    """Same warm start, same tolerance: the coefficient iteration is the iteration on the
    vectors (module docstring of svd.py) — equal iteration counts and triplets."""
    op, Z = linear_op(m=30, d_a=5, d_g=4, c=1, seed=21)
    _, _, Vh = torch.linalg.svd(Z, full_matrices=False)
    v0 = Vh[:2].T + 0.05 * torch.randn(16, 2, generator=gen(1), dtype=F64)
    run = (lambda o: power_svd(o, 2, tol=1e-10, max_iters=5000, v0=v0)) if solver == "power" else (
        lambda o: lanczos_svd(o, 2, tol=1e-10, v0=v0))
    direct, gram = run(op), run(op.gram_form())
    assert direct.converged and gram.converged
    if solver == "power":
        assert gram.iterations == direct.iterations
    else:  # the Gram run starts from ZᵀZ v₀ (one step), not v₀ itself
        assert abs(gram.iterations - direct.iterations) <= 2
    assert_close(gram.sigma, direct.sigma, rtol=1e-10, atol=0.0)


@pytest.mark.parametrize("k", [1, 2])
def test_warm_start_from_the_solution_converges_at_once(k):
    """A warm start enters through Yᵀv₀ (power) or ZᵀZ v₀ (Lanczos, one more step): from the
    exact right singular vectors, one step per triplet."""
    op, Z = linear_op(m=9, d_a=4, d_g=4, seed=2)
    _, _, Vh = torch.linalg.svd(Z, full_matrices=False)
    v0 = Vh[:k].T.contiguous()
    power = power_svd(op.gram_form(), k, tol=1e-8, v0=v0)
    assert power.converged and power.iterations == k
    lanczos = lanczos_svd(op.gram_form(), k, tol=1e-8, v0=v0)
    assert lanczos.converged and lanczos.iterations <= k + 1
    assert_close(lanczos.sigma, torch.linalg.svdvals(Z)[:k], rtol=1e-8, atol=0.0)


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_more_triplets_than_the_rank_give_zero_sigmas(solver):
    """One sample, one column: Z has rank 1 and the coefficient space one dimension."""
    op, Z = linear_op(m=1, d_a=3, d_g=2, c=1, seed=3)
    form = op.gram_form()
    res = power_svd(form, 3) if solver == "power" else lanczos_svd(form, 3)
    assert res.converged
    assert_close(res.sigma[0], torch.linalg.svdvals(Z)[0])
    assert bool((res.sigma[1:] == 0).all())
    for t in (res.U, res.V, res.residuals):
        assert bool(torch.isfinite(t).all())


def test_float32_statistics_solved_in_float64_coefficients():
    op64, Z = linear_op(m=40, d_a=6, d_g=5, c=1, seed=9)
    op32 = LinearZOperator(op64.rows.dense()[:, 0].float(), op64.g[:, :, 0].float(), 0.7)
    form = op32.gram_form()
    assert form.dtype == torch.float32 and form.work_dtype == F64
    res = lanczos_svd(form, 2)
    assert res.sigma.dtype == F64 and res.converged
    assert_close(res.sigma, torch.linalg.svdvals(Z)[:2], dtype=torch.float32)


# --------------------------------------------------------------------------- blocked kernels


@given(n=st.integers(1, 40), d=st.sampled_from([5, 191, 192, 385, 511, 700, 785]), k=st.integers(1, 3), seed=seeds)
def test_blocked_symmetric_kernels_equal_one_gemm(n, d, k, seed):
    """The recursive kernels (no split below SYMMETRIC_BLOCKS_FROM = 192, one level at 192–383,
    two at 384–767, three at 785) against one dense GEMM; symmetric products exactly symmetric."""
    g_ = gen(seed)
    X = torch.randn(n, d, generator=g_, dtype=F64)
    w = torch.randn(n, k, generator=g_, dtype=F64)
    M = torch.randn(k, d, d, generator=g_, dtype=F64)
    assert_close(_symmetric_product(X.T * w[:, 0], X), (X.T * w[:, 0]) @ X, msg="Xᵀ D X")
    assert_close(_weighted_gram(X, w), torch.einsum("nk,ni,nj->kij", w, X, X), msg="Σ w x xᵀ")
    assert_close(_quadratic_forms(X, M), torch.einsum("ni,kij,nj->kn", X, M, X), msg="xᵀ M x")
    assert_close(_symmetric_product(X.T, X), X.T @ X)
    W = _weighted_gram(X, w)
    assert torch.equal(W, W.mT)  # bitwise: mirrored blocks, symmetrized diagonal tiles
    S = _symmetric_product(X.T.float(), X.float())
    assert torch.equal(S, S.mT)


class _GEMMs(TorchFunctionMode):
    """Counts the matrix products issued inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__matmul__", "matmul", "mm", "bmm"):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device, gemms", [("cpu", 15), ("meta", 1)])
def test_symmetric_kernels_split_in_blocks_on_the_cpu_only(device, gemms):
    """d = 1000 is split three levels deep on the CPU (7 off-diagonal blocks and 8 base tiles);
    on any other device (here the meta device, standing in for an accelerator) it is one GEMM
    — a launch per block would cost more than the multiply-adds it saves there."""
    X = torch.randn(16, 1000, device=device)
    M = torch.randn(1, 1000, 1000, device=device)
    for kernel in (lambda: _symmetric_product(X.T, X), lambda: _quadratic_forms(X, M)):
        with _GEMMs() as counted:
            kernel()
        assert counted.count == gemms


@pytest.mark.cuda
def test_symmetric_kernels_on_cuda_are_exact_and_symmetric():
    g_ = gen(5)
    X = torch.randn(64, 785, generator=g_, dtype=F64)
    w = torch.randn(64, 2, generator=g_, dtype=F64)
    M = torch.randn(2, 785, 785, generator=g_, dtype=F64)
    Xc, wc, Mc = X.cuda(), w.cuda(), M.cuda()
    assert_close(_weighted_gram(Xc, wc).cpu(), torch.einsum("nk,ni,nj->kij", w, X, X))
    assert_close(_quadratic_forms(Xc, Mc).cpu(), torch.einsum("ni,kij,nj->kn", X, M, X))
    S = _symmetric_product(Xc.T.float(), Xc.float())
    assert torch.equal(S, S.mT)
    assert_close(S.cpu(), X.T.float() @ X.float(), dtype=torch.float32)


def test_unvec_of_a_warm_start_is_read_column_major():
    """right_images reads v as vec (column-major): a non-symmetric MAT(v) gives Σ gᵀ MAT(v) g."""
    op, _ = linear_op(m=4, d_a=3, d_g=3, c=1, seed=12)
    form = op.gram_form()
    V = torch.arange(9, dtype=F64).reshape(3, 3)
    g = op.g[:, 0, 0]
    assert_close(form.right_images(vec(V)), torch.einsum("ni,ij,nj->n", g, V, g))
    assert_close(unvec(vec(V), 3, 3), V)


# --------------------------------------------------------------------------- sketched warm starts


def wide_op(seed=30, d_g=40):
    """A block whose G side is wider than 4·START_SKETCH_RANK: its warm starts are sketched."""
    op, Z = linear_op(m=14, d_a=3, d_g=d_g, c=2, seed=seed)
    assert d_g > 4 * START_SKETCH_RANK
    return op, Z


@pytest.mark.parametrize("extended", [False, True])
def test_wide_warm_start_enters_through_its_range_sketch(extended):
    """start_right_images(v) = Yᵀ vec(U Uᵀ S), S = MAT(v) and U the orthonormal range of S Ω —
    for the rows of the block and for an extra (explicit) column alike; a start of rank ≤ r
    enters exactly (its range is all of it)."""
    op, _ = wide_op()
    form = op.gram_form()
    g_ = gen(31)
    if extended:
        A = torch.randn(3, 3, generator=g_, dtype=F64)
        G = torch.randn(40, 40, generator=g_, dtype=F64)
        form = form.extended([(A + A.T, G + G.T)], 0.5)
    _, _, Y = form_dense(form)
    v = torch.randn(40 * 40, 2, generator=g_, dtype=F64)
    sketched = []
    for j in range(2):
        U, W = _range_sketch(unvec(v[:, j], 40, 40), START_SKETCH_RANK)
        assert_close(U.T @ U, torch.eye(START_SKETCH_RANK, dtype=F64), msg="orthonormal U")
        sketched.append(vec(U @ W.T))
    assert_close(form.start_right_images(v), Y.T @ torch.stack(sketched, 1), msg="images of the sketch")
    assert_close(form.start_right_images(v[:, 0]), Y.T @ sketched[0], msg="one start")
    low = torch.randn(40, 5, generator=g_, dtype=F64)
    S = low @ torch.randn(5, 40, generator=g_, dtype=F64)  # rank 5 ≤ r
    assert_close(form.start_right_images(vec(S)), form.right_images(vec(S)), msg="rank ≤ r: exact")


@pytest.mark.parametrize("solver", ["power", "lanczos"])
def test_sketched_warm_start_converges_to_the_dense_triplets(solver):
    """From a warm start near the solution (the exact right singular vectors perturbed), the
    sketched start still lands on the dense SVD's triplets — for the power SVD in no more
    iterations than a cold start (Lanczos converges in a handful of steps from anywhere here)."""
    op, Z = wide_op(seed=33)
    form = op.gram_form()
    _, s, Vh = torch.linalg.svd(Z, full_matrices=False)
    v0 = Vh[:2].T + 0.05 * torch.randn(Z.shape[1], 2, generator=gen(34), dtype=F64)
    run = (lambda **kw: power_svd(form, 2, tol=1e-9, max_iters=5000, **kw)) if solver == "power" else (
        lambda **kw: lanczos_svd(form, 2, tol=1e-9, **kw))
    warm, cold = run(v0=v0), run()
    assert warm.converged and cold.converged
    assert_close(warm.sigma, s[:2], rtol=1e-8, atol=0.0)
    if solver == "power":
        assert warm.iterations <= cold.iterations, (warm.iterations, cold.iterations)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sketched_warm_start_of_half_precision_statistics(dtype):
    """The sketch runs in float32 at least (QR has no half-precision kernel): a wide block of
    float16/bfloat16 statistics warm-starts, and its images are those of the float32 sketch."""
    op, _ = linear_op(m=14, d_a=3, d_g=40, c=2, seed=35, dtype=dtype)
    form = op.gram_form()
    v = torch.randn(1600, generator=gen(36), dtype=F64).to(dtype)
    U, W = _range_sketch(unvec(v.float(), 40, 40), START_SKETCH_RANK)
    assert_close(form.start_right_images(v), form.side_b.outer_images(U, W), msg="float32 sketch")
    res = power_svd(form, 1, tol=1e-3, v0=v)
    assert res.converged and bool(torch.isfinite(res.sigma).all())
