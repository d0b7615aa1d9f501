"""Every family's output is checked where curvlib receives it (docs/plugin_guide.md §7).

Misbehaving stub kinds are registered programmatically in a registry of curvlib's built-ins
(``Registry.register(..., distribution=...)``, what an entry point does for an installed
distribution).  Each misbehaves on one layer only (the last, d_g = 3), so that the error
must name that layer; each is used through the family's public entry point
(``curvlib.approximate``, ``curvlib.damped_inverse``, ``curvlib.two_level``) and through
``NaturalGradient(...).step(...)``.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, ClassVar

import pytest
import torch
from pydantic import Field
from torch import nn

import curvlib
from curvlib.approximators import ApproximatorOptions, BlockApproximator, FitInfo, LayerFit, kfac_factors
from curvlib.approximators.base import (
    PSD_RTOL,
    BlockDeclaration,
    fit_structure_problem,
    fit_value_flags,
    single_term_definite_flag,
)
from curvlib.coarse import CoarseBasis, CoarseSpace, Partition
from curvlib.config import NoOptions, StrictModel
from curvlib.curvatures.kinds import GGNCurvature
from curvlib.curvatures.operator import CurvatureOperator
from curvlib.damping import BlockInverse, Damping
from curvlib.damping.base import InverseInfo
from curvlib.errors import CurvlibError, NumericalError, NumericalWarning, PluginError, PluginOutputError
from curvlib.linalg import DampedKroneckerFactors, KroneckerFactored, KroneckerSum, LayerBlockOperator, ShiftSolvable
from curvlib.optim import NaturalGradient
from curvlib.plugins import hookimpl, load_registry

DT = torch.float64
DIST = "misbehaving-dist"
PLUGIN = "misbehaving"
BAD_LAYER = "2"  # the second Linear layer of the model: d_a = 6, d_g = 3
LAM = 1e-2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=DT), torch.randint(0, 3, (8,), generator=g)


def _bad(g_dim: int) -> bool:
    """The stubs misbehave on the last layer only (d_g = 3)."""
    return int(g_dim) == 3


# --------------------------------------------------------------------------- approximators


def _indefinite(d: int) -> torch.Tensor:
    """(1 − α)I + α·11ᵀ with α = 1.5: a positive diagonal (1), eigenvalues −0.5 (d − 1 times)
    and 1 + 1.5(d − 1) — indefinite, yet no diagonal entry betrays it."""
    return -0.5 * torch.eye(d, dtype=DT) + 1.5 * torch.ones(d, d, dtype=DT)


class LooseKronecker(KroneckerFactored):
    """A plugin's own Kronecker-factored block that checks nothing about its terms."""

    def __init__(self, terms, a_dim, b_dim):
        self._terms, self._a, self._b = tuple(terms), a_dim, b_dim

    terms = property(lambda self: self._terms)
    a_dim = property(lambda self: self._a)
    b_dim = property(lambda self: self._b)
    dtype = property(lambda self: DT)
    device = property(lambda self: torch.device("cpu"))

    def _apply(self, X):
        return sum(B @ X @ A.T for A, B in self._terms)


def _corrupt(mode: str, A: torch.Tensor, G: torch.Tensor, kind: str) -> Any:
    info = FitInfo(method=kind)
    if mode == "none":
        return None
    if mode == "not_a_fit":
        return KroneckerSum([(A, G)])
    if mode == "wrong_shape":
        big = torch.eye(A.shape[0] + 1, dtype=DT)
        big[:-1, :-1] = A
        return LayerFit(block=KroneckerSum([(big, G)]), info=info)
    if mode == "float32":
        return LayerFit(block=KroneckerSum([(A.float(), G.float())]), info=info)
    if mode == "nan":
        A = A.clone()
        A[1, 2] = float("nan")
        return LayerFit(block=KroneckerSum([(A, G)]), info=info)
    if mode == "asymmetric":
        return LayerFit(block=KroneckerSum([(A + torch.triu(torch.ones_like(A), 1) * A.abs().max(), G)]), info=info)
    if mode == "negative":
        return LayerFit(block=KroneckerSum([(-A, G)]), info=info)
    if mode == "indefinite":
        return LayerFit(block=KroneckerSum([(_indefinite(A.shape[0]), G)]), info=info)
    if mode == "second_term_wrong_shape":
        return LayerFit(block=LooseKronecker([(A, G), (A, torch.eye(G.shape[0] + 2, dtype=DT))], A.shape[0], G.shape[0]),
                        info=info)
    if mode == "two_terms":  # the kind declares one
        return LayerFit(block=KroneckerSum([(A, G), (A, G)]), info=info)
    raise AssertionError(mode)


