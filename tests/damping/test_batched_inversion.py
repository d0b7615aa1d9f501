"""Batched inversion across layers (issue 11, item 5): ``cholesky_inverses`` and
``HeuristicDamping.invert_many`` give what the per-layer path gives, fallbacks included.

The per-layer references are ``torch.cholesky_inverse(torch.linalg.cholesky(M))`` per matrix,
``HeuristicDamping.invert`` per block, and dense float64 inverses.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from damping_reference import F64, FakeApproximation, dense_solve, randn, spd, symmetric_indefinite
from hypothesis import given
from hypothesis import strategies as st

from curvlib.damping import HeuristicDamping, PiSplitInverse, TwoTermHeuristicInverse, damped_inverse
from curvlib.damping.base import Damping
from curvlib.errors import CurvlibError, NumericalError, NumericalWarning
from curvlib.linalg import KroneckerSum, cholesky_inverses
from curvlib.testing.compare import assert_close
from curvlib.testing.strategies import seeds


def _layers(shapes, seed, dtype=F64):
    """One-term Kronecker blocks with SPD factors of the given (d_a, d_g) shapes."""
    return [KroneckerSum([(spd(a, seed + 2 * i).to(dtype), spd(g, seed + 2 * i + 1).to(dtype))])
            for i, (a, g) in enumerate(shapes)]


@given(sizes=st.lists(st.sampled_from([1, 2, 3, 5]), min_size=1, max_size=7), seed=seeds,
       batch=st.sampled_from([None, True, False]))
def test_cholesky_inverses_equal_the_per_matrix_routine(sizes, seed, batch):
    mats = [spd(n, seed + i) for i, n in enumerate(sizes)]
    mats += [m.float() for m in mats[:2]]  # a second dtype: its own groups
    out = cholesky_inverses(mats, batch=batch)
    for M, inv in zip(mats, out):
        # the same LAPACK routine on the same matrix; a matrix inside a batch is not aligned as
        # one alone is, and BLAS may round its last bits differently
        assert_close(inv, torch.cholesky_inverse(torch.linalg.cholesky(M)))
        # exactly symmetric, and row-major (a row-aligned copy reads it in order)
        assert torch.equal(inv, inv.mT) and inv.stride(-1) == 1 and inv.stride(-2) == M.shape[0]
        if M.dtype == F64:
            assert_close(inv, torch.linalg.inv(M))


@pytest.mark.parametrize("batch", [None, True, False])
def test_cholesky_inverses_marks_the_matrices_that_are_not_positive_definite(batch):
    good, bad = spd(4, 0), symmetric_indefinite(4, 1)
    out = cholesky_inverses([good, bad, spd(4, 2), torch.zeros(4, 4, dtype=F64), spd(3, 3)], batch=batch)
    assert out[1] is None and out[3] is None
    assert_close(out[0], torch.linalg.inv(good))
    assert_close(out[2], torch.linalg.inv(spd(4, 2)))
    assert_close(out[4], torch.linalg.inv(spd(3, 3)))
    assert cholesky_inverses([]) == []


def test_cholesky_inverses_factor_alone_on_the_cpu_and_together_when_asked():
    """CPU default: each inverse owns its storage (no stacked batch); batch=True: the inverses
    of one shape are views into one batch."""
    mats = [spd(4, 0), spd(4, 1), spd(3, 2)]
    alone = cholesky_inverses(mats)
    together = cholesky_inverses(mats, batch=True)
    assert all(inv.untyped_storage().nbytes() == inv.numel() * inv.element_size() for inv in alone)
    assert together[0].untyped_storage().data_ptr() == together[1].untyped_storage().data_ptr()
    for a, b in zip(alone, together):
        assert_close(a, b)


# the full MNIST auto-encoder's widths, shrunk: three pairs of equal (d_a, d_g) and two singles
AE_LIKE = [(9, 10), (11, 5), (6, 3), (4, 2), (3, 3), (4, 5), (6, 10), (11, 8)]


def _per_block(damping, blocks, previous):
    return [damping.invert(b, previous=p) for b, p in zip(blocks, previous)]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_invert_many_equals_invert_block_by_block(dtype):
    blocks = _layers(AE_LIKE, seed=3, dtype=dtype)
    damping = HeuristicDamping(value=0.05)
    batched = damping.invert_many(blocks, [None] * len(blocks))
    alone = _per_block(damping, blocks, [None] * len(blocks))
    X = [randn(2, b.b_dim, b.a_dim, seed=7 + i, dtype=dtype) for i, b in enumerate(blocks)]
    for inv, ref, x in zip(batched, alone, X):
        assert isinstance(inv, PiSplitInverse) and inv.info == ref.info
        for mine, theirs in zip(inv.damped_factors, ref.damped_factors):
            assert torch.equal(mine, theirs)  # the π-split itself is elementwise: the same bits
        assert_close(inv.solve(x), ref.solve(x))  # same routine; the batch's alignment may move the last bits
        assert_close(inv.condition_numbers(), ref.condition_numbers())


@given(seed=seeds, lam=st.floats(1e-3, 10.0))
def test_invert_many_is_the_dense_pi_split_inverse(seed, lam):
    blocks = _layers(AE_LIKE[:5], seed=seed)
    for inv, block in zip(HeuristicDamping(value=lam).invert_many(blocks, [None] * 5), blocks):
        A, B = block.terms[0]
        pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(B) / B.shape[0]))
        r = math.sqrt(lam)
        M = torch.kron(A + pi * r * torch.eye(A.shape[0], dtype=F64), B + r / pi * torch.eye(B.shape[0], dtype=F64))
        X = randn(3, B.shape[0], A.shape[0], seed=seed + 1)
        assert_close(inv.solve(X), dense_solve(M, X))


def test_invert_many_takes_each_fallback_per_block():
    """A sign-flipped block, a factor that fails Cholesky, a two-term block, a non-finite block
    with and without a previous inverse: each as invert() treats it, the others still batched."""
    damping = HeuristicDamping(value=0.1)
    healthy = _layers([(4, 3), (4, 3), (4, 3)], seed=11)
    A, B = healthy[1].terms[0]
    flipped = KroneckerSum([(-A, -B)])
    indefinite = KroneckerSum([(symmetric_indefinite(4, 5) * 10, spd(3, 6))])
    two_term = KroneckerSum([(spd(4, 7), spd(3, 8)), (spd(4, 9), spd(3, 10))])
    nan_A = A.clone()
    nan_A[0, 1] = float("nan")
    broken = KroneckerSum([(nan_A, B)])
    previous = damping.invert(healthy[2])
    blocks = [healthy[0], flipped, indefinite, two_term, broken, healthy[2]]
    prevs = [None, None, None, None, previous, None]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = damping.invert_many(blocks, prevs)
    with warnings.catch_warnings(record=True) as caught_alone:
        warnings.simplefilter("always")
        alone = _per_block(damping, blocks, prevs)
    assert [str(w.message) for w in caught] == [str(w.message) for w in caught_alone]
    assert any("keeping the previous inverse" in str(w.message) for w in caught)
    assert got[4] is previous
    assert isinstance(got[3], TwoTermHeuristicInverse)
    assert got[2].info.method == "eigen" and got[2].info.n_clamped > 0
    X = randn(2, 3, 4, seed=12)
    for mine, theirs in zip(got, alone):
        assert mine.info == theirs.info
        assert_close(mine.solve(X), theirs.solve(X))
    # the flipped block is the healthy one: A⊗B = (−A)⊗(−B)
    assert_close(got[1].solve(X), damping.invert(healthy[1]).solve(X))
    with pytest.raises(NumericalError, match="non-finite"):
        damping.invert_many([healthy[0], broken], [None, None])


def test_damped_inverse_goes_through_invert_many_with_the_same_result():
    blocks = _layers(AE_LIKE, seed=21)
    approx = FakeApproximation(blocks)
    calls = []

    class Counting(HeuristicDamping):
        def invert_many(self, blocks, previous):
            calls.append(len(blocks))
            return super().invert_many(blocks, previous)

    inv = damped_inverse(approx, Counting(value=0.02))
    assert calls == [len(blocks)]
    per_block = Damping.invert_many(HeuristicDamping(value=0.02), blocks, [None] * len(blocks))  # the base's loop
    for mine, theirs in zip(inv.blocks, per_block):
        X = randn(1, theirs.b_dim, theirs.a_dim, seed=23)
        assert_close(mine.solve(X), theirs.solve(X))


def test_a_batched_inverse_travels_with_its_own_entries_only():
    blocks = _layers([(5, 4), (5, 4)], seed=31)
    inv = HeuristicDamping(value=0.1).invert_many(blocks, [None, None])[0]
    A_inv = inv._A_inv
    # a view into a larger storage: the batch, or rows padded to cache lines (linalg.row_aligned)
    assert A_inv.untyped_storage().nbytes() > A_inv.numel() * A_inv.element_size()
    sent = inv.for_transfer()
    assert sent._A_inv.untyped_storage().nbytes() == A_inv.numel() * A_inv.element_size()
    assert torch.equal(sent._A_inv, A_inv)
    sent.after_transfer(blocks[0])
    X = randn(2, 4, 5, seed=32)
    assert torch.equal(sent.solve(X), inv.solve(X))


def test_invert_many_checks_its_arguments():
    blocks = _layers([(3, 2)], seed=41)
    with pytest.raises(Exception, match="1 blocks, 2 previous"):
        HeuristicDamping(value=0.1).invert_many(blocks, [None, None])
    with pytest.raises(Exception, match="previous inverse has"):
        other = HeuristicDamping(value=0.1).invert(_layers([(2, 2)], seed=42)[0])
        HeuristicDamping(value=0.1).invert_many(blocks * 2, [other, None])


@pytest.mark.cuda
def test_invert_many_on_cuda_equals_the_per_block_path_with_fewer_host_synchronisations():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    blocks = [KroneckerSum([(A.cuda(), B.cuda()) for A, B in b.terms]) for b in _layers(AE_LIKE, seed=51)]
    damping = HeuristicDamping(value=0.05)

    def syncs(fn):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return out, sum("synchroniz" in str(w.message) for w in caught)

    batched, n_batched = syncs(lambda: damping.invert_many(blocks, [None] * len(blocks)))
    alone, n_alone = syncs(lambda: _per_block(damping, blocks, [None] * len(blocks)))
    # two reads of every layer's scalars (traces, screen, Cholesky status) against several per
    # layer; a routine that checks its own status on the host (cholesky_inverse) adds one per group
    assert n_batched < n_alone / 2, (n_batched, n_alone)
    for inv, ref in zip(batched, alone):
        X = torch.randn(2, inv.b_dim, inv.a_dim, dtype=F64, device="cuda")
        assert inv.solve(X).device.type == "cuda"
        assert_close(inv.solve(X), ref.solve(X), rtol=1e-10, atol=0)


def test_an_invert_many_that_returns_the_wrong_count_is_refused():
    class Short(HeuristicDamping):
        def invert_many(self, blocks, previous):
            return super().invert_many(blocks, previous)[:-1]

    approx = FakeApproximation(_layers(AE_LIKE[:3], seed=61))
    with pytest.raises(CurvlibError, match="invert_many returned 2 inverses for 3 blocks"):
        damped_inverse(approx, Short(value=0.1))


def test_cholesky_inverses_alone_differentiates_and_reuses_one_scratch():
    """The CPU path writes every Cholesky factor into one scratch buffer (out=, which autograd
    refuses): a matrix that requires a gradient takes the plain call, and the inverses of
    several sizes in one call are each correct (the scratch is reused, never returned)."""
    M = spd(3, 7).requires_grad_()
    inv = cholesky_inverses([M])[0]
    (grad,) = torch.autograd.grad(inv.sum(), M)
    assert torch.isfinite(grad).all()
    mats = [spd(n, 20 + n) for n in (5, 2, 4, 5, 1)]
    for M_, inv_ in zip(mats, cholesky_inverses(mats)):
        assert_close(inv_, torch.linalg.inv(M_))
        assert inv_.untyped_storage().nbytes() == inv_.numel() * inv_.element_size()
