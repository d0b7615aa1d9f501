"""Conformance checks of a block approximator (family ``approximators``): fits on random
``LayerStatistics`` against their own ``to_dense()``, the ``tikhonov`` damped inverse,
dtype/device, the ``LayerFit`` state dict, refreshes and non-finite statistics."""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlib.approximators.base import LayerFit
from curvlib.curvatures.statistics import Use
from curvlib.errors import CurvlibError, NumericalError, NumericalWarning
from curvlib.linalg.rows import DenseRows, OneHotRows
from curvlib.testing import references as ref
from curvlib.testing.compare import assert_close, assert_psd, assert_symmetric, default_tolerances
from curvlib.testing.conformance._common import DEVICES, _DTYPES, _expect, _NoPerformanceWarnings, _product_atol, _random
from curvlib.testing.conformance._kind import _KindConformance
from curvlib.testing.strategies import STATISTICS_KINDS, layer_statistics, seeds


def _assert_products(block: Any, D: torch.Tensor, d_a: int, d_g: int, seed: int, where: str) -> None:
    """``block.matvec``/``apply`` against the dense matrix D ``[p, p]`` (same dtype)."""
    p = d_a * d_g
    V = _random((p, 3), seed, D)
    atol = _product_atol(D, V)
    rtol = default_tolerances(D.dtype)[0]
    assert_close(block.matvec(V), D @ V, rtol=rtol, atol=atol, msg=f"{where}: expected block.matvec(V [p, 3]) == to_dense() @ V")
    assert_close(block.matvec(V[:, 0]), D @ V[:, 0], rtol=rtol, atol=atol,
                 msg=f"{where}: expected block.matvec(v [p]) == to_dense() @ v")
    if callable(getattr(block, "apply", None)):
        X = ref.unvec(V.T, d_g, d_a)  # [3, d_g, d_a], X_k = MAT(V[:, k])
        assert_close(block.apply(X), ref.unvec((D @ V).T, d_g, d_a), rtol=rtol, atol=atol,
                     msg=f"{where}: expected block.apply(X [k, d_g, d_a]) == MAT(to_dense() @ vec(X))")


def _safe_lambda(D64: torch.Tensor, relative: float) -> float:
    """λ making D + λI comfortably positive definite: relative·‖D‖₂ + 2·max(0, −λ_min(D))."""
    e = torch.linalg.eigvalsh(0.5 * (D64 + D64.T))
    top = float(e.abs().max()) if e.numel() else 0.0
    lam = relative * top + 2.0 * max(0.0, -float(e.min()))
    return lam if lam > 0 else 1e-3


