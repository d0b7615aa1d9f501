"""EKFAC against dense float64 references built another way (curvlib.testing.references):
the exact block F_ii by explicit loops, the KFAC factors by explicit sums, Kronecker
products with torch.kron, solves with torch.linalg."""

from __future__ import annotations


import io
import warnings

import pytest
import torch
from ekfac_support import require_installed
from hypothesis import given, settings
from hypothesis import strategies as st

require_installed()

from curvlib.approximators import LayerFit  # noqa: E402
from curvlib.curvatures.statistics import LayerStatistics  # noqa: E402
from curvlib.damping import HeuristicDamping, TikhonovDamping, damped_inverse  # noqa: E402
from curvlib.errors import ConfigError, DTypeDeviceError, NumericalWarning, ShapeError  # noqa: E402
from curvlib.testing import assert_close  # noqa: E402
from curvlib.testing import references as ref  # noqa: E402
from curvlib.testing.strategies import layer_statistics, seeds  # noqa: E402
from curvlib_ekfac import EKFACApproximator, EKFACBlock, EKFACOptions, ekfac_scalings  # noqa: E402

F64 = torch.float64
STATS = st.sampled_from(["linear", "conv"]).flatmap(lambda kind: layer_statistics(kind, max_m=4, max_c=2, max_dim=4))
few = settings(max_examples=8)


def fit(stats, previous=None, **options):
    return EKFACApproximator(EKFACOptions(**options)).fit(stats, previous=previous)


def basis(block: EKFACBlock) -> torch.Tensor:
    """U = Q_A ⊗ Q_G ``[p, p]`` with torch.kron: column i + d_g·j is q_A,j ⊗ q_G,i."""
    return torch.kron(block.evec_a, block.evec_g)


