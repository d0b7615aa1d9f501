"""``damped_inverse`` over block-diagonal approximations, failure handling, plugin
registration, and the once-per-refresh eigendecompositions."""

from __future__ import annotations

import warnings

import pytest
import torch
from damping_reference import (
    FakeApproximation,
    FakeExactBlock,
    assert_solve_accuracy,
    eye,
    randn,
    spd,
)

from curvlib.damping import (
    BlockDiagonalInverse,
    HeuristicDamping,
    HeuristicOptions,
    LevenbergMarquardtDamping,
    LevenbergMarquardtOptions,
    TikhonovDamping,
    TikhonovOptions,
    damped_inverse,
)
from curvlib.errors import (
    ConfigError,
    DTypeDeviceError,
    NumericalError,
    NumericalWarning,
    ShapeError,
    UnknownKindError,
)
from curvlib.linalg import KroneckerSum
from curvlib.plugins import load_registry
from curvlib.testing.compare import assert_close

PCG_TOL = 1e-12


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def three_layers():
    """Layers (d_a, d_g) = (3, 2) one term, (2, 3) two SPD terms, (4, 1) one term."""
    l0 = KroneckerSum([(spd(3, seed=1), spd(2, seed=2))])
    l1 = KroneckerSum([(spd(2, seed=3), spd(3, seed=4)), (spd(2, seed=5), spd(3, seed=6))])
    l2 = KroneckerSum([(spd(4, seed=7), spd(1, seed=8))])
    return FakeApproximation([l0, l1, l2])


def test_block_diagonal_tikhonov_matches_dense(registry):
    approx = three_layers()
    lam = 0.1
    inv = damped_inverse(approx, "tikhonov", value=lam, pcg_tol=PCG_TOL, registry=registry)
    assert isinstance(inv, BlockDiagonalInverse) and isinstance(inv.damping, TikhonovDamping)
    p = 6 + 6 + 4
    assert inv.shape == (p, p) and len(inv) == 3
    M = torch.block_diag(*[b.to_dense() + lam * eye(b.shape[0]) for b in approx.blocks])
    g = randn(p, seed=9)
    assert_solve_accuracy((inv @ g)[None, None], torch.linalg.solve(M, g)[None, None], M, PCG_TOL)
    G = randn(p, 3, seed=10)
    out = inv.matvec(G)
    assert out.shape == (p, 3)
    assert_solve_accuracy(out.T[:, None], torch.linalg.solve(M, G).T[:, None], M, PCG_TOL)
    assert_close(inv.to_dense(), torch.linalg.inv(M), rtol=1e-8)  # PCG-accurate (κ·tol ≈ 1e-10) block
    assert [i.method for i in inv.infos] == ["eigen", "pcg", "eigen"]


def test_layer_order_follows_the_slices(registry):
    approx = three_layers()
    # the same layers stored in a permuted order of the flat vector
    approx = FakeApproximation(approx.blocks, [slice(10, 16), slice(0, 6), slice(6, 10)])
    lam = 0.2
    inv = damped_inverse(approx, "heuristic", value=lam, registry=registry)
    g = randn(16, seed=1)
    out = inv @ g
    for block, s in zip(approx.blocks, approx.slices):
        single = damped_inverse(block, "heuristic", value=lam, registry=registry)
        assert_close(out[s], single @ g[s])


def test_single_kronecker_sum_and_single_exact_block(registry):
    A, B = spd(3, seed=1), spd(2, seed=2)
    inv = damped_inverse(KroneckerSum([(A, B)]), "tikhonov", value=0.5, registry=registry)
    M = torch.kron(A, B) + 0.5 * eye(6)
    g = randn(6, seed=3)
    assert_close(inv @ g, torch.linalg.solve(M, g))
    exact = FakeExactBlock(torch.kron(A, B), 3, 2)
    inv = damped_inverse(exact, {"kind": "tikhonov", "value": 0.5}, registry=registry)
    assert_close(inv @ g, torch.linalg.solve(M, g))


