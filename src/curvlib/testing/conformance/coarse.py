"""Conformance checks of a coarse space (family ``coarse_spaces``) on small dense problems:
basis columns against the partition, and the two-level error never above the first
level's (4.21)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given

from curvlib.approximators.api import approximate
from curvlib.coarse import CoarseBasis, CoarseContext, CoarseSpace, Partition, TwoLevelPreconditioner
from curvlib.curvatures.api import curvature
from curvlib.damping.api import damped_inverse
from curvlib.errors import NumericalWarning
from curvlib.testing.conformance._common import _expect, _NoPerformanceWarnings
from curvlib.testing.conformance._kind import _KindConformance
from curvlib.testing.strategies import networks


class CoarseSpaceConformance(_KindConformance):
    """Checks of a coarse space (family ``coarse_spaces``) on small dense problems.

    Class attributes:

    - ``archs``: architectures of the drawn networks (:func:`~curvlib.testing.strategies.networks`);
    - ``partitions``: ``"layers"`` (4.9) and/or ``"parameter_tensors"``;
    - ``lam``: λ of F• = F + λI;
    - ``curvature_kind``: the curvature F (default ``"ggn"``);
    - ``first_level``: ``(approximator kind, damping kind)`` of the first level M ≈ F•⁻¹.
    """

    family: ClassVar[str] = "coarse_spaces"
    archs: ClassVar[tuple[str, ...]] = ("mlp", "cnn")
    partitions: ClassVar[tuple[str, ...]] = ("layers", "parameter_tensors")
    lam: ClassVar[float] = 1e-2
    curvature_kind: ClassVar[str] = "ggn"
    first_level: ClassVar[tuple[str, str]] = ("kfac", "heuristic")
    max_examples: ClassVar[int] = 3

    def space(self, **overrides: Any) -> Any:
        """The coarse space object the registry builds."""
        return self.create(**overrides)

    def problem(self, case: Any) -> tuple[Any, Any, torch.Tensor]:
        """``(F, first level M, u = ∇L)`` for a drawn network case."""
        F = curvature(self.curvature_kind, case.model, case.loss_fn, case.batch, registry=self.registry,
                      generator=torch.Generator().manual_seed(case.seed))
        approx_kind, damping_kind = self.first_level
        inv = damped_inverse(approximate(F, approx_kind, registry=self.registry), damping_kind, value=self.lam,
                             registry=self.registry)
        return F, inv, F.gradient_vector()

    @staticmethod
    def make_partition(name: str, F: Any) -> Any:
        if name == "layers":
            return Partition.layers(F)
        if name == "parameter_tensors":
            return Partition.parameter_tensors(F)
        raise ValueError(f"unknown partition {name!r}; expected 'layers' or 'parameter_tensors'")

    def test_factory_builds_a_coarse_space(self) -> None:
        """The registered factory builds a :class:`curvlib.coarse.CoarseSpace`."""
        obj = self.space()
        _expect(isinstance(obj, CoarseSpace), f"expected the factory of {self.kind!r} to build a curvlib.coarse.CoarseSpace, got {obj!r}")

    @pytest.mark.parametrize("partition", ["layers", "parameter_tensors"])
    def test_basis_columns_are_finite_and_match_the_partition(self, partition: str) -> None:
        """R₀ᵀ = diag(V_1 … V_S) (4.23): one finite block V_g ``[p_g, N_g]`` per group, in F's dtype."""
        if partition not in self.partitions:
            pytest.skip(f"{type(self).__name__} declares partitions = {self.partitions}")

        @self.hypothesis_settings()
        @given(case=networks(self.archs))
        def check(case):
            F, inv, u = self.problem(case)
            part = self.make_partition(partition, F)
            basis = self.space().basis(CoarseContext(F, self.lam, inv, part, u=u))
            where = f"{self.kind} on {case.arch} ({partition} partition)"
            _expect(isinstance(basis, CoarseBasis), f"{where}: expected a CoarseBasis, got {type(basis).__name__}")
            _expect(basis.p == F.p, f"{where}: expected a basis over p = {F.p} rows, got {basis.p}")
            _expect(len(basis.columns) == len(part),
                    f"{where}: expected one column block per group ({len(part)}), got {len(basis.columns)}")
            for g, (V, n) in enumerate(zip(basis.columns, part.sizes)):
                _expect(V.shape[0] == n, f"{where}: expected V_{g} with p_g = {n} rows, got {list(V.shape)}")
                _expect(bool(torch.isfinite(V).all()), f"{where}: expected finite columns, V_{g} has non-finite entries")
            _expect(basis.dtype == F.dtype and basis.device == F.device,
                    f"{where}: expected the basis in {F.dtype} on {F.device}, got {basis.dtype} on {basis.device}")

        check()

    @pytest.mark.parametrize("partition", ["layers", "parameter_tensors"])
    def test_two_level_error_never_exceeds_the_first_level(self, partition: str) -> None:
        """(4.21): with the exact coarse solve β*, ‖ζ_2L − F•⁻¹u‖_F• ≤ ‖ζ_1 − F•⁻¹u‖_F•
        (dense float64 F•), and ``error_reduction(u)`` (4.46) is ≤ 0."""
        if partition not in self.partitions:
            pytest.skip(f"{type(self).__name__} declares partitions = {self.partitions}")

        @self.hypothesis_settings()
        @given(case=networks(self.archs))
        def check(case):
            F, inv, u = self.problem(case)
            with _NoPerformanceWarnings():
                Fb = F.to_dense().to(torch.float64) + self.lam * torch.eye(F.p, dtype=torch.float64)
            x = torch.linalg.solve(Fb, u.to(torch.float64))
            pre = TwoLevelPreconditioner(inv, F, self.space(), self.lam, "multiplicative",
                                         partition=self.make_partition(partition, F))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NumericalWarning)  # a numerically singular coarse operator is cut
                z2 = (pre @ u).to(torch.float64)
                er = float(pre.error_reduction(u))
            z1 = (inv @ u).to(torch.float64)

            def energy(z):
                e = z - x
                return float(e @ Fb @ e)

            E1, E2 = energy(z1), energy(z2)
            slack = 1e-8 * max(E1, float(u.to(torch.float64) @ x))
            where = f"{self.kind} on {case.arch} ({partition} partition, λ = {self.lam})"
            _expect(E2 <= E1 + slack,
                    f"{where}: expected the two-level error ‖ζ_2L − F•⁻¹u‖²_F• = {E2:.6e} ≤ the first level's {E1:.6e} "
                    "(4.21)")
            _expect(er <= slack, f"{where}: expected error_reduction(u) = 𝔈(β*) − 𝔈(0) ≤ 0 (4.46), got {er:.3e}")

        check()

    def test_float32_problem_keeps_its_dtype(self) -> None:
        """On a float32 network the basis is float32."""
        @self.hypothesis_settings()
        @given(case=networks(self.archs[:1], dtype=torch.float32))
        def check(case):
            F, inv, u = self.problem(case)
            basis = self.space().basis(CoarseContext(F, self.lam, inv, self.make_partition(self.partitions[0], F), u=u))
            _expect(basis.dtype == torch.float32, f"{self.kind}: expected a float32 basis on a float32 problem, got {basis.dtype}")
            for g, V in enumerate(basis.columns):
                _expect(bool(torch.isfinite(V).all()), f"{self.kind} (float32): expected finite columns, V_{g} has non-finite entries")

        check()
