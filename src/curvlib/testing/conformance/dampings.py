"""Conformance checks of a damping (family ``dampings``): its inverse of Kronecker-sum and
exact blocks against a dense solve of the author's :meth:`~DampingConformance.dense_reference`,
dtype/device, and non-finite factors."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.approximators.exact import ExactBlock
from curvlib.damping import BlockInverse, Damping, damped_inverse
from curvlib.errors import ConfigError, NotPSDError, NumericalError, NumericalWarning
from curvlib.linalg import KroneckerSum
from curvlib.testing import references as ref
from curvlib.testing.compare import assert_close, default_tolerances
from curvlib.testing.conformance._common import DEVICES, _DTYPES, _expect, _NoPerformanceWarnings, _random
from curvlib.testing.conformance._kind import _KindConformance
from curvlib.testing.strategies import layer_statistics, seeds, spd_matrices

_BLOCK_TYPES = ("kronecker_1", "kronecker_2", "exact")


@st.composite
def _damping_blocks(draw, block_type: str, max_dim: int, dtype: torch.dtype = torch.float64, device: Any = None):
    """A block of ``block_type``: ``kronecker_1`` (A⊗B, A, B SPD), ``kronecker_2`` (A⊗B + C⊗D,
    C, D PSD: a definite sum), ``exact`` (an ExactBlock of Linear statistics)."""
    if block_type == "exact":
        stats = draw(layer_statistics("linear", max_m=3, max_c=2, max_dim=max_dim, dtype=dtype, device=device))
        return ExactBlock(stats)
    d_a = draw(st.integers(1, max_dim))
    d_g = draw(st.integers(1, max_dim))
    A, B = draw(spd_matrices(d_a)), draw(spd_matrices(d_g))
    terms = [(A, B)]
    if block_type == "kronecker_2":
        g = torch.Generator().manual_seed(draw(seeds))
        X = torch.randn(d_a, d_a, generator=g, dtype=torch.float64)
        Y = torch.randn(d_g, d_g, generator=g, dtype=torch.float64)
        terms.append((0.3 * X @ X.T / d_a, 0.3 * Y @ Y.T / d_g))
    elif block_type != "kronecker_1":
        raise ValueError(f"unknown block type {block_type!r}; expected one of {_BLOCK_TYPES}")
    return KroneckerSum([(P.to(dtype=dtype, device=device), Q.to(dtype=dtype, device=device)) for P, Q in terms])


class DampingConformance(_KindConformance):
    """Checks of a damping (family ``dampings``).

    The subclass implements :meth:`dense_reference` — the dense matrix M ``[p, p]`` whose
    inverse the damping documents (e.g. ``tikhonov``: Σ_k A_k⊗B_k + λI) — and sets:

    - ``options``: the kind's options (with its λ, ``value``);
    - ``block_types``: blocks the kind inverts — ``"kronecker_1"`` (one term A⊗B),
      ``"kronecker_2"`` (two terms, a definite sum), ``"exact"`` (an exact block with
      ``tikhonov_solve``);
    - ``unsupported_block_types``: blocks it must refuse with a ConfigError;
    - ``rtol``: tolerance of the comparison (default: the dtype's; an iterative inverse
      sets its solver tolerance times the condition number);
    - ``max_dim``: the largest factor size drawn.
    """

    family: ClassVar[str] = "dampings"
    options: ClassVar[Mapping[str, Any]] = {"value": 0.1}
    block_types: ClassVar[tuple[str, ...]] = _BLOCK_TYPES
    unsupported_block_types: ClassVar[tuple[str, ...]] = ()
    rtol: ClassVar[float | None] = None
    max_dim: ClassVar[int] = 4

    def dense_reference(self, block: Any, options: Any) -> torch.Tensor:
        """The dense float64 matrix M ``[p, p]`` whose inverse this damping applies to ``block``
        (``block``: a KroneckerSum or an ExactBlock; ``options``: the validated options model).
        Build it from the block's factors or ``to_dense()`` with ``torch.kron``, not with the
        code under test."""
        raise NotImplementedError(
            f"{type(self).__name__}: implement dense_reference(block, options) returning the dense matrix whose "
            "inverse the damping documents"
        )

    def damping(self, **overrides: Any) -> Any:
        """The damping object the registry builds."""
        return self.create(**overrides)

    def blocks(self, block_type: str, *, dtype: torch.dtype = torch.float64, device: Any = None) -> st.SearchStrategy:
        """The strategy of blocks of ``block_type`` the checks invert."""
        return _damping_blocks(block_type, self.max_dim, dtype, device)

    # -- checks --------------------------------------------------------------------------
    def test_factory_builds_a_damping(self) -> None:
        """The registered factory builds a :class:`curvlib.damping.Damping` (what
        ``damped_inverse`` and the preconditioner require)."""
        obj = self.damping()
        _expect(isinstance(obj, Damping), f"expected the factory of {self.kind!r} to build a curvlib.damping.Damping, got {obj!r}")

    def test_inverse_matches_dense_reference(self) -> None:
        """For every supported block type: ``invert(block)`` applied to vectors and matrices,
        and ``damped_inverse(block, damping)``, equal ``torch.linalg.solve(dense_reference, ·)``."""
        for block_type in self.block_types:

            @self.hypothesis_settings()
            @given(block=self.blocks(block_type), seed=seeds)
            def check(block, seed):
                damping = self.damping()
                where = f"{self.kind} on a {block_type} block"
                with _NoPerformanceWarnings():
                    inv = damping.invert(block)
                    M = self.dense_reference(block, damping.options).to(torch.float64)
                _expect(isinstance(inv, BlockInverse), f"{where}: expected invert() to return a BlockInverse, got {inv!r}")
                p = int(block.a_dim) * int(block.b_dim)
                _expect(tuple(inv.shape) == (p, p), f"{where}: expected inverse shape {(p, p)}, got {tuple(inv.shape)}")
                V = _random((p, 3), seed, M)
                expected = torch.linalg.solve(M, V)
                assert_close(inv.matvec(V), expected, rtol=self.rtol,
                             msg=f"{where}: expected invert(block).matvec(V) == solve(dense_reference, V)")
                X = ref.unvec(V.T, int(block.b_dim), int(block.a_dim))
                assert_close(inv.solve(X), ref.unvec(expected.T, int(block.b_dim), int(block.a_dim)), rtol=self.rtol,
                             msg=f"{where}: expected invert(block).solve(X [k, d_g, d_a]) == MAT(solve(dense_reference, vec(X)))")
                with _NoPerformanceWarnings():
                    whole = damped_inverse(block, damping)
                assert_close(whole @ V[:, 0], expected[:, 0], rtol=self.rtol,
                             msg=f"{where}: expected damped_inverse(block, damping) @ v == solve(dense_reference, v)")

            check()

    def test_unsupported_blocks_raise_config_error(self) -> None:
        """Blocks in ``unsupported_block_types`` are refused with a ConfigError naming what to use."""
        if not self.unsupported_block_types:
            pytest.skip(f"{type(self).__name__} declares no unsupported block types")
        for block_type in self.unsupported_block_types:

            @self.hypothesis_settings()
            @given(block=self.blocks(block_type))
            def check(block):
                try:
                    self.damping().invert(block)
                except ConfigError:
                    return
                raise AssertionError(f"expected {self.kind!r}.invert(<{block_type} block>) to raise ConfigError; it did not")

            check()

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", _DTYPES)
    def test_dtype_and_device_are_preserved(self, dtype: torch.dtype, device: str) -> None:
        """Blocks in ``dtype`` on ``device`` give an inverse and outputs there, matching the
        float64 dense reference to the dtype's tolerance."""
        for block_type in self.block_types:

            @self.hypothesis_settings()
            @given(block=self.blocks(block_type, dtype=dtype, device=device), seed=seeds)
            def check(block, seed):
                where = f"{self.kind} on a {block_type} block in {dtype} on {device}"
                damping = self.damping()
                with _NoPerformanceWarnings():
                    inv = damping.invert(block)
                    M = self.dense_reference(block, damping.options).to(torch.float64).cpu()
                _expect(inv.dtype == dtype and torch.device(inv.device).type == torch.device(device).type,
                        f"{where}: expected the inverse in {dtype} on {device}, got {inv.dtype} on {inv.device}")
                v = _random((M.shape[0],), seed, torch.empty(0, dtype=dtype, device=device))
                out = inv.matvec(v)
                _expect(out.dtype == dtype and out.device.type == torch.device(device).type,
                        f"{where}: expected the output in {dtype} on {device}, got {out.dtype} on {out.device}")
                rtol = max(default_tolerances(dtype)[0], self.rtol or 0.0)
                cond = float(torch.linalg.cond(M))
                expected = torch.linalg.solve(M, v.to(torch.float64).cpu())
                assert_close(out.cpu(), expected, rtol=rtol * cond,
                             atol=rtol * cond * expected.abs().max().item(),
                             msg=f"{where}: expected the inverse to match the float64 dense solve (κ = {cond:.2e})")

            check()

    def test_non_finite_factors_never_yield_nan(self) -> None:
        """A block with a NaN factor: ``invert`` raises NumericalError (or returns an inverse
        whose products raise it); with ``previous`` it returns ``previous`` with a
        NumericalWarning (or raises NumericalError).  A NaN right-hand side raises too."""
        kron_types = [t for t in self.block_types if t.startswith("kronecker")]
        if not kron_types:
            pytest.skip(f"{type(self).__name__} inverts no Kronecker-sum blocks")

        @self.hypothesis_settings()
        @given(block=self.blocks(kron_types[0]))
        def check(block):
            damping = self.damping()
            good = damping.invert(block)
            terms = [(A.clone(), B) for A, B in block.terms]
            terms[0][0][0, 0] = float("nan")
            bad = KroneckerSum(terms)
            p = good.shape[0]
            v = torch.ones(p, dtype=block.dtype, device=block.device)
            try:
                inv = damping.invert(bad)
            except (NumericalError, NotPSDError):
                pass
            else:
                try:
                    out = inv.matvec(v)
                except NumericalError:
                    pass
                else:
                    raise AssertionError(
                        f"expected {self.kind!r}.invert(<block with a NaN factor>) to raise NumericalError (or its products "
                        f"to); it returned an inverse giving {int((~torch.isfinite(out)).sum())} non-finite entries"
                    )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    kept = damping.invert(bad, previous=good)
                except (NumericalError, NotPSDError):
                    kept = None
            if kept is not None:
                _expect(kept is good, f"expected {self.kind!r}.invert(bad, previous=inv) to return the previous inverse")
                _expect(any(issubclass(w.category, NumericalWarning) for w in caught),
                        f"expected a NumericalWarning when {self.kind!r} keeps its previous inverse; got "
                        f"{[w.category.__name__ for w in caught]}")
            nan_v = v.clone()
            nan_v[0] = float("nan")
            try:
                out = good.matvec(nan_v)
            except NumericalError:
                return
            raise AssertionError(
                f"expected {self.kind!r}'s inverse applied to a right-hand side with a NaN to raise NumericalError; it "
                f"returned {int((~torch.isfinite(out)).sum())} non-finite entries"
            )

        check()