def test_a_damping_object_is_reused_with_its_state(registry):
    approx = three_layers()
    lm = LevenbergMarquardtDamping(value=1.0, omega=0.5)
    inv = damped_inverse(approx, lm, registry=registry)
    assert inv.damping is lm
    inv.damping.update(0.9)
    inv2 = damped_inverse(approx, inv.damping, previous=inv)
    assert [i.lam for i in inv2.infos] == [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match="Damping object"):
        damped_inverse(approx, lm, value=2.0)


def test_non_finite_factors_keep_previous_with_warning_or_raise(registry):
    approx = three_layers()
    prev = damped_inverse(approx, "tikhonov", value=0.1, registry=registry)
    A, B = approx.blocks[1].terms[1]
    bad_B = B.clone()
    bad_B[0, 0] = float("nan")
    layer1 = KroneckerSum([approx.blocks[1].terms[0], (A, bad_B)])
    broken = FakeApproximation([approx.blocks[0], layer1, approx.blocks[2]])
    with pytest.warns(NumericalWarning, match="non-finite.*keeping the previous inverse"):
        inv = damped_inverse(broken, "tikhonov", value=0.1, previous=prev, registry=registry)
    assert inv.blocks[1] is prev.blocks[1] and inv.blocks[0] is not prev.blocks[0]
    assert inv.kept_previous == (1,)
    assert bool(torch.isfinite(inv @ randn(16, seed=1)).all())
    with pytest.raises(NumericalError, match=r"term 1 factor B_1 \[3, 3\] has 1 non-finite"):
        damped_inverse(broken, "tikhonov", value=0.1, registry=registry)
    with pytest.raises(NumericalError):
        damped_inverse(broken, "heuristic", value=0.1, registry=registry)