def redraw(stats, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(stats.a.shape, generator=g, dtype=F64)
    if stats.has_bias:
        a[..., -1] = 1.0
    return stats.replace(a=a, g=torch.randn(stats.g.shape, generator=g, dtype=F64))


@few
@given(stats=STATS)
def test_basis_is_the_kfac_eigenbasis(stats):
    """Q_A, Q_G are orthogonal and diagonalize the KFAC factors of (3.19)/(3.29) summed by hand."""
    block = fit(stats).block
    (A, G), = ref.dense_kfac_factors(stats)
    for Q, M, name in ((block.evec_a, A, "A"), (block.evec_g, G, "G")):
        eye = torch.eye(Q.shape[0], dtype=F64)
        assert_close(Q.T @ Q, eye, msg=f"Q_{name} orthonormal")
        R = Q.T @ M @ Q
        assert_close(R - torch.diag(torch.diagonal(R)), torch.zeros_like(R), atol=1e-12 * float(M.abs().max()),
                     msg=f"Q_{name}ᵀ {name} Q_{name} diagonal")


@few
@given(stats=STATS)
def test_scalings_are_the_diagonal_of_the_dense_block_in_the_kfac_basis(stats):
    """vec(S) = diag(Uᵀ F_ii U), F_ii from the statistics by explicit loops (3.18), (3.28)."""
    block = fit(stats).block
    U = basis(block)
    F = ref.dense_block(stats)
    assert_close(ref.vec(block.scalings), torch.diagonal(U.T @ F @ U))
    assert_close(block.to_dense(), U @ torch.diag(ref.vec(block.scalings)) @ U.T)


@few
@given(stats=STATS)
def test_frobenius_error_is_at_most_kfacs(stats):
    """‖F − F_EKFAC‖_F ≤ ‖F − A⊗G‖_F: the re-fitted diagonal is the best one in KFAC's basis."""
    F = ref.dense_block(stats)
    (A, G), = ref.dense_kfac_factors(stats)
    err_ekfac = torch.linalg.matrix_norm(F - fit(stats).block.to_dense())
    err_kfac = torch.linalg.matrix_norm(F - torch.kron(A, G))
    assert err_ekfac <= err_kfac * (1 + 1e-10) + 1e-12 * torch.linalg.matrix_norm(F), (float(err_ekfac), float(err_kfac))


def test_ekfac_improves_on_kfac_where_kfac_is_inexact():
    """A block that is not a Kronecker product (many samples): EKFAC is strictly closer."""
    g = torch.Generator().manual_seed(3)
    stats = LayerStatistics(a=torch.randn(20, 4, generator=g, dtype=F64), g=torch.randn(20, 1, 3, generator=g, dtype=F64),
                            scale=1 / 20)
    F = ref.dense_block(stats)
    (A, G), = ref.dense_kfac_factors(stats)
    err_ekfac = float(torch.linalg.matrix_norm(F - fit(stats).block.to_dense()))
    err_kfac = float(torch.linalg.matrix_norm(F - torch.kron(A, G)))
    assert err_ekfac < 0.95 * err_kfac, (err_ekfac, err_kfac)


@few
@given(stats=layer_statistics("conv", max_m=4, max_c=2, max_dim=3))
def test_conv_chunks_do_not_change_the_scalings(stats):
    """The chunked conv path (one sample per chunk) equals one chunk."""
    block = fit(stats).block
    S_small = ekfac_scalings(stats, block.evec_a, block.evec_g, max_chunk_entries=1)
    assert_close(S_small, block.scalings)


@few
@given(stats=STATS, seed=seeds, gamma=st.sampled_from([0.3, 0.95]))
def test_ema_projects_the_previous_fit_onto_the_new_basis(stats, seed, gamma):
    """At refresh k = 2 (ρ = min(1/2, γ)): A, G are averaged like KFAC's, U is their eigenbasis
    and S = diag(Uᵀ(ρ F̂_prev + (1 − ρ) F_batch) U) with dense F̂_prev and F_batch."""
    first = fit(stats, ema=gamma)
    nxt = redraw(stats, seed)
    second = fit(nxt, previous=first, ema=gamma)
    rho = min(0.5, gamma)
    assert second.info.rho == rho and second.refresh == 2
    (A1, G1), = ref.dense_kfac_factors(stats)
    (A2, G2), = ref.dense_kfac_factors(nxt)
    assert_close(second.state["A"], rho * A1 + (1 - rho) * A2)
    assert_close(second.state["G"], rho * G1 + (1 - rho) * G2)
    U = basis(second.block)
    target = rho * first.block.to_dense() + (1 - rho) * ref.dense_block(nxt)
    assert_close(ref.vec(second.block.scalings), torch.diagonal(U.T @ target @ U))


def test_without_ema_each_batch_stands_alone():
    g = torch.Generator().manual_seed(0)
    s1 = LayerStatistics(a=torch.randn(5, 3, generator=g, dtype=F64), g=torch.randn(5, 2, 2, generator=g, dtype=F64), scale=0.1)
    s2 = redraw(s1, 1)
    assert torch.equal(fit(s2, previous=fit(s1)).block.to_dense(), fit(s2).block.to_dense())


# -- the damped inverse -------------------------------------------------------------------------
@few
@given(stats=STATS, lam=st.floats(1e-4, 10.0), seed=seeds)
def test_tikhonov_solve_is_the_dense_solve(stats, lam, seed):
    """Q_G[(Q_Gᵀ X Q_A) ⊘ (S + λ)]Q_Aᵀ = MAT((F_EKFAC + λI)⁻¹ vec(X)), for one X and a batch."""
    block = fit(stats).block
    X = torch.randn(2, block.b_dim, block.a_dim, generator=torch.Generator().manual_seed(seed), dtype=F64)
    expected = ref.dense_tikhonov_solve(block.to_dense(), X, lam)
    assert_close(block.tikhonov_solve(X, lam), expected)
    assert_close(block.tikhonov_solve(X[0], lam), expected[0])


def test_tikhonov_damping_delegates_to_the_block():
    """curvlib's ``tikhonov`` treats the block as exact-like (no ``terms``) and calls tikhonov_solve."""
    g = torch.Generator().manual_seed(1)
    stats = LayerStatistics(a=torch.randn(6, 4, generator=g, dtype=F64), g=torch.randn(6, 1, 3, generator=g, dtype=F64), scale=1 / 6)
    block = fit(stats).block
    assert getattr(block, "terms", None) is None
    inv = TikhonovDamping(value=0.05).invert(block)
    assert inv.info.method == "exact_block"
    v = torch.randn(block.p, 3, generator=g, dtype=F64)
    expected = torch.linalg.solve(block.to_dense() + 0.05 * torch.eye(block.p, dtype=F64), v)
    assert_close(inv.matvec(v), expected)
    assert_close(damped_inverse(block, "tikhonov", value=0.05) @ v[:, 0], expected[:, 0])
    with pytest.raises(ConfigError, match="tikhonov"):
        HeuristicDamping(value=0.05).invert(block)  # the π-split needs Kronecker factors


# -- the block's interface ---------------------------------------------------------------------
def _small_block(dtype=F64) -> EKFACBlock:
    g = torch.Generator().manual_seed(2)
    stats = LayerStatistics(a=torch.randn(4, 3, generator=g, dtype=F64).to(dtype),
                            g=torch.randn(4, 1, 2, generator=g, dtype=F64).to(dtype), scale=0.25)
    return fit(stats).block


def test_block_checks_its_inputs():
    block = _small_block()
    with pytest.raises(ShapeError, match=r"\[d_g, d_a\]"):
        EKFACBlock(block.evec_a, block.evec_g, block.scalings.T)
    with pytest.raises(DTypeDeviceError, match="float32"):
        EKFACBlock(block.evec_a, block.evec_g.float(), block.scalings)
    with pytest.raises(ShapeError, match=r"\[\.\.\., 2, 3\]"):
        block.apply(torch.zeros(3, 2, dtype=F64))
    with pytest.raises(DTypeDeviceError, match="float32"):
        block.matvec(torch.zeros(block.p, dtype=torch.float32))
    with pytest.raises(ShapeError, match=r"\[6\] or \[6, k\]"):
        block.matvec(torch.zeros(5, dtype=F64))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="λ"):
            block.tikhonov_solve(torch.zeros(2, 3, dtype=F64), bad)