class _Misbehaving(BlockApproximator):
    mode: ClassVar[str] = ""

    def fit(self, stats, previous=None):
        (A, G), *_ = kfac_factors(stats)
        if not _bad(stats.g_dim):
            return LayerFit(block=KroneckerSum([(A, G)]), info=FitInfo(method=self.kind))
        return _corrupt(self.mode, A, G, self.kind)


APPROX_MODES = ["none", "not_a_fit", "wrong_shape", "float32", "nan", "asymmetric", "negative", "indefinite",
                "second_term_wrong_shape", "two_terms"]
APPROX_CLASSES = {
    mode: type(f"Approx_{mode}", (_Misbehaving,), {
        "kind": f"bad_{mode}",
        "mode": mode,
        # ``two_terms`` breaks its own declaration; the others declare nothing
        "blocks": BlockDeclaration((KroneckerFactored,), (1, 1)) if mode == "two_terms" else None,
    })
    for mode in APPROX_MODES
}


class DeclaresExact(_Misbehaving):
    """Declares shift-solvable blocks, returns Kronecker sums."""

    kind = "bad_declares_exact"
    mode = "good"
    blocks = BlockDeclaration((ShiftSolvable,))

    def fit(self, stats, previous=None):
        (A, G), *_ = kfac_factors(stats)
        return LayerFit(block=KroneckerSum([(A, G)]), info=FitInfo(method=self.kind))


class NotAnApproximator:
    """A factory product with a ``fit`` but not a BlockApproximator."""

    def __init__(self, options):
        self.options = options


# --------------------------------------------------------------------------- dampings


class BadDampingOptions(StrictModel):
    value: float = Field(LAM, gt=0)


class IdentityInverse(BlockInverse):
    """I (or NaN, ``nan=True``) as an 'inverse'."""

    def __init__(self, a_dim, b_dim, dtype, *, nan=False):
        super().__init__(a_dim=a_dim, b_dim=b_dim, dtype=dtype, device=torch.device("cpu"),
                         info=InverseInfo(kind="bad", method="identity", lam=LAM))
        self._nan = nan

    def _solve(self, X):
        return X * float("nan") if self._nan else X.clone()


class NaNFactorsInverse(IdentityInverse, DampedKroneckerFactors):
    """Declares damped factors, and one of them is NaN."""

    @property
    def damped_factors(self):
        A = torch.eye(self.a_dim, dtype=self.dtype)
        A[0, 0] = float("nan")
        return A, torch.eye(self.b_dim, dtype=self.dtype)


class _MisbehavingDamping(Damping):
    options_model = BadDampingOptions
    mode: ClassVar[str] = ""

    def _invert(self, block):
        a, b = int(block.a_dim), int(block.b_dim)
        if not _bad(block.b_dim):
            return IdentityInverse(a, b, block.dtype)
        if self.mode == "none":
            return None
        if self.mode == "wrong_shape":
            return IdentityInverse(a + 1, b, block.dtype)
        if self.mode == "float32":
            return IdentityInverse(a, b, torch.float32)
        if self.mode == "nan_factors":
            return NaNFactorsInverse(a, b, block.dtype)
        if self.mode == "nan_products":
            return IdentityInverse(a, b, block.dtype, nan=True)
        raise AssertionError(self.mode)


DAMPING_MODES = ["none", "wrong_shape", "float32", "nan_factors", "nan_products"]
DAMPING_CLASSES = {
    mode: type(f"Damping_{mode}", (_MisbehavingDamping,), {"kind": f"bad_{mode}", "mode": mode})
    for mode in DAMPING_MODES
}


# --------------------------------------------------------------------------- coarse spaces