@pytest.mark.parametrize("kind", ["tikhonov", "heuristic"])
def test_failed_eigendecomposition_keeps_previous(kind, monkeypatch):
    block = KroneckerSum([(spd(3, seed=1), spd(2, seed=2)), (spd(3, seed=3), spd(2, seed=4))])
    damping = TikhonovDamping(value=0.1) if kind == "tikhonov" else HeuristicDamping(value=0.1)
    previous = damping.invert(block)

    def broken_eigh(M, *args, **kwargs):
        raise torch.linalg.LinAlgError("simulated LAPACK failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken_eigh)
    with pytest.warns(NumericalWarning, match="keeping the previous inverse"):
        assert damping.invert(block, previous=previous) is previous
    with pytest.raises(NumericalError, match="float64 eigh"):
        damping.invert(block)


def test_previous_must_fit(registry):
    approx = three_layers()
    prev = damped_inverse(approx, "tikhonov", value=0.1, registry=registry)
    with pytest.raises(ShapeError, match="previous has 3 layers, approx has 1"):
        damped_inverse(approx.blocks[0], "tikhonov", value=0.1, previous=prev, registry=registry)
    with pytest.raises(ShapeError, match="previous inverse has"):
        TikhonovDamping(value=0.1).invert(approx.blocks[0], previous=prev.blocks[2])


class CountingEigh:
    def __init__(self, eigh):
        self.eigh = eigh
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.eigh(*args, **kwargs)


@pytest.mark.parametrize(
    ("damping", "rank", "expected"),
    [
        (TikhonovDamping(value=0.1), 1, 2),  # A_1, B_1
        (TikhonovDamping(value=0.1, pcg_tol=PCG_TOL), 3, 6),  # every factor, once
        (HeuristicDamping(value=0.1), 1, 0),  # PSD factors: Cholesky, no eigendecomposition
        (HeuristicDamping(value=0.1), 2, 2),  # the two whitened corrections (A, B whitened by Cholesky)
    ],
)
def test_eigendecompositions_happen_once_per_invert(damping, rank, expected, monkeypatch):
    terms = [(spd(3, seed=2 * k + 1), spd(4, seed=2 * k + 2)) for k in range(rank)]
    counter = CountingEigh(torch.linalg.eigh)
    monkeypatch.setattr(torch.linalg, "eigh", counter)
    inv = damping.invert(KroneckerSum(terms))
    assert counter.calls == expected
    for seed in range(3):
        inv.solve(randn(2, 4, 3, seed=seed))
        inv @ randn(12, seed=seed)
    assert counter.calls == expected  # solves reuse the decompositions
    damping.invert(KroneckerSum(terms))
    assert counter.calls == 2 * expected  # a refresh decomposes again


def test_pi_split_eigenbasis_is_computed_once_at_first_use(monkeypatch):
    A, B = spd(3, seed=1), spd(4, seed=2)
    counter = CountingEigh(torch.linalg.eigh)
    monkeypatch.setattr(torch.linalg, "eigh", counter)
    inv = HeuristicDamping(value=0.1).invert(KroneckerSum([(A, B)]))
    assert counter.calls == 0 and inv.info.method == "cholesky" and not inv.eigen_computed
    X = randn(2, 4, 3, seed=0)
    before = inv.solve(X)
    e = inv.eigen
    assert counter.calls == 2 and inv.eigen_computed and inv.eigen is e
    Ad, Bd = inv.damped_factors
    assert_close(e.evec_a @ torch.diag(e.eval_a) @ e.evec_a.T, Ad)
    assert_close(e.evec_b @ torch.diag(e.eval_b) @ e.evec_b.T, Bd)
    # the eigenbasis form of the same inverse, Q_b [(Q_bᵀ X Q_a) ⊘ (e_b e_aᵀ)] Q_aᵀ
    eig_form = e.evec_b @ ((e.evec_b.T @ X @ e.evec_a) / torch.outer(e.eval_b, e.eval_a)) @ e.evec_a.T
    assert_close(before, eig_form)
    assert_close(inv.solve(X), before)
    assert counter.calls == 2


def test_operand_checks(registry):
    inv = damped_inverse(three_layers(), "tikhonov", value=0.1, registry=registry)
    with pytest.raises(ShapeError, match=r"BlockDiagonalInverse.matvec: expected \[16\] or \[16, k\]"):
        inv @ randn(15, seed=1)
    with pytest.raises(DTypeDeviceError, match="float32"):
        inv @ randn(16, seed=1).float()
    with pytest.raises(ShapeError, match=r"\[\.\.\., 2, 3\]"):
        inv.blocks[0].solve(randn(3, 2, seed=1))
    with pytest.raises(NumericalError, match="right-hand side already has non-finite"):
        inv.blocks[0].solve(torch.full((2, 3), float("nan"), dtype=torch.float64))


def test_bad_approximations_and_slices(registry):
    approx = three_layers()

    def build(slices):
        return damped_inverse(FakeApproximation(approx.blocks, slices), "tikhonov", value=1.0, registry=registry)

    with pytest.raises(ShapeError, match="length 5"):
        build([slice(0, 5), slice(6, 12), slice(12, 16)])
    with pytest.raises(ShapeError, match="without overlaps"):
        build([slice(0, 6), slice(0, 6), slice(12, 16)])
    with pytest.raises(ShapeError, match="expected a block-diagonal approximation .* got object"):
        damped_inverse(object(), "tikhonov", value=1.0, registry=registry)
    with pytest.raises(ConfigError, match="expected a KroneckerFactored block"):
        TikhonovDamping(value=1.0).invert(randn(2, 2, seed=1))


def test_layers_left_out_of_the_approximation_are_zero_blocks(registry):
    # an approximation fitted on some layers only: coordinates [6, 10) belong to no layer
    approx = three_layers()
    part = FakeApproximation([approx.blocks[0], approx.blocks[1]], [slice(0, 6), slice(10, 16)], p=16)
    lam = 0.1
    for kind in ("tikhonov", "heuristic"):
        inv = damped_inverse(part, kind, value=lam, registry=registry)
        assert inv.shape == (16, 16) and inv.uncovered == 4
        g = randn(16, 2, seed=1)
        out = inv @ g
        # a zero block damped by either kind is λI ((0 + √λI)⊗(0 + √λI) for the π-split)
        assert_close(out[6:10], g[6:10] / lam)
        for block, s in zip(part.blocks, part.slices):
            assert_close(out[s], damped_inverse(block, kind, value=lam, registry=registry) @ g[s])
        dense = inv.to_dense()
        assert_close(dense[6:10, 6:10], eye(4) / lam)
        assert_close(dense @ g, out, rtol=1e-8)  # PCG-accurate middle layer for tikhonov
    with pytest.raises(ShapeError, match=r"lie in \[0, 16\)"):
        outside = FakeApproximation(part.blocks, [slice(0, 6), slice(12, 18)], p=16)
        damped_inverse(outside, "tikhonov", value=1.0, registry=registry)


def test_options_are_validated_through_the_registry(registry):
    approx = three_layers()
    for bad in ({"value": 0.0}, {"value": -1e-3}, {}, {"value": 1.0, "unknown_field": 3}):
        with pytest.raises(ConfigError):
            damped_inverse(approx, "tikhonov", registry=registry, **bad)
    with pytest.raises(ConfigError, match="value"):
        damped_inverse(approx, "heuristic", value=float("inf"), registry=registry)
    with pytest.raises(UnknownKindError, match="known kinds: 'heuristic', 'inverse_factors', 'inverse_free', 'kron_inverse', 'levenberg_marquardt', 'tikhonov'"):
        damped_inverse(approx, "tychonoff", value=1.0, registry=registry)


def test_plugins_are_registered_by_curvlib(registry):
    specs = {spec.kind: spec for spec in registry.dampings}
    assert set(specs) >= {"tikhonov", "heuristic", "levenberg_marquardt"}
    expected = {
        "tikhonov": (TikhonovDamping, TikhonovOptions),
        "heuristic": (HeuristicDamping, HeuristicOptions),
        "levenberg_marquardt": (LevenbergMarquardtDamping, LevenbergMarquardtOptions),
    }
    for kind, (factory, options) in expected.items():
        spec = specs[kind]
        assert spec.distribution == "curvlib"
        assert spec.factory is factory and spec.options is options
        assert spec.description
        damping = registry.dampings.create({"kind": kind, "value": 0.25})
        assert isinstance(damping, factory) and damping.value == 0.25


def test_default_registry_is_loaded_when_none_is_given():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = damped_inverse(three_layers(), "heuristic", value=0.1)
    assert isinstance(inv.damping, HeuristicDamping)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["tikhonov", "heuristic"])
