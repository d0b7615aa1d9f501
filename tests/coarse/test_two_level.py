"""Two-level preconditioners against dense float64 formulas (thesis §4.2, §4.3.4, appendix 4.A)."""

from __future__ import annotations

import warnings

import pytest
import torch

import coarse_reference as ref
from curvlib.approximators.api import approximate
from curvlib.precond.references import BlockNaturalGradient
from curvlib.coarse import (
    CoarseBasis,
    CoarseSpace,
    Partition,
    TwoLevelPreconditioner,
    two_level,
)
from curvlib.damping.api import damped_inverse
from curvlib.errors import ConfigError, DTypeDeviceError, NumericalWarning, ShapeError
from curvlib.plugins import load_registry
from curvlib.testing import assert_close

# several cases are singular on purpose (1-row bias groups with two Krylov columns, a CE
# output layer whose G has the all-ones null vector): the fallback's warning is tested once
pytestmark = pytest.mark.filterwarnings("ignore:two-level.*numerically singular:curvlib.errors.NumericalWarning")

DT = ref.DT
LAM = 0.05
SPACES = [
    ("nicolaides", {}),
    ("spectral", {}),
    ("krylov", {"seed": "nicolaides"}),
    ("krylov", {"seed": "residual"}),
    ("residual", {}),
    ("taylor", {"order": 2}),
]
STATIC = [("nicolaides", {}), ("spectral", {}), ("krylov", {"seed": "nicolaides"})]


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def setup(arch, kind, registry, lam=LAM):
    F, *_ = ref.make_curvature(arch, kind)
    inv = damped_inverse(approximate(F, "kfac", registry=registry), "heuristic", value=lam, registry=registry)
    return F, inv, F.gradient_vector(), ref.kfac_inverse_dense(F, lam), ref.damped_dense(F, lam)


def dense_basis(pre, u=None):
    basis = pre.coarse_basis(u)
    return ref.dense_R0T(basis.partition.groups, basis.columns, basis.p)


class FixedColumns(CoarseSpace):
    """A test coarse space returning given columns over a given partition."""

    kind = "fixed"

    def __init__(self, columns):
        super().__init__()
        self.cols = columns

    def basis(self, ctx):
        return CoarseBasis(ctx.partition, [c.to(ctx.dtype) for c in self.cols])


class DirectionSpace(CoarseSpace):
    """V_g = u[g]: seed 004's partitioned step (one learning rate per group)."""

    kind = "direction"

    @property
    def depends_on_input(self):
        return True

    def basis(self, ctx):
        return CoarseBasis(ctx.partition, [ctx.partition.take(ctx.u, g).unsqueeze(1) for g in range(len(ctx.partition))])


