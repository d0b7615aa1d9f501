"""The conformance kit: pytest mixins a plugin author subclasses to inherit curvlib's checks.

One mixin per plugin family.  A test class names the kind (and its options) and inherits
every check; curvlib's own built-ins pass the same kit (``tests/conformance/``)::

    from curvlib.testing.conformance import ApproximatorConformance

    class TestEKFAC(ApproximatorConformance):
        kind = "ekfac"
        options = {}                     # options of the kind, validated by its pydantic model
        psd = True                       # the fitted blocks are positive semi-definite
        registry_kind_installed = True   # the kind must come from an installed entry point

==========================  ===========================================================
mixin                       what it checks
==========================  ===========================================================
ApproximatorConformance     fits on random Linear and conv ``LayerStatistics``: products
                            equal ``to_dense()``; symmetric (PSD with ``psd = True``); the
                            ``tikhonov`` damped inverse equals a dense solve; dtype/device
                            kept (float32, float64, cuda); ``LayerFit.state_dict`` round
                            trip exact; refresh from ``previous``; non-finite statistics
DampingConformance          the inverse equals a dense solve of :meth:`dense_reference`
                            (the author's formula); dtype/device; non-finite factors never
                            give NaN (previous kept with a NumericalWarning, or NumericalError)
CoarseSpaceConformance      columns finite, shapes match the partition; two-level error
                            never above the first level's (4.21) on small dense problems
CurvatureConformance        products equal ``to_dense()`` equal :meth:`dense_reference`;
                            symmetric/PSD; statistics define the diagonal blocks
LayerAdapterConformance     parameters ↔ W̄ ↔ vec round trip (against an independent
                            mapping for built-in types); uses carry the batch and the
                            block's dims; the captured statistics reproduce per-sample
                            gradients from ``torch.func``; float32 kept
==========================  ===========================================================

Every mixin also checks that the kind is registered (through an installed entry point
with ``registry_kind_installed = True``) and that its options model rejects unknown fields
and the values listed in ``bad_options``.

Where the kind comes from: :meth:`make_registry` returns ``curvlib.plugins.load_registry()``
(curvlib's built-ins and every installed plugin).  Before the distribution is installed,
override it to register the plugin module into a fresh :class:`~curvlib.plugins.Registry`::

    def make_registry(self):
        registry = Registry()
        registry.register(my_plugin_module, name="my_plugin")
        return registry

Random inputs are drawn with hypothesis (:mod:`curvlib.testing.strategies`), at most
``max_examples`` per check, under the hypothesis profile loaded by the test session
(curvlib's ``conftest.py`` loads a deterministic one; a plugin's can call
:func:`curvlib.testing.strategies.load_profile`).  Ground truth is dense float64
(:mod:`curvlib.testing.references`, ``torch.linalg``); tolerances come from the dtype
(:func:`curvlib.testing.compare.default_tolerances`).  The ``cuda`` variants carry the
``cuda`` marker (register it in your pytest configuration) and skip without a device.

A check can be run outside pytest too: ``TestEKFAC().test_fit_products_match_to_dense("linear")``.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

from curvlib.errors import ConfigError, CurvlibError, NotPSDError, NumericalError, NumericalWarning, PerformanceWarning
from curvlib.testing import references as ref
from curvlib.testing.compare import assert_close, assert_psd, assert_symmetric, default_tolerances
from curvlib.testing.strategies import STATISTICS_KINDS, layer_statistics, networks, seeds, spd_matrices

__all__ = [
    "ApproximatorConformance",
    "CoarseSpaceConformance",
    "CurvatureConformance",
    "DEVICES",
    "DampingConformance",
    "LayerAdapterConformance",
]

#: The devices every dtype/device check runs on: the CPU, and CUDA (``cuda`` marker,
#: skipped without a device).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=(pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
        id="cuda",
    ),
]

_DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


def _expect(condition: bool, message: str) -> None:
    """Fail with ``message`` (which says what was expected and what came) unless ``condition``."""
    if not condition:
        raise AssertionError(message)


class _NoPerformanceWarnings:
    """``with _NoPerformanceWarnings():`` — dense exports of tiny test matrices are expected."""

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", PerformanceWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------- shared parts


class _KindConformance:
    """What every family's mixin shares: the kind, its options, its registration."""

    #: the plugin family (set by each mixin)
    family: ClassVar[str] = ""
    #: the kind under test (set by the subclass)
    kind: ClassVar[str] = ""
    #: options of the kind, validated by its pydantic model
    options: ClassVar[Mapping[str, Any]] = {}
    #: option mappings the options model must reject (each merged over ``options``)
    bad_options: ClassVar[Sequence[Mapping[str, Any]]] = ()
    #: require the kind to come from an installed distribution's entry point
    registry_kind_installed: ClassVar[bool] = False
    #: the distribution expected to provide the kind (checked when given)
    distribution: ClassVar[str | None] = None
    #: hypothesis examples per check
    max_examples: ClassVar[int] = 4

    # -- the registry ------------------------------------------------------------------
    def make_registry(self) -> Any:
        """The registry the kind is looked up in (default: every installed plugin)."""
        from curvlib.plugins import load_registry

        return load_registry()

    @property
    def registry(self) -> Any:
        """:meth:`make_registry`, built once per test class."""
        cls = type(self)
        if "_conformance_registry" not in cls.__dict__:
            cls._conformance_registry = self.make_registry()
        return cls.__dict__["_conformance_registry"]

    def spec(self) -> Any:
        """The kind's :class:`~curvlib.plugins.PluginSpec`."""
        _expect(bool(self.kind), f"{type(self).__name__}: set the class attribute `kind` to the kind under test")
        return self.registry.family(self.family).get(self.kind)

    def create(self, **overrides: Any) -> Any:
        """The kind's object built from ``options`` merged with ``overrides`` (as curvlib builds it)."""
        spec, opts = self.registry.family(self.family).resolve({"kind": self.kind, **self.options, **overrides})
        return spec.factory(opts)

    def hypothesis_settings(self) -> settings:
        """hypothesis settings of the checks: ``max_examples`` on top of the loaded profile."""
        return settings(
            max_examples=self.max_examples,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        )

    # -- checks ------------------------------------------------------------------------
    def test_kind_is_registered(self) -> None:
        """The kind is in the registry's family; with ``registry_kind_installed`` it comes
        from an entry point of an installed distribution (as a user gets it)."""
        family = self.registry.family(self.family)
        _expect(
            self.kind in family,
            f"expected {self.family} kind {self.kind!r} to be registered; registered kinds: {family.kinds()}"
            + (f"; plugins that failed to load: {[str(f) for f in self.registry.failures]}" if self.registry.failures else ""),
        )
        spec = family.get(self.kind)
        if self.distribution is not None:
            _expect(
                spec.distribution == self.distribution,
                f"expected {self.family} kind {self.kind!r} to come from distribution {self.distribution!r}, "
                f"it comes from {spec.distribution!r} (plugin {spec.plugin!r})",
            )
        if self.registry_kind_installed:
            import importlib.metadata as md

            from curvlib.plugins import ENTRY_POINT_GROUP, load_registry

            installed = load_registry()
            _expect(
                self.kind in installed.family(self.family),
                f"expected {self.family} kind {self.kind!r} in load_registry() (entry-point group "
                f"{ENTRY_POINT_GROUP!r}); it is not: is the distribution installed? registered kinds: "
                f"{installed.family(self.family).kinds()}",
            )
            spec = installed.family(self.family).get(self.kind)
            try:
                eps = md.distribution(spec.distribution).entry_points
            except md.PackageNotFoundError:
                eps = ()
            names = [ep.name for ep in eps if ep.group == ENTRY_POINT_GROUP]
            _expect(
                spec.plugin in names,
                f"expected {self.family} kind {self.kind!r} to be registered by an entry point of group "
                f"{ENTRY_POINT_GROUP!r} of distribution {spec.distribution!r}; its plugin is {spec.plugin!r}, the "
                f"distribution's entry points in that group are {names}",
            )

    def test_options_reject_unknown_fields(self) -> None:
        """The options model forbids unknown fields (``extra="forbid"``)."""
        family = self.registry.family(self.family)
        family.resolve({"kind": self.kind, **self.options})  # the options given are valid
        try:
            family.resolve({"kind": self.kind, **self.options, "not_an_option_xyz": 1})
        except ConfigError as exc:
            _expect(
                "not_an_option_xyz" in str(exc),
                f"expected the ConfigError for an unknown option to name it ('not_an_option_xyz'); got: {exc}",
            )
        else:
            raise AssertionError(
                f"expected {self.family} kind {self.kind!r} to reject the unknown option 'not_an_option_xyz' "
                "with a ConfigError (options models derive from curvlib.config.StrictModel, extra='forbid'); "
                "it was accepted"
            )

    def _generic_bad_options(self) -> list[dict[str, Any]]:
        fields = getattr(self.spec().options, "model_fields", {})
        bad: list[dict[str, Any]] = []
        if "value" in fields:
            bad += [{"value": 0.0}, {"value": -1.0}, {"value": float("nan")}]
        if "ema" in fields:
            bad += [{"ema": 1.5}, {"ema": -0.1}]
        return bad

    def test_options_reject_bad_values(self) -> None:
        """Every mapping of ``bad_options`` (and out-of-range ``value``/``ema``) raises ConfigError."""
        family = self.registry.family(self.family)
        for bad in [*self._generic_bad_options(), *self.bad_options]:
            data = {"kind": self.kind, **self.options, **bad}
            try:
                family.resolve(data)
            except ConfigError:
                continue
            raise AssertionError(
                f"expected {self.family} kind {self.kind!r} to reject options {dict(bad)} with a ConfigError; "
                "they were accepted"
            )


