"""The canonical layer statistics: rows, geometry, J-products, KFAC expand/reduce, Z-operators.

Every check compares with an independent dense float64 reference built by loops from the
definitions (curvlib.testing.references, or written out here), for every kind of
statistics the strategies draw (no positions, 1-/2-/3-D grids, sequences, one-hot rows,
several uses, tied transposed uses).
"""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlib.curvatures.factors import kfac_factors, reduced, z_operator
from curvlib.curvatures.statistics import LayerStatistics, Use
from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.linalg import rearrange
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import DenseRows, OneHotRows, Rows
from curvlib.linalg.zproducts import PositionZOperator
from curvlib.testing import assert_close
from curvlib.testing import references as ref
from curvlib.testing.strategies import STATISTICS_KINDS, dims, layer_statistics, seeds

F64 = torch.float64
few = settings(max_examples=12)
KINDS = st.sampled_from(STATISTICS_KINDS)


def _stats(max_dim: int = 3) -> st.SearchStrategy:
    return KINDS.flatmap(lambda k: layer_statistics(k, max_m=3, max_c=2, max_dim=max_dim, max_hw=3))


# --------------------------------------------------------------------------- rows


@few
@given(m=dims(1, 3), T=dims(1, 4), d=dims(1, 5), k=dims(1, 3), seed=seeds)
def test_one_hot_rows_equal_the_dense_one_hot_matrix(m, T, d, k, seed):
    """Every product of OneHotRows equals that of DenseRows on the explicit one-hot tensor
    (a negative index is an all-zero row)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, d, (m, T), generator=gen)
    one = OneHotRows(idx, d, dtype=F64)
    dense_t = torch.zeros(m, T, d, dtype=F64)
    for b in range(m):
        for t in range(T):
            if idx[b, t] >= 0:
                dense_t[b, t, idx[b, t]] = 1.0
    dense = DenseRows(dense_t)
    assert torch.equal(one.dense(), dense_t)
    w = torch.randn(k, m, T, generator=gen, dtype=F64)
    X = torch.randn(k, 2, d, generator=gen, dtype=F64)
    G = torch.randn(m, T, 3, generator=gen, dtype=F64)
    G4 = torch.randn(m, 2, T, 3, generator=gen, dtype=F64)
    U = torch.randn(k, d, d, generator=gen, dtype=F64)
    other = DenseRows(torch.randn(2, 3, d, generator=gen, dtype=F64))
    assert_close(one.gram(), dense.gram())
    assert_close(one.gram(w), dense.gram(w))
    assert_close(one.apply(X), dense.apply(X))
    assert_close(one.outer(G), dense.outer(G))
    assert_close(one.sample_outer(G4), dense.sample_outer(G4))
    assert_close(one.quadratic(U), dense.quadratic(U))
    assert_close(one.cross(one), dense.cross(dense))
    assert_close(one.cross(other), dense.cross(other))
    assert_close(other.cross(one), other.cross(dense))
    assert_close(one.position_sum().a, dense.position_sum().a)
    assert_close(one.pad(1, 2).dense(), dense.pad(1, 2).dense())
    assert_close(one.select(0, 1).dense(), dense_t[:1])
    back = Rows.from_state_dict(one.state_dict())
    assert isinstance(back, OneHotRows) and torch.equal(back.index, one.index) and back.dim == d


def test_rows_reject_bad_input():
    with pytest.raises(ShapeError):
        DenseRows(torch.zeros(2, 3))
    with pytest.raises(DTypeDeviceError):
        DenseRows(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match="< dim"):
        OneHotRows(torch.tensor([[0, 5]]), 5, dtype=F64)
    with pytest.raises(DTypeDeviceError):
        OneHotRows(torch.tensor([[0]]), 2, dtype=torch.long)


# --------------------------------------------------------------------------- geometry


def test_geometry_validates_and_describes():
    assert Geometry.none().T == 1 and Geometry.sequence(5).T == 5 and Geometry.grid((2, 3, 4), (3, 3, 3)).T == 24
    assert Geometry.grid((4, 4), (3, 2)).kernel_radius == 3 and Geometry.sequence(7).kernel_radius == 0
    assert Geometry.of_positions(()) == Geometry.none() and Geometry.of_positions((3,)).kind == "sequence"
    with pytest.raises(ShapeError):
        Geometry("none", (3,))
    with pytest.raises(ShapeError):
        Geometry("grid", ())
    with pytest.raises(ShapeError):
        Geometry.grid((2, 2), (3,))
    with pytest.raises(ConfigError):
        Geometry("ring", (3,))


# --------------------------------------------------------------------------- J-products


@few
@given(stats=_stats(), max_numbers=st.integers(1, 200))
def test_pair_gradient_chunks_and_pair_rows(stats, max_numbers):
    """The chunks are pair_gradients() in sample order, each within max_numbers (or one sample);
    pair_rows gives D_n = g_n ā_nᵀ exactly when the statistics say the pairs are outer products."""
    chunks = list(stats.pair_gradient_chunks(max_numbers))
    assert torch.equal(torch.cat(chunks), stats.pair_gradients())
    assert all(D.numel() <= max(max_numbers, stats.c * stats.p) for D in chunks)
    simple = len(stats.uses) == 1 and stats.uses[0].T == 1 and not stats.uses[0].transposed
    assert stats.rank_one_pairs == simple
    if simple:
        a, g = stats.pair_rows()
        assert_close(torch.einsum("ng,na->nga", g, a), stats.pair_gradients())
    else:
        with pytest.raises(ShapeError, match="not outer products"):
            stats.pair_rows()


@few
@given(stats=_stats(), seed=seeds)
def test_jacobian_products_define_the_dense_block(stats, seed):
    """scale·J Jᵀ = F_ii of the reference (every use, geometry, orientation); Jᵀ is J's
    adjoint; JᵀJ is the Gram matrix of the per-pair gradients; D_n by loops."""
    p, n = stats.p, stats.num_pairs
    J = stats.j(torch.eye(n, dtype=F64))  # [p, n]
    assert_close(stats.scale * J @ J.T, ref.dense_block(stats))
    assert_close(stats.jt(torch.eye(p, dtype=F64)), J.T)
    assert_close(stats.gram(), J.T @ J)
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, 3, generator=gen, dtype=F64)
    U = torch.randn(p, 2, generator=gen, dtype=F64)
    assert_close(stats.j(W), J @ W)
    assert_close(stats.j(W[:, :1]), J @ W[:, :1])
    assert_close(stats.jt(U), J.T @ U)
    assert_close(stats.jt(U[:, :1]), J.T @ U[:, :1])
    out = torch.full((p, 3), float("nan"), dtype=F64)
    assert stats.j(W, out=out) is out and torch.equal(out, stats.j(W))
    X = torch.randn(4, stats.g_dim, stats.a_dim, generator=gen, dtype=F64)
    assert_close(stats.jt_matrix(X), (J.T @ ref.vec(X).T).T)
    assert_close(ref.vec(stats.j_matrix(W.T)), (J @ W).T)
    # D_n by loops: Σ_u P_u(Σ_t g āᵀ)
    D = stats.pair_gradients()
    for b in range(stats.m):
        for c in range(stats.c):
            expected = torch.zeros(stats.g_dim, stats.a_dim, dtype=F64)
            for u in stats.uses:
                for t in range(u.T):
                    M = torch.outer(u.g[b, c, t], u.a.dense()[b, t])
                    expected += M.T if u.transposed else M
            assert_close(D[b * stats.c + c], expected)


@few
@given(stats=_stats())
def test_state_dict_round_trips_through_torch_load(stats):
    buf = io.BytesIO()
    torch.save(stats.state_dict(), buf)
    buf.seek(0)
    back = LayerStatistics.from_state_dict(torch.load(buf, weights_only=True))
    assert (back.a_dim, back.g_dim, back.scale, back.has_bias) == (stats.a_dim, stats.g_dim, stats.scale, stats.has_bias)
    for u, v in zip(stats.uses, back.uses):
        assert type(u.a) is type(v.a) and torch.equal(u.a.dense(), v.a.dense()) and torch.equal(u.g, v.g)
        assert u.geometry == v.geometry and u.transposed == v.transposed
    assert_close(back.gram(), stats.gram())


def test_statistics_reject_inconsistent_uses():
    a = DenseRows(torch.zeros(2, 3, 4, dtype=F64))
    g = torch.zeros(2, 1, 3, 5, dtype=F64)
    with pytest.raises(ShapeError, match="positions"):
        Use(a, g, Geometry.sequence(4))
    with pytest.raises(ShapeError, match="block dims"):
        LayerStatistics(uses=[Use(a, g, Geometry.sequence(3)), Use(a, g, Geometry.sequence(3), transposed=True)], scale=1.0)
    with pytest.raises(DTypeDeviceError):
        Use(a, g.float(), Geometry.sequence(3))
    s = LayerStatistics(uses=[Use(a, g, Geometry.sequence(3)), Use(a, g, Geometry.sequence(3))], scale=1.0)
    with pytest.raises(ShapeError, match="2 uses"):
        s.geometry  # noqa: B018
    with pytest.raises(AttributeError):
        s.scale = 2.0


# --------------------------------------------------------------------------- KFAC expand / reduce


@few
@given(stats=_stats(), setting=st.sampled_from(["expand", "reduce"]))
def test_kfac_factors_match_their_definitions(stats, setting):
    """Expand and reduce factors against explicit sums (one term per orientation)."""
    got = kfac_factors(stats, setting)
    expected = ref.dense_kfac_factors(stats, setting)
    assert len(got) == len(expected) == len({u.transposed for u in stats.uses})
    for (A, G), (A_ref, G_ref) in zip(got, expected):
        assert_close(A, A_ref)
        assert_close(G, G_ref)
        assert torch.equal(A, A.T) and torch.equal(G, G.T)  # exactly symmetric


@pytest.mark.parametrize("d_in, d_out", [(784, 300), (200, 785)])
def test_wide_kfac_factors_are_exactly_symmetric_and_exact(d_in, d_out):
    """Widths where the symmetric products recurse (≥ 192): the factors are bitwise symmetric
    without a symmetrization of their own (Rows.exact_symmetric_gram) and equal the float64
    definitions (3.19) to float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    m = 64
    x = torch.cat([torch.randn(m, 1, d_in, generator=gen, dtype=F64), torch.ones(m, 1, 1, dtype=F64)], -1)
    g = torch.randn(m, 1, 1, d_out, generator=gen, dtype=F64)
    stats = LayerStatistics(x.float(), g.float(), 1.0 / m, Geometry.none())
    assert stats.uses[0].a.exact_symmetric_gram
    (A, G), = kfac_factors(stats)
    assert torch.equal(A, A.T) and torch.equal(G, G.T)
    assert_close(A, x[:, 0].T @ x[:, 0] / m, dtype=torch.float32)
    assert_close(G, g[:, 0, 0].T @ g[:, 0, 0] / m, dtype=torch.float32)


