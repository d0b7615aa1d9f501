"""Every coarse space's columns against its formula computed densely (thesis §4.2.3)."""

from __future__ import annotations

import pytest
import torch

import coarse_reference as ref
from curvlib.approximators.api import approximate
from curvlib.coarse import CoarseBasis, Partition, two_level
from curvlib.damping.api import damped_inverse
from curvlib.linalg import (
    BlockDiagonalOperator,
    DampedKroneckerFactors,
    FactorEigenbasis,
    KroneckerEigen,
    LayerBlockOperator,
    unvec,
)
from curvlib.plugins import load_registry
from curvlib.testing import assert_close

DT = ref.DT
LAM = 0.05


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def setup(arch, kind, registry, lam=LAM):
    F, *_ = ref.make_curvature(arch, kind)
    inv = damped_inverse(approximate(F, "kfac", registry=registry), "heuristic", value=lam, registry=registry)
    u = F.gradient_vector()
    return F, inv, u, ref.kfac_inverse_dense(F, lam), ref.damped_dense(F, lam)


CASES = [(a, k) for a in ref.ARCHS for k in ("ggn", "fisher")]


def columns_by_layer(basis: CoarseBasis, F) -> list[torch.Tensor]:
    assert [g for g in basis.partition.groups] == [L.slice for L in F.layers]
    return list(basis.columns)


def test_library_first_level_is_the_hand_built_kfac(registry):
    for arch in ref.ARCHS:
        F, inv, u, M, _ = setup(arch, "ggn", registry)
        assert_close(inv @ u, M @ u)