class _MisbehavingCoarse(CoarseSpace):
    Options = NoOptions
    mode: ClassVar[str] = ""

    def basis(self, ctx):
        ones = [torch.ones(n, 1, dtype=ctx.dtype, device=ctx.device) for n in ctx.partition.sizes]
        if self.mode == "not_a_basis":
            return torch.cat(ones)
        if self.mode == "wrong_partition":  # one group over everything, not the layers
            return CoarseBasis(Partition([slice(0, ctx.p)], ctx.p), [torch.cat(ones)])
        if self.mode == "float32":
            return CoarseBasis(ctx.partition, [V.float() for V in ones])
        if self.mode == "nonfinite":
            ones[-1][0, 0] = float("nan")  # the last layer's column
            return CoarseBasis(ctx.partition, ones)
        raise AssertionError(self.mode)


COARSE_MODES = ["not_a_basis", "wrong_partition", "float32", "nonfinite"]
COARSE_CLASSES = {
    mode: type(f"Coarse_{mode}", (_MisbehavingCoarse,), {"kind": f"bad_{mode}", "mode": mode}) for mode in COARSE_MODES
}


# --------------------------------------------------------------------------- curvatures


class Float32Statistics:
    """A curvature kind whose operator's statistics are float32 for a float64 model."""

    def __init__(self, options):
        self.options = options

    def build(self, model, loss_fn, batch, *, generator=None, registry=None, **_):
        F = GGNCurvature().build(model, loss_fn, batch, registry=registry)
        stats = [F.statistics(i) for i in range(len(F.layers))]
        stats[-1] = stats[-1].to(torch.float32)
        return CurvatureOperator(F.layers, list(F.excluded), stats, kind="float32_stats", loss=F.loss,
                                 gradient=[F.gradient_vector()[L.slice].reshape(L.a_dim, L.g_dim).T for L in F.layers])


class _Plugin:
    @hookimpl
    def curvlib_register_approximators(self, registry):
        for mode, cls in APPROX_CLASSES.items():
            registry.add(f"bad_{mode}", cls, options=ApproximatorOptions)
        registry.add("bad_declares_exact", DeclaresExact, options=ApproximatorOptions)
        registry.add("bad_factory", NotAnApproximator, options=ApproximatorOptions)

    @hookimpl
    def curvlib_register_dampings(self, registry):
        for mode, cls in DAMPING_CLASSES.items():
            registry.add(f"bad_{mode}", cls, options=BadDampingOptions)

    @hookimpl
    def curvlib_register_coarse_spaces(self, registry):
        for mode, cls in COARSE_CLASSES.items():
            registry.add(f"bad_{mode}", cls, options=NoOptions)

    @hookimpl
    def curvlib_register_curvatures(self, registry):
        registry.add("float32_stats", Float32Statistics, options=NoOptions)


@pytest.fixture(scope="module")
def registry():
    reg = load_registry(external=False)
    reg.register(_Plugin(), name=PLUGIN, distribution=DIST)
    return reg


@pytest.fixture(scope="module")
def F(registry):
    model = make_model()
    return curvlib.curvature("ggn", model, nn.CrossEntropyLoss(), make_batch(), registry=registry)


def assert_names(exc: BaseException, kind: str, layer: str | None = BAD_LAYER, *expected: str) -> None:
    """The message names the kind, the distribution, the layer and what was expected/came."""
    text = str(exc)
    assert isinstance(exc, CurvlibError), type(exc)
    assert f"kind {kind!r}" in text, text
    assert f"distribution {DIST!r}" in text and f"plugin {PLUGIN!r}" in text, text
    if layer is not None:
        assert f"layer {layer!r}" in text or f"[{layer!r}]" in text, text
    for piece in expected:
        assert piece in text, (piece, text)


def ng_step(config: dict, registry) -> NaturalGradient:
    """One NaturalGradient step on a fresh model (the first step refreshes and inverts)."""
    model = make_model()
    X, y = make_batch()
    cfg = {"curvature": "ggn", "damping": {"kind": "tikhonov", "value": LAM}, **config}
    opt = NaturalGradient(model, nn.CrossEntropyLoss(), cfg, lr=0.1, registry=registry)
    opt.zero_grad()
    nn.CrossEntropyLoss()(model(X), y).backward()
    opt.step(batch=(X, y))
    return opt