def _random(shape: Sequence[int], seed: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=like.dtype, device=like.device)


def _product_atol(D: torch.Tensor, V: torch.Tensor) -> float:
    """Rounding bound of D·V in D's dtype: c·eps·max_i Σ_j |D_ij||V_j|."""
    eps = torch.finfo(D.dtype).eps
    bound = (D.abs().to(torch.float64) @ V.abs().to(torch.float64)).max().item() if D.numel() else 0.0
    return 64 * eps * max(D.shape[0], 1) * bound


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


# --------------------------------------------------------------------------- approximators


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
      eigenvalue of an indefinite F̂, so that F̂ + λI is definite).

    The fitted block must expose ``a_dim``, ``b_dim``, ``shape``, ``dtype``, ``device``,
    ``matvec`` (``[p]`` and ``[p, k]``), ``to_dense`` and either ``terms`` (a Kronecker sum)
    or ``tikhonov_solve(X, lam)`` (an exact-like block), which is what the dampings consume.
    """

    family: ClassVar[str] = "approximators"
    psd: ClassVar[bool] = False
    psd_rtol: ClassVar[float | None] = None
    exact_on_rank_one: ClassVar[bool] = False
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
        from curvlib.curvatures.statistics import Use
        from curvlib.linalg.rows import DenseRows, OneHotRows

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
        from curvlib.curvatures.statistics import Use

        uses = [
            Use(u.a, torch.cat([u.g, u.g[..., :1]], dim=-1), u.geometry, True) if u.transposed
            else Use(u.a.pad(0, 1), u.g, u.geometry)
            for u in stats.uses
        ]
        return stats.replace(uses=uses, has_bias=False)

    def fit(self, stats: Any, previous: Any = None, **overrides: Any) -> Any:
        """``approximator(**overrides).fit(stats, previous=previous)``, checked to be a LayerFit."""
        from curvlib.approximators.base import LayerFit

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
        _expect(getattr(block, "terms", None) is not None or callable(getattr(block, "tikhonov_solve", None)),
                f"{where}: expected the block to have `terms` (a Kronecker sum Σ A_k⊗B_k) or `tikhonov_solve(X, lam)` "
                f"(an exact-like block) so that a damping can invert it; {type(block).__name__} has neither")

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
            lam = _safe_lambda(D, self.lam_relative)
            damping = self.registry.dampings.create({"kind": "tikhonov", "value": lam, **self.tikhonov_options})
            with _NoPerformanceWarnings():
                inv = damping.invert(block)
            p = D.shape[0]
            V = _random((p, 2), seed, D)
            expected = torch.linalg.solve(D + lam * torch.eye(p, dtype=torch.float64), V)
            assert_close(inv.matvec(V.to(block.dtype)), expected,
                         msg=f"{self.kind} on {stats_kind} statistics: expected the tikhonov inverse (F̂ + λI)⁻¹V "
                             f"(λ = {lam:.3e}) to equal the dense solve")

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
            lam = _safe_lambda(D64, self.lam_relative)
            damping = self.registry.dampings.create({"kind": "tikhonov", "value": lam, **self.tikhonov_options})
            with _NoPerformanceWarnings():
                inv = damping.invert(block)
            v = _random((D.shape[0],), seed, D)
            out = inv.matvec(v)
            _expect(out.dtype == dtype and out.device == stats.device,
                    f"{where}: expected the damped inverse's output in {dtype} on {stats.device}, got {out.dtype} on "
                    f"{out.device}")
            expected = torch.linalg.solve(D64 + lam * torch.eye(D64.shape[0], dtype=torch.float64), v.to(torch.float64).cpu())
            assert_close(out.cpu(), expected, dtype=dtype, msg=f"{where}: expected the damped inverse to match the dense solve")

        check()

    def test_state_dict_round_trip_is_exact(self) -> None:
        """``LayerFit.from_state_dict(torch.load(fit.state_dict(), weights_only=True))`` rebuilds
        the same block, info and state (what optimizer checkpoints rely on), and a refresh
        from the restored fit matches a refresh from the original."""
        from curvlib.approximators.base import LayerFit

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


# --------------------------------------------------------------------------- dampings

_BLOCK_TYPES = ("kronecker_1", "kronecker_2", "exact")


@st.composite
def _damping_blocks(draw, block_type: str, max_dim: int, dtype: torch.dtype = torch.float64, device: Any = None):
    """A block of ``block_type``: ``kronecker_1`` (A⊗B, A, B SPD), ``kronecker_2`` (A⊗B + C⊗D,
    C, D PSD: a definite sum), ``exact`` (an ExactBlock of Linear statistics)."""
    from curvlib.approximators.exact import ExactBlock
    from curvlib.linalg import KroneckerSum

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
        from curvlib.damping import Damping

        obj = self.damping()
        _expect(isinstance(obj, Damping), f"expected the factory of {self.kind!r} to build a curvlib.damping.Damping, got {obj!r}")

    def test_inverse_matches_dense_reference(self) -> None:
        """For every supported block type: ``invert(block)`` applied to vectors and matrices,
        and ``damped_inverse(block, damping)``, equal ``torch.linalg.solve(dense_reference, ·)``."""
        from curvlib.damping import BlockInverse, damped_inverse

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
        from curvlib.linalg import KroneckerSum

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


# --------------------------------------------------------------------------- coarse spaces


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
        from curvlib.approximators.api import approximate
        from curvlib.curvatures.api import curvature
        from curvlib.damping.api import damped_inverse

        F = curvature(self.curvature_kind, case.model, case.loss_fn, case.batch, registry=self.registry,
                      generator=torch.Generator().manual_seed(case.seed))
        approx_kind, damping_kind = self.first_level
        inv = damped_inverse(approximate(F, approx_kind, registry=self.registry), damping_kind, value=self.lam,
                             registry=self.registry)
        return F, inv, F.gradient_vector()

    @staticmethod
    def make_partition(name: str, F: Any) -> Any:
        from curvlib.coarse import Partition

        if name == "layers":
            return Partition.layers(F)
        if name == "parameter_tensors":
            return Partition.parameter_tensors(F)
        raise ValueError(f"unknown partition {name!r}; expected 'layers' or 'parameter_tensors'")

    def test_factory_builds_a_coarse_space(self) -> None:
        """The registered factory builds a :class:`curvlib.coarse.CoarseSpace`."""
        from curvlib.coarse import CoarseSpace

        obj = self.space()
        _expect(isinstance(obj, CoarseSpace), f"expected the factory of {self.kind!r} to build a curvlib.coarse.CoarseSpace, got {obj!r}")

    @pytest.mark.parametrize("partition", ["layers", "parameter_tensors"])
    def test_basis_columns_are_finite_and_match_the_partition(self, partition: str) -> None:
        """R₀ᵀ = diag(V_1 … V_S) (4.23): one finite block V_g ``[p_g, N_g]`` per group, in F's dtype."""
        from curvlib.coarse import CoarseBasis, CoarseContext

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
        from curvlib.coarse import TwoLevelPreconditioner

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
        from curvlib.coarse import CoarseContext

        @self.hypothesis_settings()
        @given(case=networks(self.archs[:1], dtype=torch.float32))
        def check(case):
            F, inv, u = self.problem(case)
            basis = self.space().basis(CoarseContext(F, self.lam, inv, self.make_partition(self.partitions[0], F), u=u))
            _expect(basis.dtype == torch.float32, f"{self.kind}: expected a float32 basis on a float32 problem, got {basis.dtype}")
            for g, V in enumerate(basis.columns):
                _expect(bool(torch.isfinite(V).all()), f"{self.kind} (float32): expected finite columns, V_{g} has non-finite entries")

        check()