@pytest.mark.parametrize("arch,kind", CASES)
def test_nicolaides_is_all_ones_per_layer(arch, kind, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    pre = two_level(inv, F, "nicolaides", LAM, registry=registry)
    cols = columns_by_layer(pre.coarse_basis(), F)
    for V, L in zip(cols, F.layers):
        assert_close(V, torch.ones(L.p_i, 1, dtype=DT))  # (4.26)


@pytest.mark.parametrize("arch,kind", CASES)
def test_residual_columns(arch, kind, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    r = u - Fb @ (M @ u)  # (4.15): F• = F + λI once
    w = M @ r  # F•KFAC⁻¹ r, block-diagonal so its layer-i rows are [F•KFAC]_ii⁻¹ r[i] (4.34)
    cols = columns_by_layer(two_level(inv, F, "residual", LAM, registry=registry).coarse_basis(u), F)
    for V, L in zip(cols, F.layers):
        assert_close(V[:, 0], w[L.slice])
    # the sum of the columns is F•KFAC⁻¹ r (β = 1)
    P = ref.dense_R0T([L.slice for L in F.layers], cols, F.p)
    assert_close(P @ torch.ones(P.shape[1], dtype=DT), w)


def test_residual_uses_damping_once(registry):
    F, inv, u, M, Fb = setup("mlp", "ggn", registry)
    V = two_level(inv, F, "residual", LAM, registry=registry).coarse_basis(u).columns[0][:, 0]
    twice = M @ (u - (Fb + LAM * torch.eye(F.p, dtype=DT)) @ (M @ u))
    s = F.layers[0].slice
    assert (V - twice[s]).abs().max() > 1e-6 * twice[s].abs().max()


@pytest.mark.parametrize("arch,kind", CASES)
@pytest.mark.parametrize("seed_kind", ["nicolaides", "residual"])
def test_krylov_columns(arch, kind, seed_kind, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    pre = two_level(inv, F, "krylov", LAM, registry=registry, seed=seed_kind, iterations=2)
    cols = columns_by_layer(pre.coarse_basis(u), F)
    w = M @ (u - Fb @ (M @ u))
    for V, L in zip(cols, F.layers):
        Mii = M[L.slice, L.slice]  # [F•KFAC]_ii⁻¹
        v = torch.ones(L.p_i, dtype=DT) if seed_kind == "nicolaides" else w[L.slice]
        expected = torch.stack([v, Mii @ v, Mii @ (Mii @ v)], 1)  # (4.31), N_i = 3
        assert_close(V, expected)


@pytest.mark.parametrize("arch,kind", CASES)
def test_taylor_columns(arch, kind, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    q = 3
    cols = columns_by_layer(two_level(inv, F, "taylor", LAM, registry=registry, order=q).coarse_basis(u), F)
    w = [M @ (u - Fb @ (M @ u))]
    for _ in range(q - 1):
        w.append(M @ (Fb @ w[-1]))  # (4.40)
    for V, L in zip(cols, F.layers):
        assert_close(V, torch.stack([x[L.slice] for x in w], 1))


def _damped_kfac_block(F, i):
    Ad, Gd = ref.pi_damped(*ref.factors(F, i), LAM)
    return torch.kron(Ad, Gd)  # the damped KFAC block [F•KFAC]_ii (4.28)


@pytest.mark.parametrize("arch,kind", CASES)
def test_spectral_column_is_the_smallest_eigenvector(arch, kind, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    basis = two_level(inv, F, "spectral", LAM, registry=registry).coarse_basis()
    for i, (V, L) in enumerate(zip(columns_by_layer(basis, F), F.layers)):
        K = _damped_kfac_block(F, i)
        e = torch.linalg.eigvalsh(K)
        v = V[:, 0]
        # a unit eigenvector of the smallest eigenvalue (4.27) (which may be multiple:
        # a rank-deficient A when m < a_dim)
        assert_close(torch.linalg.vector_norm(v), torch.tensor(1.0, dtype=DT))
        assert_close(K @ v, e[0] * v, atol=1e-10 * float(e[-1]))
        # vec(v_G v_Aᵀ): MAT(V_i) [g_dim, a_dim] is rank one (a mis-ordered reshape is not)
        s = torch.linalg.svdvals(unvec(v, L.g_dim, L.a_dim))
        assert s.numel() == 1 or s[1:].max() < 1e-10 * s[0]


class _Wrapped(LayerBlockOperator):
    """A first-level block applying ``inner``; subclasses declare one capability."""

    def __init__(self, inner):
        self.inner = inner

    a_dim = property(lambda self: self.inner.a_dim)
    b_dim = property(lambda self: self.inner.b_dim)
    dtype = property(lambda self: self.inner.dtype)
    device = property(lambda self: self.inner.device)

    def _apply(self, X):
        return self.inner._apply(X)


class _EigenBlock(_Wrapped, FactorEigenbasis):
    def __init__(self, inner, eig):
        super().__init__(inner)
        self._eig = eig

    eigen = property(lambda self: self._eig)


class _FactorsBlock(_Wrapped, DampedKroneckerFactors):
    damped_factors = property(lambda self: self.inner.damped_factors)


def _ExposesEigen(inv, F):
    """A first level whose blocks declare their per-layer KroneckerEigen, as a damping may."""
    blocks = [_EigenBlock(b, KroneckerEigen.from_factors(*ref.pi_damped(*ref.factors(F, i), LAM)))
              for i, b in enumerate(inv.blocks)]
    return BlockDiagonalOperator(blocks, inv.slices)


def _FactorsOnly(inv):
    """A first level whose blocks declare only their damped factors (no eigendecomposition)."""
    return BlockDiagonalOperator([_FactorsBlock(b) for b in inv.blocks], inv.slices)


def test_spectral_sources_agree(registry):
    F, inv, u, M, Fb = setup("cnn", "ggn", registry)
    exposed = _ExposesEigen(inv, F)
    b1 = two_level(exposed, F, "spectral", LAM, registry=registry).coarse_basis()
    assert two_level(inv, F, "spectral", LAM, registry=registry).coarse_basis().meta["eigen_source"] == (
        ["first_level"] * len(F.layers)
    )  # the built-in damping exposes its eigendecompositions
    b2 = two_level(_FactorsOnly(inv), F, "spectral", LAM, registry=registry).coarse_basis()
    b3 = two_level(M, F, "spectral", LAM, registry=registry).coarse_basis()
    b4 = two_level(inv, F, {"kind": "spectral", "source": "statistics"}, LAM, registry=registry).coarse_basis()
    assert b1.meta["eigen_source"] == ["first_level"] * len(F.layers)
    assert b2.meta["eigen_source"] == ["first_level_factors"] * len(F.layers)
    assert b3.meta["eigen_source"] == ["statistics"] * len(F.layers)
    assert b4.meta["eigen_source"] == ["statistics"] * len(F.layers)
    for i, cols in enumerate(zip(b1.columns, b2.columns, b3.columns, b4.columns)):
        K = _damped_kfac_block(F, i)
        e0 = torch.linalg.eigvalsh(K)[0]
        for V in cols:  # each a unit eigenvector of the smallest eigenvalue
            assert_close(K @ V[:, 0], e0 * V[:, 0], atol=1e-10 * float(K.diagonal().max()))


def test_spectral_needs_the_layer_partition(registry):
    from curvlib.errors import ConfigError

    F, inv, u, M, Fb = setup("mlp", "ggn", registry)
    pre = two_level(inv, F, "spectral", LAM, registry=registry, partition=Partition.parameter_tensors(F))
    with pytest.raises(ConfigError, match="layer partition"):
        pre @ u
    with pytest.raises(ConfigError, match="first_level"):
        two_level(M, F, {"kind": "spectral", "source": "first_level"}, LAM, registry=registry).coarse_basis()


def test_parameter_tensor_partition_groups():
    F, *_ = ref.make_curvature("mlp", "ggn")
    part = Partition.parameter_tensors(F)
    # written out: weight = first (a_dim − 1)·g_dim rows of vec([W, b]), bias = last g_dim
    expected = []
    for L in F.layers:
        s = L.slice
        if L.has_bias:
            expected += [(s.start, s.stop - L.g_dim), (s.stop - L.g_dim, s.stop)]
        else:
            expected.append((s.start, s.stop))
    assert [(g.start, g.stop) for g in part.groups] == expected
    assert len(part) == sum(len(L.param_shapes) for L in F.layers)
    # the bias rows of the flat vector hold the bias tensor
    v = torch.arange(F.p, dtype=DT)
    params = F.vector_to_params(v)
    k = 0
    for L in F.layers:
        k += 1
        if L.has_bias:
            bias_group = part.groups[[n for n in part.names].index(f"{L.name}.bias")]
            assert torch.equal(params[k], v[bias_group])
            k += 1


def test_partition_validation():
    from curvlib.errors import ShapeError

    with pytest.raises(ShapeError, match="overlap"):
        Partition([slice(0, 3), slice(2, 5)], 5)
    with pytest.raises(ShapeError, match="no group"):
        Partition([slice(0, 3)], 5)
    with pytest.raises(ShapeError, match="empty"):
        Partition([slice(0, 0), slice(0, 5)], 5)
    with pytest.raises(ShapeError, match="outside"):
        Partition([torch.tensor([0, 7])], 5, cover=False)
    Partition([torch.tensor([4, 0, 2]), slice(1, 2), torch.tensor([3])], 5)


def test_coarse_basis_prolong_restrict_dense():
    g = torch.Generator().manual_seed(0)
    groups = [torch.tensor([5, 0, 3]), slice(1, 3), torch.tensor([4, 6])]
    cols = [torch.randn(3, 2, generator=g, dtype=DT), torch.randn(2, 1, generator=g, dtype=DT),
            torch.randn(2, 0, dtype=DT)]
    basis = CoarseBasis(groups, cols, p=7)
    P = ref.dense_R0T(groups, cols, 7)
    assert basis.N == 3
    assert_close(basis.dense(), P)
    beta = torch.randn(3, 4, generator=g, dtype=DT)
    x = torch.randn(7, 4, generator=g, dtype=DT)
    assert_close(basis.prolong(beta), P @ beta)
    assert_close(basis.restrict(x), P.T @ x)
    assert_close(basis.prolong(beta[:, 0]), P @ beta[:, 0])
    assert_close(basis.gram(), P.T @ P)


def test_spectral_reuses_the_first_levels_eigendecompositions(registry, monkeypatch):
    """The built-in dampings expose ``eigen``: the spectral space decomposes nothing again
    (4.28)–(4.30), and its columns are those of the damped factors' eigenvectors."""
    from curvlib.coarse import spaces

    F, inv, u, M, Fb = setup("mlp", "ggn", registry)
    calls = []
    real = spaces.eigh_safe
    monkeypatch.setattr(spaces, "eigh_safe", lambda X: calls.append(X.shape) or real(X))
    basis = two_level(inv, F, "spectral", LAM, registry=registry).coarse_basis()
    assert calls == []
    for i, V in enumerate(basis.columns):
        Ad, Gd = inv.blocks[i].damped_factors
        v_a = torch.linalg.eigh(Ad).eigenvectors[:, 0]
        v_g = torch.linalg.eigh(Gd).eigenvectors[:, 0]
        expected = torch.kron(v_a, v_g)  # vec(v_G v_Aᵀ) = v_A ⊗ v_G (Thm 3.12)
        col = V[:, 0]
        assert abs(float(col @ expected)) == pytest.approx(float(col.norm() * expected.norm()), rel=1e-8)