# --------------------------------------------------------------------------- approximator outputs

#: mode -> what the message must say (expected vs what came)
APPROX_EXPECT = {
    "none": ("fit() returned None", "expected a curvlib.approximators.LayerFit"),
    "not_a_fit": ("fit() returned a KroneckerSum", "expected a curvlib.approximators.LayerFit"),
    "wrong_shape": ("(d_a, d_g) = (7, 3)", "expected (6, 3)"),
    "float32": ("torch.float32", "expected torch.float64"),
    "nan": ("factor A_0 [6, 6] has 1 non-finite entries", "expected finite factors"),
    "asymmetric": ("not symmetric", "expected both factors symmetric"),
    "negative": ("A [6, 6] NSD", "B [3, 3] PSD", "diagonal entries A_ii·B_jj of the wrong sign"),
    "second_term_wrong_shape": ("term 1: factor B_1 has shape [5, 5]", "expected [d_g, d_g] = [3, 3]"),
    "two_terms": ("returned 2 Kronecker term(s)", "the kind declares KroneckerFactored blocks of 1 Kronecker term(s)"),
}


@pytest.mark.parametrize("mode", sorted(APPROX_EXPECT))
def test_approximator_output_is_checked_by_approximate(F, registry, mode):
    with pytest.raises(PluginOutputError) as info:
        curvlib.approximate(F, f"bad_{mode}", registry=registry)
    assert_names(info.value, f"bad_{mode}", BAD_LAYER, "approximator", *APPROX_EXPECT[mode])
    assert isinstance(info.value, PluginError)


@pytest.mark.parametrize("mode", sorted(APPROX_EXPECT))
def test_approximator_output_is_checked_in_a_natural_gradient_step(registry, mode):
    with pytest.raises(PluginOutputError) as info:
        ng_step({"approximator": f"bad_{mode}"}, registry)
    assert_names(info.value, f"bad_{mode}", BAD_LAYER, *APPROX_EXPECT[mode])


def test_a_factory_that_builds_no_approximator_is_named(F, registry):
    with pytest.raises(PluginOutputError) as info:
        curvlib.approximate(F, "bad_factory", registry=registry)
    assert_names(info.value, "bad_factory", None, "NotAnApproximator", "expected a curvlib.approximators.BlockApproximator")
    with pytest.raises(PluginOutputError) as info:
        ng_step({"approximator": "bad_factory"}, registry)
    assert_names(info.value, "bad_factory", None, "BlockApproximator")


def test_a_block_that_breaks_its_declaration_is_named(F, registry):
    with pytest.raises(PluginOutputError) as info:
        curvlib.approximate(F, "bad_declares_exact", registry=registry)
    # every layer breaks it: the first one is named
    assert_names(info.value, "bad_declares_exact", "0", "KroneckerSum block, which is not ShiftSolvable",
                 "the kind declares ShiftSolvable blocks")


def test_an_indefinite_single_term_is_warned_once_before_inversion_and_takes_the_damping_rule(F, registry):
    """Its diagonal has the right sign, so approximate() accepts it; the Cholesky test runs once,
    before the first inversion (where the factors are decomposed anyway), and warns naming the
    kind, its distribution and the layer; the documented fallback is the damping's rule for
    indefinite blocks — tikhonov counts negative joint eigenvalues as 0: (A⁺ ⊗ G + λI)⁻¹."""
    approx = curvlib.approximate(F, "bad_indefinite", registry=registry)
    (A, G), = approx[1].terms
    assert float(torch.linalg.eigvalsh(A)[0]) < -0.4 and bool((torch.diagonal(A) > 0).all())
    with pytest.warns(NumericalWarning) as caught:
        inv = curvlib.damped_inverse(approx, "tikhonov", value=LAM, registry=registry)
    text = " ".join(str(w.message) for w in caught)
    assert "approximator kind 'bad_indefinite'" in text and f"distribution {DIST!r}" in text, text
    assert f"layers ['{BAD_LAYER}']" in text and "indefinite single-term" in text, text
    e, Q = torch.linalg.eigh(A)
    A_plus = (Q * e.clamp_min(0)) @ Q.T
    M = torch.kron(A_plus, G) + LAM * torch.eye(A.shape[0] * G.shape[0], dtype=DT)
    v = torch.randn(M.shape[0], generator=torch.Generator().manual_seed(2), dtype=DT)
    torch.testing.assert_close(inv.blocks[1] @ v, torch.linalg.solve(M, v), rtol=1e-9, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)  # checked once per approximation
        curvlib.damped_inverse(approx, "tikhonov", value=LAM, registry=registry)
    with pytest.warns(NumericalWarning, match=r"approximator kind 'bad_indefinite' \(distribution 'misbehaving-dist'"):
        ng_step({"approximator": "bad_indefinite"}, registry)


