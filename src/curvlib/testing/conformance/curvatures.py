"""Conformance checks of a curvature kind (family ``curvatures``) on small networks:
``to_dense()`` and products against the author's dense float64 reference, symmetry/PSD,
the per-layer statistics, and float32."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given

from curvlib.curvatures.api import curvature
from curvlib.curvatures.operator import NoStatisticsError
from curvlib.testing import references as ref
from curvlib.testing.compare import assert_close, assert_psd, assert_symmetric
from curvlib.testing.conformance._common import _expect, _NoPerformanceWarnings, _product_atol, _random
from curvlib.testing.conformance._kind import _KindConformance
from curvlib.testing.strategies import networks, seeds


class CurvatureConformance(_KindConformance):
    """Checks of a curvature kind (family ``curvatures``) on small networks.

    The subclass implements :meth:`dense_reference` (the dense float64 matrix the kind
    stands for, built with :mod:`curvlib.testing.references`), and sets ``archs`` (the
    architectures drawn) and ``psd``.
    """

    family: ClassVar[str] = "curvatures"
    archs: ClassVar[tuple[str, ...]] = ("mlp", "cnn", "conv_autoencoder")
    psd: ClassVar[bool] = True
    max_examples: ClassVar[int] = 3

    def dense_reference(self, case: Any, operator: Any) -> torch.Tensor:
        """The dense float64 ``[p, p]`` matrix of this kind for ``case`` (a
        :class:`~curvlib.testing.strategies.NetworkCase`), in the flat order of
        ``operator.layers`` — e.g. :func:`~curvlib.testing.references.dense_ggn`."""
        raise NotImplementedError(f"{type(self).__name__}: implement dense_reference(case, operator)")

    def build(self, case: Any) -> Any:
        """The operator ``curvlib.curvature`` builds for ``case`` (generator seeded from ``case.seed``)."""
        return curvature({"kind": self.kind, **self.options}, case.model, case.loss_fn, case.batch,
                         generator=torch.Generator().manual_seed(case.seed), registry=self.registry)

    def test_matches_the_dense_reference(self) -> None:
        """``to_dense()`` equals :meth:`dense_reference`; ``F @ v`` and ``F @ V`` equal products with it."""

        @self.hypothesis_settings()
        @given(case=networks(self.archs), seed=seeds)
        def check(case, seed):
            F = self.build(case)
            where = f"{self.kind} on {case.arch}"
            with _NoPerformanceWarnings():
                D = F.to_dense()
            _expect(tuple(F.shape) == (F.p, F.p) == tuple(D.shape),
                    f"{where}: expected shape (p, p) = {(F.p, F.p)}, got F.shape {tuple(F.shape)}, to_dense {tuple(D.shape)}")
            assert_close(D, self.dense_reference(case, F).to(D.dtype), msg=f"{where}: expected to_dense() == dense_reference")
            V = _random((F.p, 2), seed, D)
            atol = _product_atol(D, V)
            assert_close(F @ V, D @ V, atol=atol, msg=f"{where}: expected F @ V [p, 2] == to_dense() @ V")
            assert_close(F @ V[:, 0], D @ V[:, 0], atol=atol, msg=f"{where}: expected F @ v [p] == to_dense() @ v")
            if callable(getattr(F, "block", None)):
                for i, L in enumerate(F.layers):
                    with _NoPerformanceWarnings():
                        Bi = F.block(i, i).to_dense()
                    assert_close(Bi, D[L.slice, L.slice], msg=f"{where}: expected F.block({i}, {i}) == to_dense()[layer {i}]")

        check()

    def test_is_symmetric_and_psd(self) -> None:
        """``to_dense()`` is symmetric, and PSD with ``psd = True``."""

        @self.hypothesis_settings()
        @given(case=networks(self.archs))
        def check(case):
            with _NoPerformanceWarnings():
                D = self.build(case).to_dense()
            assert_symmetric(D, msg=f"{self.kind} on {case.arch}")
            if self.psd:
                assert_psd(D, msg=f"{self.kind} on {case.arch}")

        check()

    def test_statistics_define_the_diagonal_blocks(self) -> None:
        """``F.statistics(i)`` (when the kind has statistics) gives layer i's diagonal block
        through the explicit-loop :func:`~curvlib.testing.references.dense_block`."""
        @self.hypothesis_settings()
        @given(case=networks(self.archs))
        def check(case):
            F = self.build(case)
            with _NoPerformanceWarnings():
                D = F.to_dense()
            for i, L in enumerate(F.layers):
                try:
                    stats = F.statistics(i)
                except NoStatisticsError:
                    pytest.skip(f"{self.kind!r} has no per-layer statistics")
                _expect((stats.a_dim, stats.g_dim) == (L.a_dim, L.g_dim),
                        f"{self.kind}: expected layer {i}'s statistics with (d_a, d_g) = {(L.a_dim, L.g_dim)}, got "
                        f"{(stats.a_dim, stats.g_dim)}")
                assert_close(ref.dense_block(stats).to(D.dtype), D[L.slice, L.slice],
                             msg=f"{self.kind} on {case.arch}: expected dense_block(F.statistics({i})) == F's diagonal block")

        check()

    def test_float32_model_keeps_its_dtype(self) -> None:
        """A float32 network gives a float32 operator and products."""

        @self.hypothesis_settings()
        @given(case=networks(self.archs[:1], dtype=torch.float32))
        def check(case):
            F = self.build(case)
            _expect(F.dtype == torch.float32, f"{self.kind}: expected a float32 operator for a float32 model, got {F.dtype}")
            out = F @ torch.ones(F.p, dtype=torch.float32)
            _expect(out.dtype == torch.float32 and bool(torch.isfinite(out).all()),
                    f"{self.kind}: expected finite float32 products, got {out.dtype}")

        check()