# --------------------------------------------------------------------------- curvatures


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
        from curvlib.curvatures.api import curvature

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
        from curvlib.curvatures.operator import NoStatisticsError

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


# --------------------------------------------------------------------------- layer adapters


class LayerAdapterConformance(_KindConformance):
    """Checks of a layer adapter (family ``layers``).

    The subclass implements :meth:`make_modules` (modules of the adapted type, float64,
    covering its options: bias or not, strides, paddings, groups, …) and, for module types
    with inputs other than ``[m, in_features]`` / ``[m, in_channels, *spatial]``,
    :meth:`make_input`; :meth:`output` picks the tensor output of modules that return a
    tuple.  Every check runs the adapters through curvlib's own capture machinery
    (:func:`~curvlib.capture.hooks.capture_forward`), as a curvature operator does.
    """

    family: ClassVar[str] = "layers"
    batch_size: ClassVar[int] = 3
    spatial: ClassVar[int] = 5

    def make_modules(self) -> Sequence[nn.Module]:
        """Modules the adapter handles (float64)."""
        raise NotImplementedError(f"{type(self).__name__}: implement make_modules() returning modules of the adapted type")

    def make_input(self, module: nn.Module, m: int, generator: torch.Generator) -> Any:
        """A batch of m inputs for ``module`` in its dtype (a tensor, or a tuple of arguments)."""
        dtype = next(module.parameters()).dtype
        if hasattr(module, "in_features"):
            return torch.randn(m, module.in_features, generator=generator, dtype=torch.float64).to(dtype)
        if hasattr(module, "in_channels"):
            nd = len(module.kernel_size)
            return torch.randn(m, module.in_channels, *([self.spatial] * nd), generator=generator,
                               dtype=torch.float64).to(dtype)
        raise NotImplementedError(f"{type(self).__name__}: implement make_input(module, m, generator) for {type(module).__name__}")

    def output(self, module: nn.Module, X: Any) -> torch.Tensor:
        """The module's tensor output for input ``X`` (the first element of a tuple output)."""
        out = module(*X) if isinstance(X, tuple) else module(X)
        return out[0] if isinstance(out, tuple) else out

    def reference_matrix(self, module: nn.Module, adapter: Any, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """W̄ written out independently (:mod:`~curvlib.testing.references`) for the built-in
        module types; ``None`` for other types (then only the round trip and the gradient
        checks apply).  ``tensors`` are shaped like ``adapter.params()``."""
        from types import SimpleNamespace

        known = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention, *ref._NORMS)
        if not isinstance(module, known):
            return None
        block = SimpleNamespace(module=module, name="layer" + adapter.block_name[len(adapter.name):], has_bias=adapter.has_bias)
        names = {id(p): n for n, p in module.named_parameters(recurse=False)}
        named = {f"layer.{names[id(p)]}": t.unsqueeze(0) for p, t in zip(adapter.params(), tensors)}
        return ref._block_matrix(block, named)[0]

    def adapters(self, module: nn.Module) -> list[Any]:
        """The adapters the registry creates for ``module`` (several for a grouped convolution)."""
        made = self.spec().factory.create(module, name="layer")
        _expect(bool(made), f"expected {self.kind!r} to create at least one adapter for {module}")
        return made

    def _modules(self, dtype: torch.dtype = torch.float64) -> list[nn.Module]:
        mods = [copy.deepcopy(mod).to(dtype) for mod in self.make_modules()]
        _expect(bool(mods), f"{type(self).__name__}.make_modules() returned no module")
        return mods

    def _capture(self, mod: nn.Module, adapters: Sequence[Any], X: Any) -> tuple[Any, torch.Tensor]:
        from curvlib.capture.hooks import capture_forward

        with capture_forward(adapters, batch_size=self.batch_size) as record:
            out = self.output(mod, X)
        return record, out

    def test_module_types_are_registered(self) -> None:
        """The kind declares ``module_types`` metadata, and every module of :meth:`make_modules` is one."""
        types = tuple(self.spec().metadata.get("module_types", ()))
        _expect(bool(types), f"expected layer kind {self.kind!r} registered with module_types=(...) metadata, got none")
        for mod in self._modules():
            _expect(isinstance(mod, types), f"expected {type(mod).__name__} to be one of the declared module_types {types}")

    def test_weight_bias_matrix_vector_round_trip(self) -> None:
        """pieces -> W̄ ``[g_dim, a_dim]`` -> pieces and pieces -> vec(W̄) ``[p_i]`` -> pieces are
        exact; vec stacks W̄'s columns; W̄ equals the independent reference where one exists."""
        for k, mod in enumerate(self._modules()):
            for ad in self.adapters(mod):
                where = f"{self.kind} on {mod} ({ad.block_name})"
                full = [_random(p.shape, 10 * k + j, p) for j, p in enumerate(ad.params())]
                tensors = ad.pieces(full)
                W = ad.params_to_matrix(tensors)
                _expect(tuple(W.shape) == (ad.g_dim, ad.a_dim),
                        f"{where}: expected W̄ of shape [g_dim, a_dim] = {[ad.g_dim, ad.a_dim]}, got {list(W.shape)}")
                _expect(ad.num_params == ad.a_dim * ad.g_dim == sum(t.numel() for t in tensors),
                        f"{where}: expected num_params = a_dim·g_dim = the parameter count of the block's pieces")
                back = ad.matrix_to_params(W)
                _expect(len(back) == len(tensors) and all(torch.equal(a, b) for a, b in zip(back, tensors)),
                        f"{where}: expected matrix_to_params(params_to_matrix(pieces)) == pieces exactly")
                v = ad.params_to_vector(tensors)
                _expect(torch.equal(v, ref.vec(W)), f"{where}: expected params_to_vector == vec(W̄) (columns stacked)")
                _expect(all(torch.equal(a, b) for a, b in zip(ad.vector_to_params(v), tensors)),
                        f"{where}: expected vector_to_params(params_to_vector(pieces)) == pieces exactly")
                expected = self.reference_matrix(mod, ad, full)
                if expected is not None:
                    _expect(torch.equal(W, expected), f"{where}: expected W̄ as DESIGN.md §1 maps it (references._block_matrix)")

    def test_uses_have_the_batch_and_the_block_dims(self) -> None:
        """Every call gives uses with rows ``[m, T, a_dim]`` on T = geometry.T positions."""
        for k, mod in enumerate(self._modules()):
            ads = self.adapters(mod)
            X = self.make_input(mod, self.batch_size, torch.Generator().manual_seed(k))
            with torch.no_grad():
                record, _ = self._capture(mod, ads, X)
            for ad, uses in zip(ads, record.uses):
                _expect(bool(uses), f"{self.kind} on {mod}: expected {ad.block_name!r} to record at least one use")
                for u in uses:
                    m, T, d = u.rows.shape
                    _expect((m, d) == (self.batch_size, ad.a_dim) and T == u.geometry.T,
                            f"{self.kind} on {mod}: expected rows [m={self.batch_size}, T={u.geometry.T}, a_dim={ad.a_dim}], "
                            f"got {[m, T, d]}")

    def test_statistics_reproduce_per_sample_gradients(self) -> None:
        """D_b = Σ_u Σ_t g_{b,t} ā_{b,t}ᵀ from the captured uses equals the per-sample gradient
        ∇_{W̄} ℓ_b from ``torch.func`` (vmap of grad), ℓ_b = Σ r_b ⊙ tanh(s_b)."""
        from curvlib.capture.hooks import backpropagate_columns
        from curvlib.curvatures.statistics import LayerStatistics, Use

        for k, mod in enumerate(self._modules()):
            ads = self.adapters(mod)
            m = self.batch_size
            X = self.make_input(mod, m, torch.Generator().manual_seed(k))
            record, s = self._capture(mod, ads, X)
            f = torch.tanh(s)
            R = _random(f.shape, 100 + k, f)
            gs = backpropagate_columns(f, record.uses, 1, lambda j: R)
            frozen = {n: p.detach() for n, p in mod.named_parameters()}
            buffers = dict(mod.named_buffers())
            trainable = [n for n, p in mod.named_parameters() if p.requires_grad]
            args = X if isinstance(X, tuple) else (X,)

            def ell(params, *xr):
                *xs, r = xr
                out = functional_call(mod, {**frozen, **params, **buffers}, tuple(x.unsqueeze(0) for x in xs))
                out = out[0] if isinstance(out, tuple) else out
                return (r.unsqueeze(0) * torch.tanh(out)).sum()

            per_sample = vmap(grad(ell), in_dims=(None, *([0] * (len(args) + 1))))({n: frozen[n] for n in trainable}, *args, R)
            names = {id(p): n for n, p in mod.named_parameters()}
            for ad, uses, g in zip(ads, record.uses, gs):
                stats = LayerStatistics(uses=[Use(u.rows, gu, u.geometry) for u, gu in zip(uses, g)], scale=1.0)
                expected = torch.stack(
                    [ad.params_to_matrix(ad.pieces([per_sample[names[id(p)]][b] for p in ad.params()])) for b in range(m)]
                )
                assert_close(stats.pair_gradients().detach(), expected.detach(),
                             msg=f"{self.kind} on {mod} ({ad.block_name}): expected Σ_t g_t ā_tᵀ == the per-sample "
                                 "gradient from torch.func")

    def test_float32_module_keeps_its_dtype(self) -> None:
        """A float32 module gives float32 rows and W̄."""
        for k, mod in enumerate(self._modules(torch.float32)):
            ads = self.adapters(mod)
            X = self.make_input(mod, self.batch_size, torch.Generator().manual_seed(k))
            with torch.no_grad():
                record, _ = self._capture(mod, ads, X)
            for ad, uses in zip(ads, record.uses):
                dtypes = {u.rows.dtype for u in uses} | {ad.to_matrix().dtype}
                _expect(dtypes == {torch.float32},
                        f"{self.kind}: expected float32 rows and W̄ for a float32 module, got {sorted(map(str, dtypes))}")