def test_the_origin_survives_the_approximation_state_dict(F, registry):
    """The preconditioner keeps its approximation through state_dict()/from_state_dict(): the
    origin (kind, distribution) travels with it, and the check before inversion runs again."""
    approx = curvlib.approximate(F, "bad_indefinite", registry=registry)
    again = type(approx).from_state_dict(approx.state_dict())
    assert again.origin == approx.origin and again.origin.distribution == DIST
    with pytest.warns(NumericalWarning, match=r"misbehaving-dist.*layers \['2'\]"):
        again.check_before_inversion()


# --------------------------------------------------------------------------- PSD: the tolerance and the built-ins


def _single_term_checks(A: torch.Tensor, G: torch.Tensor) -> tuple[bool, bool]:
    """(the O(d) diagonal test of approximate() passes, the Cholesky test before inversion passes)."""
    fit = LayerFit(block=KroneckerSum([(A, G)]), info=FitInfo(method="t"))
    return bool(fit_value_flags(fit).all()), bool(single_term_definite_flag(fit.block))


def test_psd_tolerance_accepts_rounding_and_rejects_a_real_negative_part():
    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=DT))[0]
    G = torch.eye(3, dtype=DT)

    def with_min(lmin: float) -> torch.Tensor:
        e = torch.tensor([lmin, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=DT)
        return (Q * e) @ Q.T

    norm = float(torch.linalg.matrix_norm(with_min(0.0)))
    assert _single_term_checks(with_min(-1e-6 * norm), G) == (True, True)      # rounding-sized: PSD
    assert _single_term_checks(with_min(-0.5 * PSD_RTOL * norm), G)[1] is True
    assert _single_term_checks(with_min(-3 * PSD_RTOL * norm), G)[1] is False  # beyond τ‖A‖_F: not PSD
    assert _single_term_checks(-with_min(0.0), -G) == (True, True)             # both NSD: (−A)⊗(−G) = A⊗G
    assert _single_term_checks(-with_min(0.0), G) == (False, False)            # NSD ⊗ PSD
    assert _single_term_checks(torch.zeros(6, 6, dtype=DT), -G) == (True, True)  # a zero factor: the zero block


@pytest.mark.parametrize("kind", ["kfac", "kpsvd", {"kind": "deflation", "rank": 1}, {"kind": "lanczos", "rank": 1},
                                  "deflation", "kfac_corrected", "exact_block"])
@pytest.mark.parametrize("arch", ["mlp", "cnn", "dead_inputs"])
def test_builtin_kinds_pass_the_same_checks(kind, arch):
    """curvlib's own kinds go through the same checks (approximate, then the deferred PSD test
    and the inverse checks of damped_inverse), on a CNN and on inputs with dead (all-zero)
    features, whose KFAC factors are singular."""
    torch.manual_seed(0)
    if arch == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).to(DT)
        X, y = torch.randn(6, 1, 5, 5, dtype=DT), torch.randint(0, 3, (6,))
    else:
        model = make_model()
        X, y = make_batch()
        if arch == "dead_inputs":
            X[:, :2] = 0
    reg = load_registry(external=False)
    F = curvlib.curvature("ggn", model, nn.CrossEntropyLoss(), (X, y), registry=reg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)  # no fallback either
        approx = curvlib.approximate(F, kind, registry=reg)
        inv = curvlib.damped_inverse(approx, "tikhonov", value=LAM, registry=reg)
    assert torch.isfinite(inv @ F.gradient_vector()).all()
    assert approx.origin.distribution == "curvlib" and inv.damping.origin.distribution == "curvlib"