def test_device_is_preserved_on_cuda(kind, registry):
    approx = three_layers()
    cuda = FakeApproximation([b.to(device="cuda") for b in approx.blocks], list(approx.slices))
    g = randn(16, 2, seed=1)
    opts = {"pcg_tol": PCG_TOL} if kind == "tikhonov" else {}
    ref = damped_inverse(approx, kind, value=0.1, registry=registry, **opts)
    inv = damped_inverse(cuda, kind, value=0.1, registry=registry, **opts)
    out = inv @ g.cuda()
    assert out.device.type == "cuda" and out.dtype == torch.float64
    # two PCG runs, each within κ·tol ≈ 1e-10 of the exact solve
    assert_close(out.cpu(), ref @ g, rtol=1e-8)


def test_block_diagonal_inverse_checks_the_assembled_direction_once_and_names_the_block():
    """Per-layer solves skip their own finiteness check (a host sync each); the assembled
    direction is checked once and a non-finite block is still reported, by index."""
    import torch

    from curvlib.damping import damped_inverse
    from curvlib.errors import NumericalError
    from curvlib.linalg import KroneckerSum

    A = torch.eye(3, dtype=torch.float64)
    B = torch.eye(2, dtype=torch.float64)
    inv = damped_inverse(KroneckerSum([(A, B)]), "tikhonov", value=1e-3)
    calls = []
    block = inv.blocks[0]
    real_block_check, real_check = block._check_result, inv._check_result
    block._check_result = lambda *a: (calls.append("block"), real_block_check(*a))
    inv._check_result = lambda *a: (calls.append("whole"), real_check(*a))
    v = torch.ones(6, dtype=torch.float64)
    out = inv @ v
    assert calls == ["whole"]
    assert torch.allclose(out, v / (1 + 1e-3))
    v[2] = float("nan")
    with pytest.raises(NumericalError, match=r"block\(s\) \[0\].*right-hand side"):
        inv @ v
