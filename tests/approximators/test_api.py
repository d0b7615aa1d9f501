"""``approximate``, ``BlockDiagonalApproximation``, ``approximation_error``, options and plugins."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from curvlib.approximators import BlockDiagonalApproximation, approximate, approximation_error
from curvlib.curvatures.api import curvature
from curvlib.errors import ConfigError, UnknownKindError
from curvlib.plugins import load_registry
from curvlib.testing.compare import assert_close

DT = torch.float64
KINDS = ["kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "kfac_lowrank", "kpsvd_tensor", "tnt", "exact_block"]
TIGHT = dict(power_tol=1e-12, max_iters=20000)


def _opts(kind):
    if kind == "kfac_lowrank":
        return {"rank": 3, "tol": 1e-12, "max_iters": 400}
    if kind == "kpsvd_tensor":
        return {"tol": 0.0, "max_iters": 400}
    return {} if kind in ("kfac", "tnt", "exact_block") else dict(TIGHT)


@pytest.fixture(scope="module")
def F():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(DT)
    X = torch.randn(6, 1, 4, 4, dtype=DT)
    y = torch.randint(0, 3, (6,))
    return curvature("fisher", model, nn.CrossEntropyLoss(), (X, y), generator=torch.Generator().manual_seed(0), mc_samples=2)


@pytest.mark.parametrize("kind", KINDS)
def test_matvec_equals_dense(F, kind):
    approx = approximate(F, kind, **_opts(kind))
    assert len(approx) == len(F.layers) and approx.shape == F.shape and approx.dtype == DT
    assert approx.slices == tuple(L.slice for L in F.layers)
    D = approx.to_dense()
    for i, sl in enumerate(approx.slices):  # block diagonal, blocks = the fits
        assert_close(D[sl, sl], approx[i].block.to_dense())
    assert float(D.abs().sum()) == pytest.approx(sum(float(b.to_dense().abs().sum()) for b in approx.blocks))
    V = torch.randn(F.p, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert_close(approx @ V, D @ V)
    assert_close(approx @ V[:, 0], D @ V[:, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_approximation_error_equals_dense(F, kind):
    approx = approximate(F, kind, **_opts(kind))
    errors = approximation_error(F, approx)
    assert [e.layer for e in errors] == list(range(len(F.layers)))
    for e in errors:
        M = F.block(e.layer, e.layer).to_dense()
        H = approx[e.layer].block.to_dense()
        e1 = torch.linalg.matrix_norm(M - H) / torch.linalg.matrix_norm(M)
        sm = torch.linalg.eigvalsh(M).sort(descending=True).values
        sh = torch.linalg.eigvalsh(H).sort(descending=True).values
        e2 = torch.linalg.vector_norm(sm - sh) / torch.linalg.vector_norm(sm)
        assert e.name == F.layers[e.layer].name
        if kind == "exact_block":
            # ‖F − F̂‖² = ‖F‖² − 2⟨F, F̂⟩ + ‖F̂‖² cancels to rounding: error 1 is exact to ~√eps only
            assert e.error1 <= 1e-7 and float(e1) == 0.0
            assert e.error2 <= 1e-12
        else:
            assert e.error1 == pytest.approx(float(e1), rel=1e-8)
            assert e.error2 == pytest.approx(float(e2), rel=1e-8)
    assert all(math.isnan(e.error2) for e in approximation_error(F, approx, error2=False))


def test_layers_subset_and_names(F):
    name = F.layers[1].name
    approx = approximate(F, "kpsvd", layers=[name, 2])
    assert approx.layer_indices == (1, 2) and len(approx) == 2 and 0 not in approx
    with pytest.raises(IndexError, match="fitted layers"):
        approx[0]
    v = torch.randn(F.p, dtype=DT)
    out = approx @ v
    assert torch.equal(out[F.layers[0].slice], torch.zeros(F.layers[0].p_i, dtype=DT))
    assert_close(out[F.layers[1].slice], approx[1].block.matvec(v[F.layers[1].slice]))
    assert [e.layer for e in approximation_error(F, approx, error2=False)] == [1, 2]
    with pytest.raises(ConfigError, match="layer name"):
        approximate(F, "kfac", layers=["nope"])


def test_previous_continues_and_is_checked(F):
    first = approximate(F, "deflation", **TIGHT)
    second = approximate(F, "deflation", previous=first, ema=0.9, **TIGHT)
    assert all(f.refresh == 2 for f in second)
    assert all(f.info.iterations < g.info.iterations for f, g in zip(second, first))  # warm start
    with pytest.raises(ConfigError, match="deflation"):
        approximate(F, "kpsvd", previous=first)
    with pytest.raises(ConfigError, match="layers"):
        approximate(F, "deflation", previous=first, layers=[0])


def test_state_dict_round_trip(F):
    approx = approximate(F, "kfac_corrected", **TIGHT)
    buf = io.BytesIO()
    torch.save(approx.state_dict(), buf)
    buf.seek(0)
    back = BlockDiagonalApproximation.from_state_dict(torch.load(buf))
    v = torch.randn(F.p, dtype=DT)
    assert torch.equal(back @ v, approx @ v)
    assert back.names == approx.names and back.slices == approx.slices


@pytest.mark.parametrize("kind", ["kfac", "kfac_corrected", "deflation"])
def test_as_restored_is_the_round_trip_layout_without_its_copies(F, kind):
    """as_restored() = from_state_dict(state_dict()): the same values, strides, offsets and
    storage sizes (what BLAS rounding depends on), info and state; one-term fits whose factors
    own their storage keep their tensors (no copy), the others are stacked as a load stacks them."""
    approx = approximate(F, kind, **(TIGHT if kind != "kfac" else {}))
    fast, slow = approx.as_restored(), BlockDiagonalApproximation.from_state_dict(approx.state_dict())
    assert fast.names == slow.names and fast.slices == slow.slices and fast.kind == slow.kind
    for f, s, orig in zip(fast.fits, slow.fits, approx.fits):
        assert f.info == s.info and f.state.keys() == s.state.keys()
        for pair_f, pair_s, pair_o in zip(f.terms, s.terms, orig.terms):
            for M_f, M_s, M_o in zip(pair_f, pair_s, pair_o):
                assert torch.equal(M_f, M_s)
                assert (M_f.stride(), M_f.storage_offset(), M_f.untyped_storage().nbytes()) == (
                    M_s.stride(), M_s.storage_offset(), M_s.untyped_storage().nbytes())
                assert (M_f is M_o) == (len(orig.terms) == 1)  # kept, or stacked like a load
    v = torch.randn(F.p, dtype=DT)
    assert torch.equal(fast @ v, slow @ v)
    # a factor that is a view into a larger storage takes the round trip
    A, B = approx.fits[0].terms[0]
    big = torch.zeros(2, *A.shape, dtype=A.dtype)
    big[1] = A
    from curvlib.approximators.base import LayerFit
    from curvlib.linalg import KroneckerSum
    view = LayerFit(KroneckerSum([(big[1], B)]), approx.fits[0].info, dict(approx.fits[0].state))
    restored = view.as_restored()
    assert restored.terms[0][0].storage_offset() == 0 and torch.equal(restored.terms[0][0], A)


def test_float32_is_preserved():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    X = torch.randn(8, 4)
    F32 = curvature("fisher", model, nn.CrossEntropyLoss(), (X, torch.randint(0, 3, (8,))), generator=torch.Generator().manual_seed(0))
    for kind in KINDS:
        approx = approximate(F32, kind)
        assert approx.dtype == torch.float32, kind
        assert (approx @ torch.randn(F32.p)).dtype == torch.float32


# --------------------------------------------------------------------------- options and plugins


@pytest.mark.parametrize(
    "kind,options,field",
    [
        ("deflation", {"rank": 0}, "rank"),
        ("lanczos", {"rank": 0}, "rank"),
        ("kpsvd", {"power_tol": -1e-6}, "power_tol"),
        ("kpsvd", {"max_iters": 0}, "max_iters"),
        ("kpsvd", {"rank": 2}, "rank"),  # kpsvd has Kronecker rank 1: unknown field
        ("deflation", {"powertol": 1e-6}, "powertol"),
        ("kfac", {"ema": 1.5}, "ema"),
        ("kfac", {"power_tol": 1e-6}, "power_tol"),
        ("deflation", {"ema_mode": "both"}, "ema_mode"),
        ("deflation", {"band_radius": -1}, "band_radius"),
        ("deflation", {"band_radius": "everything"}, "band_radius"),
        ("lanczos", {"rank": 3, "krylov_dim": 3}, "krylov_dim"),
        ("exact_block", {"dense_max": -5}, "dense_max"),
        ("exact_block", {"ema": 0.9}, "ema"),
    ],
)
def test_options_reject_bad_input(kind, options, field):
    with pytest.raises(ConfigError, match=field):
        load_registry().approximators.resolve({"kind": kind, **options})


def test_options_accept_documented_values():
    reg = load_registry()
    _, opts = reg.approximators.resolve({"kind": "deflation", "band_radius": None, "rank": 3, "ema": 0.95, "ema_mode": "fisher"})
    assert opts.band_radius is None and opts.rank == 3
    assert reg.approximators.resolve({"kind": "lanczos"})[1].rank == 2
    assert reg.approximators.resolve({"kind": "kpsvd"})[1].band_radius == "kernel"


def test_unknown_kind_lists_known(F):
    with pytest.raises(UnknownKindError, match="kpsvd"):
        approximate(F, "kpsvdd")


def test_plugins_are_registered_by_curvlib():
    reg = load_registry(external=False)
    for kind in KINDS:
        spec = reg.approximators.get(kind)
        assert spec.distribution == "curvlib"
        assert spec.description
        approximator = spec.factory(spec.make_options())
        assert approximator.kind == kind