class ApproximatorConformance(_KindConformance):
    """Checks of a block approximator (family ``approximators``).

    Class attributes a subclass sets (beyond ``kind``, ``options``, ``bad_options``,
    ``registry_kind_installed``, ``distribution``, ``max_examples``):

    - ``psd``: the fitted blocks are positive semi-definite (checked to ``psd_rtol``);
    - ``psd_rtol``: relative tolerance of that check (default: the dtype's; an iterative
      kind sets its solver tolerance);
    - ``exact_on_rank_one``: one sample, one column, one position gives F_ii = āāᵀ ⊗ ggᵀ;
      the fit must reproduce it (against :func:`~curvlib.testing.references.dense_block`);
    - ``statistics_kinds``: which statistics the kind supports (default: every kind of
      :data:`~curvlib.testing.strategies.STATISTICS_KINDS` — no positions, 1-/2-/3-D grids,
      sequences, one-hot rows, several uses, tied transposed uses);
    - ``max_m``, ``max_c``, ``max_dim``, ``max_hw``: sizes of the drawn statistics;
    - ``tikhonov_options``: extra options of the ``tikhonov`` damping used by the inverse
      check (default ``{"method": "exact"}``: a dense Cholesky for sums of several terms);
    - ``lam_relative``: λ of that check is ``lam_relative``·‖F̂‖₂ (+ twice the most negative
      eigenvalue of an indefinite F̂, so that F̂ + λI is definite);
    - ``own_inverse``: the blocks carry their own inverse factors (``inverse_factors``, e.g.
      ``singd``): the inverse checks apply the ``inverse_factors`` damping and compare with F̂⁻¹.

    The fitted block must expose ``a_dim``, ``b_dim``, ``shape``, ``dtype``, ``device``,
    ``matvec`` (``[p]`` and ``[p, k]``), ``to_dense`` and ``terms`` (a Kronecker sum),
    ``tikhonov_solve(X, lam)`` (an exact-like block) or ``inverse_factors`` (its own inverse),
    which is what the dampings consume.
    """

    family: ClassVar[str] = "approximators"
    psd: ClassVar[bool] = False
    psd_rtol: ClassVar[float | None] = None
    exact_on_rank_one: ClassVar[bool] = False
    own_inverse: ClassVar[bool] = False
    statistics_kinds: ClassVar[tuple[str, ...]] = STATISTICS_KINDS
    max_m: ClassVar[int] = 4
    max_c: ClassVar[int] = 2
    max_dim: ClassVar[int] = 4
    max_hw: ClassVar[int] = 3
    tikhonov_options: ClassVar[Mapping[str, Any]] = {"method": "exact"}
    lam_relative: ClassVar[float] = 0.1

    # -- helpers -------------------------------------------------------------------------
    def approximator(self, **overrides: Any) -> Any:
        """The approximator the registry builds for ``options`` (+ ``overrides``)."""
        return self.create(**overrides)

    def statistics(self, kind: str, *, dtype: torch.dtype = torch.float64, device: Any = None) -> st.SearchStrategy:
        """The strategy of the statistics the checks fit (override to constrain them)."""
        return layer_statistics(
            kind, max_m=self.max_m, max_c=self.max_c, max_dim=self.max_dim, max_hw=self.max_hw, dtype=dtype, device=device
        )

    def _skip_unsupported(self, kind: str) -> None:
        if kind not in self.statistics_kinds:
            pytest.skip(f"{self.kind!r} declares statistics_kinds = {self.statistics_kinds}, not {kind!r}")

    @staticmethod
    def redraw(stats: Any, seed: int) -> Any:
        """Statistics of the same layer shape as ``stats`` with new entries (a next batch):
        every use keeps its geometry, orientation and kind of rows."""
        uses = []
        for k, u in enumerate(stats.uses):
            s = seed + 2 * k
            if isinstance(u.a, OneHotRows):
                gen = torch.Generator().manual_seed(int(s))
                idx = torch.randint(-1, u.a.dim, tuple(u.a.index.shape), generator=gen).to(u.a.device)
                rows: Any = OneHotRows(idx, u.a.dim, dtype=u.a.dtype)
            else:
                a = _random(u.a.shape, s, u.a.dense())
                if stats.has_bias and not u.transposed:
                    a[..., -1] = 1.0
                rows = DenseRows(a)
            g = _random(u.g.shape, s + 1, u.g)
            if stats.has_bias and u.transposed:  # a transposed use has no gradient for the bias column
                g[..., -1] = 0.0
            uses.append(Use(rows, g, u.geometry, u.transposed))
        return stats.replace(uses=uses)

    @staticmethod
    def widened(stats: Any) -> Any:
        """The statistics of a layer with one more column of W̄ (d_a + 1, no bias)."""
        uses = [
            Use(u.a, torch.cat([u.g, u.g[..., :1]], dim=-1), u.geometry, True) if u.transposed
            else Use(u.a.pad(0, 1), u.g, u.geometry)
            for u in stats.uses
        ]
        return stats.replace(uses=uses, has_bias=False)

    def fit(self, stats: Any, previous: Any = None, **overrides: Any) -> Any:
        """``approximator(**overrides).fit(stats, previous=previous)``, checked to be a LayerFit."""
        out = self.approximator(**overrides).fit(stats, previous=previous)
        _expect(isinstance(out, LayerFit),
                f"expected {self.kind!r}.fit(...) to return a curvlib.approximators.LayerFit, got {type(out).__name__}")
        return out

    def _check_block(self, block: Any, stats: Any, where: str) -> None:
        d_a, d_g = stats.a_dim, stats.g_dim
        p = d_a * d_g
        _expect((int(block.a_dim), int(block.b_dim)) == (d_a, d_g),
                f"{where}: expected block (a_dim, b_dim) = (d_a, d_g) = {(d_a, d_g)}, got {(block.a_dim, block.b_dim)}")
        _expect(tuple(block.shape) == (p, p), f"{where}: expected block.shape == (p_i, p_i) = {(p, p)}, got {tuple(block.shape)}")
        _expect(block.dtype == stats.dtype and torch.device(block.device) == stats.device,
                f"{where}: expected the block in the statistics' dtype/device {stats.dtype} on {stats.device}, "
                f"got {block.dtype} on {block.device}")
        _expect(getattr(block, "terms", None) is not None or callable(getattr(block, "tikhonov_solve", None))
                or getattr(block, "inverse_factors", None) is not None,
                f"{where}: expected the block to have `terms` (a Kronecker sum Σ A_k⊗B_k), `tikhonov_solve(X, lam)` "
                f"(an exact-like block) or `inverse_factors` (its own inverse) so that a damping can invert it; "
                f"{type(block).__name__} has none of them")

    def _damped_inverse(self, block: Any, D64: torch.Tensor) -> tuple[Any, torch.Tensor, str]:
        """(the damped inverse of ``block``, the dense matrix it inverts, a description): the
        ``tikhonov`` damping's (F̂ + λI)⁻¹, or for a kind whose blocks carry their own inverse
        (``own_inverse``) the ``inverse_factors`` damping's F̂⁻¹."""
        if self.own_inverse:
            damping = self.registry.dampings.create({"kind": "inverse_factors", "value": 1.0})
            M, what = D64, "block's own inverse F̂⁻¹ (inverse_factors)"
        else:
            lam = _safe_lambda(D64, self.lam_relative)
            damping = self.registry.dampings.create({"kind": "tikhonov", "value": lam, **self.tikhonov_options})
            M = D64 + lam * torch.eye(D64.shape[0], dtype=torch.float64, device=D64.device)
            what = f"tikhonov inverse (F̂ + λI)⁻¹ (λ = {lam:.3e})"
        with _NoPerformanceWarnings():
            return damping.invert(block), M, what

    def _dense(self, block: Any) -> torch.Tensor:
        with _NoPerformanceWarnings():
            return block.to_dense()

    # -- checks --------------------------------------------------------------------------
    def test_factory_builds_an_approximator(self) -> None:
        """The registered factory, called with the validated options, has ``fit(stats, previous=None)``."""
        obj = self.approximator()
        _expect(callable(getattr(obj, "fit", None)),
                f"expected the factory of {self.kind!r} to build an object with fit(stats, previous=None); got {obj!r}")

    @pytest.mark.parametrize("stats_kind", STATISTICS_KINDS)
    def test_fit_products_match_to_dense(self, stats_kind: str) -> None:
        """On random statistics: a LayerFit of this kind whose block's ``matvec``/``apply``
        equal products with its ``to_dense()``."""
        self._skip_unsupported(stats_kind)

        @self.hypothesis_settings()
        @given(stats=self.statistics(stats_kind), seed=seeds)
        def check(stats, seed):
            fit = self.fit(stats)
            _expect(fit.info.method == self.kind,
                    f"expected fit.info.method == {self.kind!r} (EMA/warm starts and approximate() key on it), "
                    f"got {fit.info.method!r}")
            self._check_block(fit.block, stats, f"{self.kind} on {stats_kind} statistics")
            D = self._dense(fit.block)
            _expect(D.shape == fit.block.shape and D.dtype == stats.dtype and bool(torch.isfinite(D).all()),
                    f"expected to_dense() to be a finite {stats.dtype} matrix {tuple(fit.block.shape)}, got "
                    f"{D.dtype} {tuple(D.shape)} with {int((~torch.isfinite(D)).sum())} non-finite entries")
            _assert_products(fit.block, D, stats.a_dim, stats.g_dim, seed, f"{self.kind} on {stats_kind} statistics")

        check()

    @pytest.mark.parametrize("stats_kind", STATISTICS_KINDS)
    def test_fit_is_symmetric_and_psd(self, stats_kind: str) -> None:
        """The fitted block is symmetric, and PSD when the class declares ``psd = True``."""
        self._skip_unsupported(stats_kind)

        @self.hypothesis_settings()
        @given(stats=self.statistics(stats_kind))
        def check(stats):
            D = self._dense(self.fit(stats).block)
            assert_symmetric(D, msg=f"{self.kind} on {stats_kind} statistics")
            if self.psd:
                assert_psd(D, rtol=self.psd_rtol, msg=f"{self.kind} on {stats_kind} statistics (psd = True)")

        check()

    @pytest.mark.parametrize("stats_kind", STATISTICS_KINDS)
    def test_tikhonov_inverse_matches_dense_solve(self, stats_kind: str) -> None:
        """The ``tikhonov`` damping inverts the block: (F̂ + λI)⁻¹ v equals ``torch.linalg.solve``."""
        self._skip_unsupported(stats_kind)

        @self.hypothesis_settings()
        @given(stats=self.statistics(stats_kind), seed=seeds)
        def check(stats, seed):
            block = self.fit(stats).block
            D = self._dense(block).to(torch.float64)
            inv, M, what = self._damped_inverse(block, D)
            V = _random((D.shape[0], 2), seed, D)
            assert_close(inv.matvec(V.to(block.dtype)), torch.linalg.solve(M, V),
                         msg=f"{self.kind} on {stats_kind} statistics: expected the {what} to equal the dense solve")

        check()

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", _DTYPES)
    def test_dtype_and_device_are_preserved(self, dtype: torch.dtype, device: str) -> None:
        """Statistics in ``dtype`` on ``device`` give a block, products and a damped inverse there."""

        @self.hypothesis_settings()
        @given(stats=self.statistics(self.statistics_kinds[0], dtype=dtype, device=device), seed=seeds)
        def check(stats, seed):
            where = f"{self.kind} in {dtype} on {device}"
            block = self.fit(stats).block
            self._check_block(block, stats, where)
            D = self._dense(block)
            _expect(D.dtype == dtype and D.device == stats.device,
                    f"{where}: expected to_dense() in {dtype} on {stats.device}, got {D.dtype} on {D.device}")
            _assert_products(block, D, stats.a_dim, stats.g_dim, seed, where)
            D64 = D.to(torch.float64).cpu()
            inv, M, _ = self._damped_inverse(block, D64)
            v = _random((D.shape[0],), seed, D)
            out = inv.matvec(v)
            _expect(out.dtype == dtype and out.device == stats.device,
                    f"{where}: expected the damped inverse's output in {dtype} on {stats.device}, got {out.dtype} on "
                    f"{out.device}")
            expected = torch.linalg.solve(M, v.to(torch.float64).cpu())
            assert_close(out.cpu(), expected, dtype=dtype, msg=f"{where}: expected the damped inverse to match the dense solve")

        check()

    def test_state_dict_round_trip_is_exact(self) -> None:
        """``LayerFit.from_state_dict(torch.load(fit.state_dict(), weights_only=True))`` rebuilds
        the same block, info and state (what optimizer checkpoints rely on), and a refresh
        from the restored fit matches a refresh from the original."""
        @self.hypothesis_settings()
        @given(stats=self.statistics(self.statistics_kinds[0]), seed=seeds)
        def check(stats, seed):
            fit = self.fit(stats)
            buf = io.BytesIO()
            torch.save(fit.state_dict(), buf)
            buf.seek(0)
            try:
                back = LayerFit.from_state_dict(torch.load(buf, weights_only=True))
            except Exception as exc:
                raise AssertionError(
                    f"expected LayerFit.from_state_dict(fit.state_dict()) to rebuild a {self.kind!r} fit (block type "
                    f"{type(fit.block).__name__}); it raised {type(exc).__name__}: {exc}"
                ) from exc
            _expect(type(back.block) is type(fit.block),
                    f"expected the restored block to be a {type(fit.block).__name__}, got {type(back.block).__name__}")
            D, D_back = self._dense(fit.block), self._dense(back.block)
            _expect(torch.equal(D, D_back),
                    f"expected the restored block to equal the original exactly; max |difference| = "
                    f"{(D - D_back).abs().max().item():.3e}")
            _expect(back.info == fit.info, f"expected the restored info {back.info} to equal the original {fit.info}")
            _expect(set(back.state) == set(fit.state),
                    f"expected the restored state keys {sorted(back.state)} to equal {sorted(fit.state)}")
            for key, value in fit.state.items():
                other = back.state[key]
                same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
                _expect(same, f"expected state[{key!r}] to round-trip exactly")
            _expect(torch.equal(self._dense(copy.deepcopy(fit).block), D), "expected copy.deepcopy(fit) to keep the block")
            nxt = self.redraw(stats, seed)
            a, b = self.fit(nxt, previous=fit), self.fit(nxt, previous=back)
            assert_close(self._dense(b.block), self._dense(a.block),
                         msg="expected a refresh from the restored fit to match a refresh from the original")

        check()

    def test_refresh_from_previous(self) -> None:
        """``fit(next, previous=fit)`` advances the refresh counter and changes the block (the
        curvature is really refreshed, DESIGN.md §10); with an ``ema`` option the past is
        averaged in; a previous fit of another layer shape is refused."""
        fields = getattr(self.spec().options, "model_fields", {})
        ema = {"ema": 0.5} if "ema" in fields and "ema" not in self.options else {}

        @self.hypothesis_settings()
        @given(stats=self.statistics(self.statistics_kinds[0]), seed=seeds)
        def check(stats, seed):
            first = self.fit(stats, **ema)
            nxt = self.redraw(stats, seed)
            second = self.fit(nxt, previous=first, **ema)
            self._check_block(second.block, nxt, f"{self.kind} refreshed")
            _expect(second.refresh == first.refresh + 1,
                    f"expected the refresh counter to advance from {first.refresh} to {first.refresh + 1}, got "
                    f"{second.refresh} (set LayerFit.state['refresh'])")
            D1, D2 = self._dense(first.block), self._dense(second.block)
            _expect(bool(torch.isfinite(D2).all()), "expected a finite refreshed block")
            _expect(not torch.allclose(D1, D2), "expected the refreshed block to differ from the previous one "
                    "(new statistics); it is unchanged: is the curvature refreshed only once?")
            if ema:
                alone = self._dense(self.fit(nxt, **ema).block)
                _expect(not torch.allclose(alone, D2),
                        "expected the refresh with ema=0.5 to average in the previous fit (ρ = min(1 − 1/k, γ) = 0.5 at "
                        "k = 2); it equals a fit of the new statistics alone")
            other = self.redraw(self.widened(stats), seed)
            try:
                self.fit(other, previous=first)
            except CurvlibError:
                pass
            else:
                raise AssertionError(
                    f"expected fit(statistics with d_a = {other.a_dim}, previous=<fit with d_a = {stats.a_dim}>) to raise "
                    "a curvlib error (ShapeError/ConfigError): a previous fit of another layer shape cannot continue"
                )

        check()

    def test_non_finite_statistics_keep_previous_or_raise(self) -> None:
        """Non-finite statistics never give a NaN block: NumericalError without a previous fit;
        with one, the previous fit is returned with a NumericalWarning (or NumericalError)."""

        @self.hypothesis_settings()
        @given(stats=self.statistics(self.statistics_kinds[0]))
        def check(stats):
            good = self.fit(stats)
            u0 = stats.uses[0]
            g = u0.g.clone()
            g.view(-1)[0] = float("nan")
            bad = stats.replace(uses=(type(u0)(u0.a, g, u0.geometry, u0.transposed), *stats.uses[1:]))
            try:
                out = self.fit(bad)
            except NumericalError:
                pass
            else:
                raise AssertionError(
                    f"expected {self.kind!r}.fit(non-finite statistics) without a previous fit to raise NumericalError; "
                    f"it returned a block with {int((~torch.isfinite(self._dense(out.block))).sum())} non-finite entries"
                )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    kept = self.fit(bad, previous=good)
                except NumericalError:
                    return
            _expect(kept is good,
                    f"expected {self.kind!r}.fit(non-finite statistics, previous=fit) to return the previous fit itself "
                    "(or raise NumericalError); it returned another fit")
            _expect(any(issubclass(w.category, NumericalWarning) for w in caught),
                    f"expected a NumericalWarning when {self.kind!r} keeps its previous fit; got "
                    f"{[w.category.__name__ for w in caught]}")

        check()

    def test_exact_on_a_rank_one_block(self) -> None:
        """One sample, one column, no positions: F_ii = āāᵀ ⊗ ggᵀ is a single Kronecker product;
        a kind with ``exact_on_rank_one = True`` reproduces it (dense float64 reference)."""
        if not self.exact_on_rank_one:
            pytest.skip(f"{type(self).__name__} does not declare exact_on_rank_one = True")

        @self.hypothesis_settings()
        @given(stats=layer_statistics("linear", max_m=1, max_c=1, max_dim=self.max_dim))
        def check(stats):
            D = self._dense(self.fit(stats).block)
            assert_close(D, ref.dense_block(stats).to(D.dtype),
                         msg=f"{self.kind}: expected the exact block ā āᵀ ⊗ g gᵀ for one sample and one column")

        check()