def test_a_gram_not_known_to_be_symmetric_is_symmetrized():
    from curvlib.curvatures.factors import _symmetrized

    M = torch.arange(9, dtype=F64).reshape(3, 3)
    assert torch.equal(_symmetrized([M.clone()], 2.0, exact=False), M + M.T)
    assert torch.equal(_symmetrized([M.clone(), M.clone()], 2.0, exact=True), 4 * M)  # trusted as given


@few
@given(m=dims(1, 4), c=dims(1, 2), d_in=dims(1, 4), d_out=dims(1, 4), T=dims(1, 5), seed=seeds)
def test_linear_on_tokens_expand_and_reduce_definitions(m, c, d_in, d_out, T, seed):
    """A Linear layer on [m, T, d]: expand A = (1/(mT))·T·… and reduce by explicit means and
    sums (Eschenhagen et al. 2023); both reduce to plain KFAC (3.19) at T = 1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(m, T, d_in, generator=gen, dtype=F64), torch.ones(m, T, 1, dtype=F64)], -1)
    g = torch.randn(m, c, T, d_out, generator=gen, dtype=F64)
    stats = LayerStatistics(x, g, 1.0 / (m * c), Geometry.sequence(T))
    (A_e, G_e), = kfac_factors(stats, "expand")
    (A_r, G_r), = kfac_factors(stats, "reduce")
    A_exp = sum(torch.outer(x[b, t], x[b, t]) for b in range(m) for t in range(T)) / m
    G_exp = sum(torch.outer(g[b, j, t], g[b, j, t]) for b in range(m) for j in range(c) for t in range(T)) / (m * c * T)
    xm = x.mean(1)
    gs = g.sum(2)
    A_red = sum(torch.outer(xm[b], xm[b]) for b in range(m)) / m
    G_red = sum(torch.outer(gs[b, j], gs[b, j]) for b in range(m) for j in range(c)) / (m * c)
    assert_close(A_e, A_exp)
    assert_close(G_e, G_exp)
    assert_close(A_r, A_red)
    assert_close(G_r, G_red)
    one = LayerStatistics(x[:, :1], g[:, :, :1], 1.0 / (m * c), Geometry.sequence(1))
    plain = LayerStatistics(x[:, 0], g[:, :, 0], 1.0 / (m * c))  # a Linear layer on [m, d]
    (A_p, G_p), = kfac_factors(plain)
    for setting in ("expand", "reduce"):
        (A1, G1), = kfac_factors(one, setting)
        assert_close(A1, A_p)
        assert_close(G1, G_p)


# --------------------------------------------------------------------------- Z-operators


def _reduce_block(stats: LayerStatistics) -> torch.Tensor:
    """The block of the reduce setting by loops: D̂_n = Σ_groups P(ĝ_n â_bᵀ),
    â = mean over the group's positions, ĝ = sum."""
    p = stats.p
    F = torch.zeros(p, p, dtype=F64)
    for b in range(stats.m):
        for c in range(stats.c):
            D = torch.zeros(stats.g_dim, stats.a_dim, dtype=F64)
            for transposed in (False, True):
                group = [u for u in stats.uses if u.transposed == transposed]
                if not group:
                    continue
                T = sum(u.T for u in group)
                ah = sum(u.a.dense()[b].sum(0) for u in group) / T
                gh = sum(u.g[b, c].sum(0) for u in group)
                M = torch.outer(gh, ah)
                D += M.T if transposed else M
            x = ref.vec(D)
            F += torch.outer(x, x)
    return stats.scale * F