def test_builtin_kpsvd_on_a_banded_conv_block_is_warned_not_refused():
    """The banded conv block (band_radius="kernel", (3.35)) is not PSD itself, so its nearest
    Kronecker product can have an indefinite factor: a NumericalWarning naming kpsvd and the
    layers, and the damping's documented clamp — never an error.  The exact block
    (band_radius=None) gives PSD factors (Prop. 3.2): no warning."""
    from curvlib.testing.models import tiny_resnet

    case = tiny_resnet(m=8)
    reg = load_registry(external=False)
    F = curvlib.curvature("ggn", case.model, case.loss_fn, (case.X, case.y), registry=reg)
    banded = curvlib.approximate(F, "kpsvd", registry=reg)
    with pytest.warns(NumericalWarning, match=r"approximator kind 'kpsvd' \(distribution 'curvlib'.*indefinite.*'blocks.0.conv1'"):
        inv = curvlib.damped_inverse(banded, "heuristic", value=LAM, registry=reg)
    assert torch.isfinite(inv @ F.gradient_vector()).all()
    exact = curvlib.approximate(F, "kpsvd", band_radius=None, registry=reg)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NumericalWarning)
        curvlib.damped_inverse(exact, "heuristic", value=LAM, registry=reg)


# --------------------------------------------------------------------------- curvature outputs


def test_curvature_statistics_are_checked(F, registry):
    model = make_model()
    G = curvlib.curvature("float32_stats", model, nn.CrossEntropyLoss(), make_batch(), registry=registry)
    with pytest.raises(PluginOutputError) as info:
        curvlib.approximate(G, "kfac", registry=registry)
    assert_names(info.value, "float32_stats", BAD_LAYER, "curvature", "torch.float32", "expected torch.float64",
                 "layer kind 'linear' (distribution 'curvlib'")
    with pytest.raises(PluginOutputError) as info:
        ng_step({"curvature": "float32_stats"}, registry)
    assert_names(info.value, "float32_stats", BAD_LAYER, "torch.float32")


# --------------------------------------------------------------------------- damping outputs

DAMPING_EXPECT = {
    "none": (PluginOutputError, ("invert() returned None", "expected a curvlib.damping.BlockInverse")),
    "wrong_shape": (PluginOutputError, ("(d_a, d_g) = (7, 3)", "expected (6, 3)")),
    "float32": (PluginOutputError, ("torch.float32", "expected torch.float64")),
    "nan_factors": (PluginOutputError, ("damped factor A [6, 6] has 1 non-finite entries", "expected finite")),
    "nan_products": (NumericalError, ("the inverse produced them from a finite right-hand side",)),
}


@pytest.mark.parametrize("mode", sorted(DAMPING_EXPECT))
def test_damping_output_is_checked_by_damped_inverse(F, registry, mode):
    error, expected = DAMPING_EXPECT[mode]
    approx = curvlib.approximate(F, "kfac", registry=registry)
    with pytest.raises(error) as info:
        inv = curvlib.damped_inverse(approx, f"bad_{mode}", value=LAM, registry=registry)
        inv @ F.gradient_vector()  # the products of an inverse exposing no factors are checked where applied
    assert_names(info.value, f"bad_{mode}", BAD_LAYER, "damping", *expected)


@pytest.mark.parametrize("mode", sorted(set(DAMPING_EXPECT) - {"nan_products"}))
def test_damping_output_is_checked_in_a_natural_gradient_step(registry, mode):
    error, expected = DAMPING_EXPECT[mode]
    with pytest.raises(error) as info:
        ng_step({"damping": {"kind": f"bad_{mode}", "value": LAM}}, registry)
    assert_names(info.value, f"bad_{mode}", BAD_LAYER, *expected)