def test_block_trace_norm_and_conversion():
    block = _small_block()
    D = block.to_dense()
    assert_close(block.trace(), torch.trace(D))
    assert_close(block.frobenius_norm(), torch.linalg.matrix_norm(D))
    low = block.to(torch.float32)
    assert low.dtype == torch.float32 and low.to_dense().dtype == torch.float32
    assert_close(low.to_dense(), D, dtype=torch.float32)


def test_block_state_dict_round_trips_through_torch_load():
    block = _small_block()
    buf = io.BytesIO()
    torch.save(block.state_dict(), buf)
    buf.seek(0)
    back = EKFACBlock.from_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(back.to_dense(), block.to_dense())
    with pytest.raises(ConfigError, match="evec_g"):
        EKFACBlock.from_state_dict({"evec_a": block.evec_a, "scalings": block.scalings})


def test_float32_statistics_give_a_float32_fit():
    block = _small_block(torch.float32)
    assert block.dtype == block.scalings.dtype == torch.float32
    X = torch.randn(block.b_dim, block.a_dim)
    assert block.tikhonov_solve(X, 0.1).dtype == torch.float32


def test_zero_activations_rows_are_decomposed_with_the_float64_retry_if_needed():
    """Dead units (exactly-zero rows of A, DESIGN.md §10): a finite, PSD fit in float32."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(8, 6, generator=g)
    a[:, :4] = 0.0
    stats = LayerStatistics(a=a, g=torch.randn(8, 1, 3, generator=g), scale=1 / 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)  # the documented float64 retry may warn
        block = fit(stats).block
    assert bool(torch.isfinite(block.scalings).all()) and bool((block.scalings >= 0).all())


def test_layerfit_carries_the_factors_for_the_next_refresh():
    g = torch.Generator().manual_seed(5)
    stats = LayerStatistics(a=torch.randn(4, 3, generator=g, dtype=F64), g=torch.randn(4, 2, 2, generator=g, dtype=F64), scale=1 / 8)
    out = fit(stats)
    assert isinstance(out, LayerFit) and out.info.method == "ekfac" and out.refresh == 1
    (A, G), = ref.dense_kfac_factors(stats)
    assert_close(out.state["A"], A)
    assert_close(out.state["G"], G)