@few
@given(stats=_stats(max_dim=3), radius=st.sampled_from([None, 0, 1, "kernel"]), seed=seeds)
def test_z_operator_is_the_rearranged_block_of_the_setting(stats, radius, seed):
    """Z of the expand block (banded per use; every pair across uses for radius None) and of
    the reduce block equal the rearrangement of the dense references."""
    if radius == "kernel":
        radii = {u.geometry.kernel_radius for u in stats.uses}
        if len(radii) > 1:
            return
        r = radii.pop()
    else:
        r = radius
    gen = torch.Generator().manual_seed(seed)
    for setting, M in (("expand", ref.dense_block(stats, radius=r)), ("reduce", _reduce_block(stats))):
        op = z_operator(stats, setting, radius)
        Z = rearrange(M, stats.a_dim, stats.g_dim)
        assert op.shape == Z.shape
        V = torch.randn(Z.shape[1], 2, generator=gen, dtype=F64)
        U = torch.randn(Z.shape[0], 2, generator=gen, dtype=F64)
        assert_close(op.matvec(V), Z @ V, msg=f"{setting} matvec")
        assert_close(op.rmatvec(U), Z.T @ U, msg=f"{setting} rmatvec")


@few
@given(shape=st.sampled_from([(5,), (2, 3, 3), (3, 1, 2), (4, 2)]), r=st.integers(0, 3), seed=seeds)
def test_banded_position_operator_on_n_dimensional_grids(shape, r, seed):
    """The ∞-norm band on 1-D and 3-D grids (one GEMM per offset of the leading axes)."""
    gen = torch.Generator().manual_seed(seed)
    T = int(torch.tensor(shape).prod())
    a = torch.randn(2, T, 3, generator=gen, dtype=F64)
    g = torch.randn(2, 2, T, 2, generator=gen, dtype=F64)
    stats = LayerStatistics(a, g, 0.25, Geometry.of_positions(shape))
    op = PositionZOperator(a, g, stats.geometry, r, 0.25)
    Z = rearrange(ref.dense_block(stats, radius=r), 3, 2)
    V = torch.randn(4, 3, generator=gen, dtype=F64)
    U = torch.randn(9, 3, generator=gen, dtype=F64)
    assert_close(op.matvec(V), Z @ V)
    assert_close(op.rmatvec(U), Z.T @ U)


def test_reduced_statistics_are_the_identity_without_positions():
    a = torch.randn(3, 4, dtype=F64)
    g = torch.randn(3, 2, 5, dtype=F64)
    s = LayerStatistics(a, g, 1 / 6)
    assert reduced(s) is s
    with pytest.raises(ConfigError, match="weight_sharing"):
        kfac_factors(s, "squeeze")
    with pytest.raises(ConfigError, match="band_radius"):
        z_operator(LayerStatistics(a[:, None].expand(3, 2, 4), g[:, :, None].expand(3, 2, 2, 5), 1 / 6, Geometry.sequence(2)),
                   "expand", -1)