def test_nonfinite_products_in_a_natural_gradient_step_are_named(registry):
    """An inverse that exposes no factors is checked where applied: the optimizer reports a
    non-finite direction from finite gradients — by raising the NumericalError, or by skipping
    the step with a NumericalWarning carrying its message — naming the damping and the layer."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ng_step({"damping": {"kind": "bad_nan_products", "value": LAM}}, registry)
        except NumericalError as exc:
            reports = [exc]
        else:
            reports = [NumericalError(str(w.message)) for w in caught if issubclass(w.category, NumericalWarning)]
    assert reports, "expected a NumericalError or a NumericalWarning for the non-finite direction"
    assert_names(reports[-1], "bad_nan_products", BAD_LAYER, *DAMPING_EXPECT["nan_products"][1])


# --------------------------------------------------------------------------- coarse space outputs

COARSE_EXPECT = {
    "not_a_basis": (None, ("basis() returned a Tensor", "expected a curvlib.coarse.CoarseBasis")),
    "wrong_partition": ("0", ("basis over 1 groups", "expected the context's partition, 2 groups",
                              "group 0 ('0') has 43 rows, expected 25")),
    "float32": (None, ("columns in torch.float32", "expected torch.float64")),
}


def _first_level(F, registry):
    return curvlib.damped_inverse(curvlib.approximate(F, "kfac", registry=registry), "tikhonov", value=LAM,
                                  registry=registry)


@pytest.mark.parametrize("mode", sorted(COARSE_EXPECT))
def test_coarse_space_output_is_checked_by_two_level(F, registry, mode):
    layer, expected = COARSE_EXPECT[mode]
    pre = curvlib.two_level(_first_level(F, registry), F, f"bad_{mode}", LAM, registry=registry)
    with pytest.raises(PluginOutputError) as info:
        pre @ F.gradient_vector()
    assert_names(info.value, f"bad_{mode}", layer, "coarse space", *expected)


@pytest.mark.parametrize("mode", sorted(COARSE_EXPECT))
def test_coarse_space_output_is_checked_in_a_natural_gradient_step(registry, mode):
    layer, expected = COARSE_EXPECT[mode]
    with pytest.raises(PluginOutputError) as info:
        ng_step({"coarse_space": f"bad_{mode}"}, registry)
    assert_names(info.value, f"bad_{mode}", layer, *expected)


def test_nonfinite_coarse_columns_take_the_documented_fallback_named(F, registry):
    """Non-finite columns are dropped (curvlib.coarse.two_level), with a NumericalWarning that
    names the kind, its distribution and the layer."""
    first = _first_level(F, registry)
    u = F.gradient_vector()
    pre = curvlib.two_level(first, F, "bad_nonfinite", LAM, registry=registry)
    with pytest.warns(NumericalWarning) as caught:
        out = pre @ u
    text = " ".join(str(w.message) for w in caught)
    assert "coarse space kind 'bad_nonfinite'" in text and f"distribution {DIST!r}" in text and f"['{BAD_LAYER}']" in text
    assert torch.isfinite(out).all() and pre.info.dropped_columns == (1,)
    # the same as the layer-0 column alone
    ref = curvlib.two_level(first, F, DroppedLast(), LAM)
    torch.testing.assert_close(out, ref @ u)
    with pytest.warns(NumericalWarning, match="bad_nonfinite"):
        ng_step({"coarse_space": "bad_nonfinite"}, registry)


class DroppedLast(CoarseSpace):
    """Nicolaides on layer 0 only (what the fallback leaves of ``bad_nonfinite``)."""

    kind = "dropped_last"

    def basis(self, ctx):
        cols = [torch.ones(ctx.partition.sizes[0], 1, dtype=ctx.dtype)] + [
            torch.zeros(n, 0, dtype=ctx.dtype) for n in ctx.partition.sizes[1:]]
        return CoarseBasis(ctx.partition, cols)


def test_builtin_origin_is_named_curvlib(F):
    reg = load_registry(external=False)
    approx = curvlib.approximate(F, "kfac", registry=reg)
    assert (approx.origin.kind, approx.origin.distribution, approx.origin.plugin) == (
        "kfac", "curvlib", "builtin_approximators")
    pre = curvlib.two_level(_first_level(F, reg), F, "nicolaides", LAM, registry=reg)
    assert pre.coarse_space.origin.distribution == "curvlib"
    opt = ng_step({}, reg)
    assert opt.preconditioner.damping.origin.distribution == "curvlib"


def test_opaque_blocks_get_the_structural_checks_only():
    """Opaque blocks (neither Kronecker-factored nor with exposed factors) get the type, size,
    dtype and device checks only: their tensors are their own."""

    class Opaque(LayerBlockOperator):
        a_dim = property(lambda self: 2)
        b_dim = property(lambda self: 3)
        dtype = property(lambda self: DT)
        device = property(lambda self: torch.device("cpu"))

        def _apply(self, X):
            return X

    fit = LayerFit(block=Opaque(), info=FitInfo(method="opaque"))
    assert fit_structure_problem(fit, a_dim=2, g_dim=3, dtype=DT, device=torch.device("cpu")) is None
    assert fit_value_flags(fit) is None
    assert "(d_a, d_g) = (2, 3)" in fit_structure_problem(fit, a_dim=3, g_dim=3, dtype=DT, device=torch.device("cpu"))


def test_a_plugin_registered_from_a_namespace_is_named_with_its_distribution():
    """The same stubs register from a plain namespace object, as the plugin guide does."""
    reg = load_registry(external=False)
    cls = APPROX_CLASSES["negative"]

    @hookimpl
    def curvlib_register_approximators(registry):
        registry.add("bad_negative", cls, options=ApproximatorOptions)

    reg.register(types.SimpleNamespace(curvlib_register_approximators=curvlib_register_approximators),
                 name="ns", distribution="ns-dist")
    model = make_model()
    G = curvlib.curvature("ggn", model, nn.CrossEntropyLoss(), make_batch(), registry=reg)
    with pytest.raises(PluginOutputError, match=r"approximator kind 'bad_negative' \(distribution 'ns-dist', plugin 'ns'\) "
                                                r"for layer '2'"):
        curvlib.approximate(G, "bad_negative", registry=reg)


def test_the_indefiniteness_check_is_skipped_only_for_kinds_declaring_psd_factors(F, registry, monkeypatch):
    """kfac declares Gram-matrix factors (PSD by construction): no Cholesky check before its
    inversion; kpsvd's power-iteration factors are checked."""
    import curvlib.approximators.api as api

    calls = []
    real = api.single_term_definite_flag
    monkeypatch.setattr(api, "single_term_definite_flag", lambda block: (calls.append(1), real(block))[1])
    kfac = curvlib.approximate(F, "kfac", registry=registry)
    assert kfac.psd_factors
    curvlib.damped_inverse(kfac, "heuristic", value=LAM, registry=registry)
    assert calls == []
    kpsvd = curvlib.approximate(F, "kpsvd", registry=registry)
    assert not kpsvd.psd_factors
    curvlib.damped_inverse(kpsvd, "heuristic", value=LAM, registry=registry)
    assert len(calls) == len(kpsvd.layer_indices)