# -- coarse operators --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("space,opts", SPACES)
def test_coarse_operator_is_R0_Fdamped_R0T(arch, kind, space, opts, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    pre = two_level(inv, F, space, LAM, registry=registry, **opts)
    P = dense_basis(pre, u)
    assert_close(pre.coarse_operator(u), P.T @ Fb @ P)  # (4.14), (4.73)–(4.74)


@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
def test_tko_coarse_operator_from_cross_layer_kronecker_blocks(arch, kind, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    Fbar = ref.tko_dense(F, LAM)  # (4.20b), formed densely
    for space, opts in [("nicolaides", {}), ("residual", {}), ("krylov", {"seed": "residual"})]:
        pre = two_level(inv, F, space, LAM, "previous", registry=registry, **opts)
        P = dense_basis(pre, u)
        assert_close(pre.coarse_operator(u), P.T @ Fbar @ P)  # (4.20a)
        assert_close(pre.coarse_operator(u, exact=True), P.T @ Fb @ P)


def test_coarse_operator_never_forms_dense_F(registry, monkeypatch):
    F, inv, u, M, Fb = setup("cnn", "ggn", registry)
    expected = ref.two_level_dense(M, Fb, dense_basis(two_level(inv, F, "taylor", LAM, registry=registry), u), u)

    def boom(*a, **k):
        raise AssertionError("a dense F was formed")

    monkeypatch.setattr(type(F), "_dense", boom)
    monkeypatch.setattr(type(F), "_dense_block", boom)
    pre = two_level(inv, F, "taylor", LAM, registry=registry)
    assert_close(pre @ u, expected)


# -- the two-level product ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("space,opts", SPACES)
def test_multiplicative_product_is_4_17(arch, kind, space, opts, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    pre = two_level(inv, F, space, LAM, registry=registry, **opts)
    P = dense_basis(pre, u)
    assert_close(pre @ u, ref.two_level_dense(M, Fb, P, u))


@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("space,opts", SPACES[:3] + SPACES[4:5])
def test_additive_and_previous_products(arch, space, opts, registry):
    F, inv, u, M, Fb = setup(arch, "ggn", registry)
    pre = two_level(inv, F, space, LAM, "additive", registry=registry, **opts)
    P = dense_basis(pre, u)
    assert_close(pre @ u, ref.two_level_dense(M, Fb, P, u, "additive"))  # (4.19)
    pre = two_level(inv, F, space, LAM, "previous", registry=registry, **opts)
    Fc_bar = P.T @ ref.tko_dense(F, LAM) @ P
    assert_close(pre @ u, ref.two_level_dense(M, Fb, P, u, "previous", Fc=Fc_bar))  # (4.47)


@pytest.mark.parametrize("space,opts", STATIC)
def test_identity_4_18_dense(space, opts, registry):
    F, inv, u, M, Fb = setup("cnn", "fisher", registry)
    pre = two_level(inv, F, space, LAM, registry=registry, **opts)
    I = torch.eye(F.p, dtype=DT)
    M2 = pre.matmat(I)  # the two-level matrix, column by column (its basis does not depend on u)
    P = dense_basis(pre)
    Q = P @ torch.linalg.solve(P.T @ Fb @ P, P.T)  # R₀ᵀ F_coarse⁻¹ R₀
    assert_close(M2, M + Q @ (I - Fb @ M))  # (4.17) as a matrix
    assert_close(I - M2 @ Fb, (I - Q @ Fb) @ (I - M @ Fb))  # (4.18)


def test_matrix_input_equals_columns(registry):
    F, inv, u, M, Fb = setup("convae", "ggn", registry)
    U = torch.stack([u, torch.randn(F.p, generator=torch.Generator().manual_seed(3), dtype=DT), -2 * u], 1)
    for space, opts in SPACES:
        pre = two_level(inv, F, space, LAM, registry=registry, **opts)
        Z = pre @ U
        assert len(pre.infos) == (3 if pre.coarse_space.depends_on_input else 1)
        for j in range(U.shape[1]):
            assert_close(Z[:, j], pre @ U[:, j])
        er = pre.error_reduction(U)
        assert er.shape == (3,)
        assert_close(er[0], pre.error_reduction(u))


def test_list_input(registry):
    F, inv, u, M, Fb = setup("mlp", "ggn", registry)
    pre = two_level(inv, F, "residual", LAM, registry=registry)
    out = pre @ F.vector_to_params(u)
    assert_close(F.params_to_vector(out), pre @ u)


# -- error reduction (§4.3.4) -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("kind", ["ggn", "fisher"])
@pytest.mark.parametrize("mode", ["multiplicative", "additive", "previous"])
def test_error_reduction_equals_dense_difference(arch, kind, mode, registry):
    F, inv, u, M, Fb = setup(arch, kind, registry)
    zeta = torch.linalg.solve(Fb, u)  # the exact solution, for the reference only
    E0 = ref.energy_error(M @ u, zeta, Fb)  # (4.42)
    for space, opts in SPACES:
        pre = two_level(inv, F, space, LAM, mode, registry=registry, **opts)
        E = ref.energy_error(pre @ u, zeta, Fb)  # (4.43)
        er = pre.error_reduction(u)  # (4.46), without ζ
        assert_close(er, E - E0, atol=1e-10 * float(E0))
        if mode == "multiplicative":
            assert float(er) <= 1e-12 * float(E0)  # (4.21)


def test_solve_returns_consistent_intermediates(registry):
    F, inv, u, M, Fb = setup("cnn", "ggn", registry)
    pre = two_level(inv, F, "krylov", LAM, registry=registry, seed="residual")
    sol = pre.solve(u, error_reduction=True)
    assert_close(sol.zeta_first, M @ u)
    assert_close(sol.residual, u - Fb @ (M @ u))
    assert_close(sol.zeta, pre @ u)
    assert_close(sol.correction, sol.basis.prolong(sol.beta))
    r0 = sol.basis.restrict(sol.residual)
    # (4.46) at β* is −⟨R₀r, F_c⁻¹R₀r⟩
    assert_close(sol.error_reduction, -(r0 @ torch.linalg.solve(sol.coarse_operator, r0)))
    assert sol.info.N == 2 * len(F.layers) and sol.info.rank == sol.info.N


@pytest.mark.parametrize("arch", ref.ARCHS)
def test_taylor_order_one_is_residual_and_higher_orders_never_worse(arch, registry):
    F, inv, u, M, Fb = setup(arch, "fisher", registry)
    zeta = torch.linalg.solve(Fb, u)
    res = two_level(inv, F, "residual", LAM, registry=registry)
    tay1 = two_level(inv, F, "taylor", LAM, registry=registry, q=1)
    assert_close(tay1 @ u, res @ u)
    for Vr, Vt in zip(res.coarse_basis(u).columns, tay1.coarse_basis(u).columns):
        assert_close(Vt, Vr)
    errors = []
    for q in range(1, 5):
        z = two_level(inv, F, "taylor", LAM, registry=registry, order=q) @ u
        errors.append(float(ref.energy_error(z, zeta, Fb)))
    E0 = float(ref.energy_error(M @ u, zeta, Fb))
    for a, b in zip(errors, errors[1:]):
        assert b <= a + 1e-10 * E0


@pytest.mark.parametrize("arch", ref.ARCHS)
def test_whole_space_gives_the_exact_solution(arch, registry):
    F, inv, u, M, Fb = setup(arch, "ggn", registry)
    zeta = torch.linalg.solve(Fb, u)
    # V_i = I per layer
    eye_space = FixedColumns([torch.eye(L.p_i, dtype=DT) for L in F.layers])
    assert_close(TwoLevelPreconditioner(inv, F, eye_space, LAM) @ u, zeta)
    # singletons with identity columns
    single = FixedColumns([torch.ones(1, 1, dtype=DT) for _ in range(F.p)])
    pre = TwoLevelPreconditioner(inv, F, single, LAM, partition=Partition.singletons(F.p))
    assert_close(pre @ u, zeta)
    assert float(pre.error_reduction(u)) == pytest.approx(-float(ref.energy_error(M @ u, zeta, Fb)), rel=1e-8)


# -- rank-deficient fallback --------------------------------------------------------------------------
def test_zero_residual_gives_the_first_level_unchanged(registry):
    F, inv, u, M, Fb = setup("mlp", "ggn", registry)
    exact = torch.linalg.inv(Fb)  # an exact first level: r = 0 on every layer
    pre = two_level(exact, F, "residual", LAM, registry=registry)
    out = pre @ u
    # the residual is zero up to rounding; whatever is left, the output stays finite and exact
    assert torch.isfinite(out).all()
    assert_close(out, exact @ u)


def test_zero_block_and_duplicate_columns_fall_back_to_the_reduced_min_norm_solution(registry):
    F, inv, u, M, Fb = setup("cnn", "fisher", registry)
    g = torch.Generator().manual_seed(7)
    L = F.layers
    v1 = torch.randn(L[1].p_i, dtype=DT, generator=g)
    cols = [
        torch.zeros(L[0].p_i, 2, dtype=DT),  # a zero block (dropped)
        torch.stack([v1, v1, -2 * v1, torch.randn(L[1].p_i, dtype=DT, generator=g)], 1),  # duplicates
        torch.randn(L[2].p_i, 1, dtype=DT, generator=g),
    ]
    pre = TwoLevelPreconditioner(inv, F, FixedColumns(cols), LAM)
    with pytest.warns(NumericalWarning, match="numerically singular"):
        out = pre @ u
    assert torch.isfinite(out).all()
    info = pre.info
    assert info.dropped_columns == (0, 1) and info.N == 7 and info.rank == 3 and info.truncated == 2
    assert info.condition_number == float("inf") or info.condition_number > 1e12
    P = ref.dense_R0T([l.slice for l in L], cols, F.p)[:, 2:]  # the reduced problem
    Fc = P.T @ Fb @ P
    beta = torch.linalg.pinv(Fc, hermitian=True) @ (P.T @ (u - Fb @ (M @ u)))  # minimum-norm
    assert_close(out, M @ u + P @ beta)
    er = pre.error_reduction(u)  # the same (cached) coarse problem: no second warning
    zeta = torch.linalg.solve(Fb, u)
    E0 = ref.energy_error(M @ u, zeta, Fb)
    assert_close(er, ref.energy_error(out, zeta, Fb) - E0, atol=1e-10 * float(E0))


def test_all_columns_zero(registry):
    F, inv, u, M, Fb = setup("mlp", "ggn", registry)
    pre = TwoLevelPreconditioner(inv, F, FixedColumns([torch.zeros(L.p_i, 1, dtype=DT) for L in F.layers]), LAM)
    assert_close(pre @ u, M @ u)
    assert pre.info.dropped_columns == tuple(range(len(F.layers))) and pre.info.rank == 0
    assert float(pre.error_reduction(u)) == 0.0


# -- other partitions and first levels ----------------------------------------------------------------
@pytest.mark.parametrize("arch", ref.ARCHS)
@pytest.mark.parametrize("mode", ["multiplicative", "previous"])
def test_parameter_tensor_partition(arch, mode, registry):
    F, inv, u, M, Fb = setup(arch, "ggn", registry)
    part = Partition.parameter_tensors(F)
    groups = []
    for L in F.layers:  # written out independently: [weight rows | bias rows] per layer
        s = L.slice
        groups += [slice(s.start, s.stop - L.g_dim), slice(s.stop - L.g_dim, s.stop)] if L.has_bias else [s]
    for space, opts in [("nicolaides", {}), ("residual", {}), ("krylov", {"seed": "nicolaides"}), ("taylor", {"order": 2})]:
        pre = two_level(inv, F, space, LAM, mode, registry=registry, partition=part, **opts)
        basis = pre.coarse_basis(u)
        P = ref.dense_R0T(groups, basis.columns, F.p)
        if space == "nicolaides":
            assert_close(P, ref.dense_R0T(groups, [torch.ones(g.stop - g.start, 1, dtype=DT) for g in groups], F.p))
        if mode == "multiplicative":
            assert_close(pre @ u, ref.two_level_dense(M, Fb, P, u))
        else:
            assert_close(pre.coarse_operator(u), P.T @ ref.tko_dense(F, LAM) @ P)
            assert_close(pre @ u, ref.two_level_dense(M, Fb, P, u, "previous", Fc=P.T @ ref.tko_dense(F, LAM) @ P))


def test_krylov_on_a_finer_partition_uses_the_group_block_of_M(registry):
    F, inv, u, M, Fb = setup("mlp", "ggn", registry)
    part = Partition.parameter_tensors(F)
    pre = two_level(inv, F, "krylov", LAM, registry=registry, partition=part)
    for grp, V in zip(part.groups, pre.coarse_basis().columns):
        ones = torch.ones(grp.stop - grp.start, dtype=DT)
        assert_close(V[:, 1], M[grp, grp] @ ones)  # R_g M R_gᵀ v_g


def test_arbitrary_index_groups(registry):
    F, inv, u, M, Fb = setup("convae", "fisher", registry)
    perm = torch.randperm(F.p, generator=torch.Generator().manual_seed(0))
    groups = [perm[:30], perm[30:31], perm[31:]]
    part = Partition(groups, F.p)
    for space in ("nicolaides", "residual", "taylor"):
        pre = two_level(inv, F, space, LAM, registry=registry, partition=part)
        P = ref.dense_R0T(groups, pre.coarse_basis(u).columns, F.p)
        assert_close(pre.coarse_operator(u), P.T @ Fb @ P)
        assert_close(pre @ u, ref.two_level_dense(M, Fb, P, u))
        pre = two_level(inv, F, space, LAM, "previous", registry=registry, partition=part)
        assert_close(pre.coarse_operator(u), P.T @ ref.tko_dense(F, LAM) @ P)


def test_first_levels_block_natural_gradient_dense_and_none(registry):
    F, inv, u, M, Fb = setup("cnn", "ggn", registry)
    bng = BlockNaturalGradient(F, LAM)
    Mb = torch.block_diag(*[torch.linalg.inv(Fb[L.slice, L.slice]) for L in F.layers])
    for space, opts in SPACES[2:]:
        fast = two_level(bng, F, space, LAM, registry=registry, **opts)  # block-diagonal: one product per step
        dense_M = two_level(Mb, F, space, LAM, registry=registry, **opts)  # generic first level
        P = dense_basis(fast, u)
        assert_close(fast @ u, ref.two_level_dense(Mb, Fb, P, u))
        assert_close(dense_M @ u, fast @ u)
    # zero first level: ζ = R₀ᵀ F_coarse⁻¹ R₀ u
    pre = two_level(None, F, "nicolaides", LAM, registry=registry)
    P = dense_basis(pre)
    assert_close(pre @ u, P @ torch.linalg.solve(P.T @ Fb @ P, P.T @ u))


def test_hessian_partitioned_newton_step_of_seed_004(registry):
    """Zero first level, one group per parameter tensor, V_g = u[g], the exact Hessian
    (products only): ζ = P (PᵀH•P)⁻¹ Pᵀu, the partitioned Newton step of seed 004 §4."""
    model, loss, X, y = ref.make_problem("mlp", 6, seed=2)
    from curvlib.curvatures.api import curvature

    H = curvature("hessian", model, loss, (X, y), registry=registry)
    Fg, *_ = ref.make_curvature("mlp", "ggn", 6, 2)
    u = H.gradient_vector()
    part = Partition.parameter_tensors(H)
    lam = 0.5
    pre = TwoLevelPreconditioner(None, H, DirectionSpace(), lam, partition=part)
    Hb = ref.damped_dense(H, lam)
    P = ref.dense_R0T(part.groups, [u[g].unsqueeze(1) for g in part.groups], H.p)
    Fc = P.T @ Hb @ P
    assert_close(pre.coarse_operator(u), Fc)
    assert_close(pre @ u, P @ torch.linalg.pinv(Fc, hermitian=True) @ (P.T @ u))
    # the Hessian has no Kronecker statistics: 'previous' is refused with a clear message
    with pytest.raises(ConfigError, match="statistics"):
        two_level(None, H, "nicolaides", lam, "previous", registry=registry)
    assert Fg.p == H.p


def test_u_dependent_bases_get_their_own_coarse_operator(registry):
    F, inv, u, M, Fb = setup("mlp", "fisher", registry)
    pre = two_level(inv, F, "residual", LAM, registry=registry)
    u2 = torch.randn(F.p, generator=torch.Generator().manual_seed(5), dtype=DT)
    for v in (u, u2):
        P = dense_basis(pre, v)
        assert_close(pre.coarse_operator(v), P.T @ Fb @ P)
    assert not torch.allclose(pre.coarse_operator(u), pre.coarse_operator(u2))


# -- errors --------------------------------------------------------------------------------------------
def test_bad_arguments(registry):
    F, inv, u, M, Fb = setup("mlp", "ggn", registry)
    with pytest.raises(ConfigError, match="mode"):
        two_level(inv, F, "residual", LAM, "sideways", registry=registry)
    for lam in (0.0, -1.0, float("nan"), "x"):
        with pytest.raises(ConfigError, match="damping"):
            two_level(inv, F, "residual", lam, registry=registry)
    with pytest.raises(ConfigError, match="rcond"):
        two_level(inv, F, "residual", LAM, registry=registry, rcond=2.0)
    with pytest.raises(ShapeError):
        two_level(torch.eye(3, dtype=DT), F, "residual", LAM, registry=registry)
    with pytest.raises(DTypeDeviceError):
        two_level(M.float(), F, "residual", LAM, registry=registry)
    pre = two_level(inv, F, "residual", LAM, registry=registry)
    with pytest.raises(ShapeError):
        pre @ torch.zeros(F.p + 1, dtype=DT)
    with pytest.raises(DTypeDeviceError):
        pre @ u.float()
    with pytest.raises(ConfigError, match="depends on u"):
        pre.coarse_basis()
    with pytest.raises(ConfigError, match="CoarseSpace instance"):
        two_level(inv, F, FixedColumns([]), LAM, order=2)
    with pytest.raises(ShapeError, match="partition"):
        two_level(inv, F, "residual", LAM, registry=registry, partition=Partition.singletons(F.p - 1))


def test_float32_model_keeps_its_dtype(registry):
    model, loss, X, y = ref.make_problem("cnn")
    model = model.float()
    from curvlib.curvatures.api import curvature

    F = curvature("ggn", model, loss, (X.float(), y), registry=registry)
    inv = damped_inverse(approximate(F, "kfac", registry=registry), "heuristic", value=LAM, registry=registry)
    u = F.gradient_vector()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        for mode in ("multiplicative", "previous"):
            pre = two_level(inv, F, "krylov", LAM, mode, registry=registry, seed="residual")
            z = pre @ u
            assert z.dtype == torch.float32 and torch.isfinite(z).all()
            assert pre.error_reduction(u).dtype == torch.float32
    # and it agrees with the float64 computation to float32 accuracy
    F64, *_ = ref.make_curvature("cnn", "ggn")
    inv64 = damped_inverse(approximate(F64, "kfac", registry=registry), "heuristic", value=LAM, registry=registry)
    z64 = two_level(inv64, F64, "residual", LAM, registry=registry) @ F64.gradient_vector()
    z32 = two_level(inv, F, "residual", LAM, registry=registry) @ u
    assert_close(z32.double(), z64, dtype=torch.float32)


def test_solve_accepts_the_first_level_step_and_residual(registry):
    F, inv, u, M, Fb = setup("convae", "fisher", registry)
    z1 = inv @ u
    r = u - Fb @ z1
    for space, opts in SPACES:
        pre = two_level(inv, F, space, LAM, registry=registry, **opts)
        a = pre.solve(u, error_reduction=True)
        b = pre.solve(u, error_reduction=True, zeta_first=z1, residual=r)
        assert_close(b.zeta, a.zeta)
        assert_close(b.error_reduction, a.error_reduction)
    with pytest.raises(ShapeError):
        pre.solve(u, zeta_first=torch.stack([z1, z1], 1))


def test_tko_tikhonov_diagonal_blocks(registry):
    F, inv, u, M, Fb = setup("cnn", "fisher", registry)
    Fbar = ref.tko_dense(F, LAM)
    for i, L in enumerate(F.layers):  # diagonal blocks A_i ⊗ G_i + λI instead of the π-split
        A, G = ref.factors(F, i)
        Fbar[L.slice, L.slice] = torch.kron(A, G) + LAM * torch.eye(L.p_i, dtype=DT)
    pre = two_level(inv, F, "residual", LAM, "previous", registry=registry, tko_diagonal="tikhonov")
    P = dense_basis(pre, u)
    assert_close(pre.coarse_operator(u), P.T @ Fbar @ P)
    with pytest.raises(ConfigError, match="tko_diagonal"):
        two_level(inv, F, "residual", LAM, "previous", registry=registry, tko_diagonal="pi")


def test_solve_coarse_equilibrated_pseudo_inverse():
    from curvlib.coarse import solve_coarse

    g = torch.Generator().manual_seed(4)
    B = torch.randn(6, 3, generator=g, dtype=DT)
    B = torch.cat([B, 1e4 * B[:, :1]], 1)  # a collinear column, 1e4 times larger
    Fc = B.T @ B
    rhs = B.T @ torch.randn(6, generator=g, dtype=DT)  # in the range of Fc
    beta = solve_coarse(Fc, rhs, rcond=1e-12)
    assert torch.isfinite(beta).all()
    assert_close(Fc @ beta, rhs)  # solves the consistent singular system
    assert_close(B @ beta, B @ ref.scaled_pinv_solve(Fc, rhs))  # the same correction B β
    assert solve_coarse(torch.zeros(0, 0, dtype=DT), torch.zeros(0, dtype=DT), 1e-12).shape == (0,)