def test_psd_by_construction_checks_finiteness_only_and_clears_false_alarms():
    from curvlib.approximators.base import FitInfo, LayerFit, fit_value_flags, fit_value_problem
    from curvlib.linalg import KroneckerSum

    def fit_of(A, B):
        return LayerFit(block=KroneckerSum([(A, B)]), info=FitInfo(method="kfac", refresh=1, rho=0.0), state={})

    A, B = torch.eye(3, dtype=DT), torch.eye(2, dtype=DT)
    assert fit_value_flags(fit_of(A, B), psd_by_construction=True).tolist() == [True, True, True]
    bad = A.clone()
    bad[0, 1] = float("nan")
    assert fit_value_flags(fit_of(bad, B), psd_by_construction=True).tolist() == [False, True, True]
    assert "non-finite" in fit_value_problem(fit_of(bad, B))
    huge = torch.full((3, 3), torch.finfo(DT).max / 2, dtype=DT)  # finite, but its sum overflows
    assert fit_value_flags(fit_of(huge, B), psd_by_construction=True).tolist() == [False, True, True]
    assert fit_value_problem(fit_of(huge, B)) is None  # the exact check clears the alarm


def test_the_psd_declaration_survives_the_state_dict(F, registry):
    """The preconditioner keeps its approximation through state_dict()/from_state_dict()."""
    for kind, psd in (("kfac", True), ("kpsvd", False)):
        approx = curvlib.approximate(F, kind, registry=registry)
        assert type(approx).from_state_dict(approx.state_dict()).psd_factors is psd
