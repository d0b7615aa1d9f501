"""Cross-plugin compatibility is checked when the preconditioner is built, before any data.

Every built-in combination is built, and the verdict compared with an oracle written here
from the documented behaviour of each kind (not from the declarations under test); each
rejected rule is shown to be a real failure at the first step when the check is bypassed;
plugin kinds are checked when they declare what they make and need, and left to their first
use when they do not.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any

import pytest
import torch
from torch import nn

import curvlib
from curvlib.approximators import ApproximatorOptions, BlockApproximator, FitInfo, LayerFit
from curvlib.approximators.base import BlockDeclaration
from curvlib.approximators.exact import ExactBlock
from curvlib.coarse import CoarseBasis, CoarseSpace
from curvlib.config import NoOptions
from curvlib.curvatures.kinds import GGNCurvature, HessianCurvature
from curvlib.damping.base import BlockRequirement
from curvlib.damping.tikhonov import TikhonovDamping, TikhonovOptions
from curvlib.errors import ConfigError, CurvlibError, NumericalWarning
from curvlib.linalg import FactorEigenbasis, ShiftSolvable
from curvlib.optim import NaturalGradient
from curvlib.plugins import hookimpl, load_registry
from curvlib.precond.config import PreconditionerConfig, resolve_config
from curvlib.precond.preconditioner import Preconditioner

DT = torch.float64
LAM = 1e-2


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def make_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, generator=g, dtype=DT), torch.randint(0, 3, (6,), generator=g)


# --------------------------------------------------------------------------- the oracle
# What each built-in kind does, from its documentation (approximators/*.py, damping/*.py,
# coarse/spaces.py, precond/references.py):

#: approximator config -> ("kronecker", possible numbers of terms) or ("shift", None)
def blocks_of(approx: dict) -> tuple[str, set[int] | None]:
    kind = approx["kind"]
    if kind == "exact_block":
        return "sampled", None  # an ExactBlock: tikhonov_solve and its statistics, no factors
    if kind in ("kfac_lowrank", "kpsvd_tensor"):
        return "shift", None  # A⊗G + USUᵀ, ⊗_j A_j: tikhonov_solve, no (two-sided) factors
    if kind == "singd":
        return "own_inverse", None  # K Kᵀ ⊗ C Cᵀ, its own inverse: no factors, no tikhonov_solve
    terms = {"kfac": {1, 2},  # two for a weight tied in transposed form
             "kpsvd": {1}, "kfac_corrected": {2}, "tnt": {1}}.get(kind)
    if terms is None:
        terms = {approx.get("rank", 2)}  # deflation, lanczos
    return "kronecker", terms


def inner_damping(damping: dict) -> str:
    return damping.get("inner", "tikhonov") if damping["kind"] == "levenberg_marquardt" else damping["kind"]


def damping_inverts(damping: dict, blocks: tuple[str, set[int] | None]) -> bool:
    """heuristic: the π-split of one or two Kronecker terms; kron_inverse: sampled blocks (the
    exact block's statistics); inverse_factors: the blocks that carry their inverse (singd), and
    only they; tikhonov: any other block."""
    kind, terms = blocks
    if (damping["kind"] == "inverse_factors") != (kind == "own_inverse"):  # applies exactly those blocks' inverses
        return False
    if inner_damping(damping) == "heuristic":
        return kind == "kronecker" and min(terms) <= 2
    if damping["kind"] == "inverse_free":  # the π-split factors of one term
        return kind == "kronecker" and min(terms) <= 1
    if damping["kind"] == "kron_inverse":
        return kind == "sampled"
    return True


def exposes_eigen_or_factors(damping: dict, blocks: tuple[str, set[int] | None]) -> bool:
    """Whether some possible first-level inverse exposes an eigenbasis or damped factors:
    PiSplitInverse (1 term), TwoTermHeuristicInverse (2), EigenTikhonovInverse (tikhonov, 1)."""
    kind, terms = blocks
    if kind != "kronecker":
        return False
    if damping["kind"] in ("inverse_free", "kron_inverse"):  # their inverses expose neither
        return False
    usable = {1, 2} if inner_damping(damping) == "heuristic" else {1}
    return bool(terms & usable)


def compatible(curvature: str, approx: dict, damping: dict, coarse: dict | None, preconditioner: str) -> bool:
    if curvature == "hessian":  # products only: no statistics to fit, no J for Woodbury
        return False
    if preconditioner != "kronecker":
        return True
    blocks = blocks_of(approx)
    if not damping_inverts(damping, blocks):
        return False
    if coarse is not None and coarse["kind"] == "spectral" and coarse.get("source") == "first_level":
        return exposes_eigen_or_factors(damping, blocks)
    return True


APPROXIMATOR_VARIANTS = {"deflation": [{"rank": 1}, {}, {"rank": 3}], "lanczos": [{"rank": 1}, {}, {"rank": 3}]}
DAMPING_VARIANTS = {"levenberg_marquardt": [{}, {"inner": "heuristic"}]}
COARSE_VARIANTS = {"spectral": [{}, {"source": "first_level"}, {"source": "statistics"}]}
KNOWN = {
    "approximators": {"kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "kfac_lowrank", "kpsvd_tensor", "tnt",
                      "singd", "exact_block"},
    "dampings": {"tikhonov", "heuristic", "levenberg_marquardt", "kron_inverse", "inverse_free", "inverse_factors"},
    "coarse_spaces": {"nicolaides", "spectral", "krylov", "residual", "taylor"},
    "curvatures": {"fisher", "empirical_fisher", "ggn", "hessian"},
}


def test_the_oracle_knows_every_builtin_kind(registry):
    """A new built-in kind must be added to the oracle above (and, if it has a rule, declare it)."""
    for family, known in KNOWN.items():
        assert set(registry.family(family).kinds()) == known, family


def _variants(kind: str, table: dict) -> list[dict]:
    return [{"kind": kind, **v} for v in table.get(kind, [{}])]


def _build(config: dict, registry) -> Any:
    return curvlib.build_preconditioner(make_model(), nn.CrossEntropyLoss(), config, registry=registry)


@pytest.mark.parametrize("approx_kind", sorted(KNOWN["approximators"]))
@pytest.mark.parametrize("damping_kind", sorted(KNOWN["dampings"]))
def test_every_builtin_combination_builds_or_is_rejected_by_a_named_rule(registry, approx_kind, damping_kind):
    """Every compatible combination of the registered kinds builds; every incompatible one is
    rejected at construction with a ConfigError naming both kinds (with their distribution)."""
    coarse_options = [None] + [c for k in sorted(KNOWN["coarse_spaces"]) for c in _variants(k, COARSE_VARIANTS)]
    for approx, damping in itertools.product(_variants(approx_kind, APPROXIMATOR_VARIANTS),
                                             _variants(damping_kind, DAMPING_VARIANTS)):
        damping = {**damping, "value": LAM}
        for curvature, coarse in itertools.product(sorted(KNOWN["curvatures"]), coarse_options):
            config = {"curvature": curvature, "approximator": approx, "damping": damping, "coarse_space": coarse}
            where = f"{config}"
            if compatible(curvature, approx, damping, coarse, "kronecker"):
                _build(config, registry)
                continue
            with pytest.raises(ConfigError) as info:
                _build(config, registry)
            text = str(info.value)
            assert text.startswith("incompatible kinds:"), (where, text)
            assert "(distribution 'curvlib'" in text, (where, text)
            kinds = (curvature, approx["kind"], damping["kind"], (coarse or {}).get("kind"))
            named = [k for k in kinds if k and f"kind {k!r}" in text]
            assert len(named) >= 2, (where, text)


@pytest.mark.parametrize("preconditioner", ["block_natural_gradient", "exact_natural_gradient"])
def test_natural_gradient_references_need_per_layer_statistics(registry, preconditioner):
    for curvature, damping_kind in itertools.product(sorted(KNOWN["curvatures"]), sorted(KNOWN["dampings"])):
        config = {"curvature": curvature, "damping": {"kind": damping_kind, "value": LAM}, "preconditioner": preconditioner}
        if compatible(curvature, {"kind": "kfac"}, config["damping"], None, preconditioner):
            _build(config, registry)
            continue
        with pytest.raises(ConfigError, match=rf"curvature = curvature kind 'hessian' .*preconditioner='{preconditioner}'"):
            _build(config, registry)


# --------------------------------------------------------------------------- each rule is real

#: one representative per rule: (config, the rule's words in the message, what fails at the first step)
RULES = {
    "hessian_has_no_statistics": ({"curvature": "hessian"}, "per-layer statistics", "no per-layer statistics"),
    "hessian_has_no_jacobian": ({"curvature": "hessian", "preconditioner": "exact_natural_gradient",
                                 "damping": {"kind": "tikhonov", "value": LAM}},
                                "Woodbury", "per-sample Jacobian"),
    "heuristic_needs_kronecker_factors": ({"approximator": "exact_block", "damping": {"kind": "heuristic", "value": LAM}},
                                          "the damping inverts KroneckerFactored blocks", "needs Kronecker factors"),
    "heuristic_inverts_at_most_two_terms": ({"approximator": {"kind": "lanczos", "rank": 3},
                                             "damping": {"kind": "heuristic", "value": LAM}},
                                            "at most 2 Kronecker term(s)", "one or two terms"),
    "levenberg_marquardt_follows_its_inner_kind": ({"approximator": {"kind": "deflation", "rank": 3},
                                                    "damping": {"kind": "levenberg_marquardt", "value": LAM,
                                                                "inner": "heuristic"}},
                                                   "at most 2 Kronecker term(s)", "one or two terms"),
    "spectral_first_level_needs_an_eigenbasis": ({"approximator": "kfac_corrected",
                                                  "damping": {"kind": "tikhonov", "value": LAM},
                                                  "coarse_space": {"kind": "spectral", "source": "first_level"}},
                                                 "FactorEigenbasis or DampedKroneckerFactors", "exposes no eigendecomposition"),
    "spectral_first_level_exact_block": ({"approximator": "exact_block", "damping": {"kind": "tikhonov", "value": LAM},
                                          "coarse_space": {"kind": "spectral", "source": "first_level"}},
                                         "FactorEigenbasis or DampedKroneckerFactors", "exposes no eigendecomposition"),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_is_checked_at_construction_and_is_a_real_first_step_failure(registry, rule):
    config, words, first_use = RULES[rule]
    with pytest.raises(ConfigError) as info:
        _build(config, registry)
    assert words in str(info.value), str(info.value)
    # the same configuration without the build-time check: it fails at the first step
    resolved = resolve_config(PreconditionerConfig(**config), registry)
    pre = Preconditioner(make_model(), nn.CrossEntropyLoss(), resolved, registry=registry)
    with pytest.raises(CurvlibError, match=first_use):
        pre.update(make_batch())
        pre.apply([p.detach().clone() for p in pre.params()])


def test_the_optimizer_rejects_at_construction(registry):
    with pytest.raises(ConfigError, match="incompatible kinds"):
        NaturalGradient(make_model(), nn.CrossEntropyLoss(),
                        {"approximator": "exact_block", "damping": {"kind": "heuristic", "value": LAM}},
                        lr=0.1, registry=registry)


@pytest.mark.parametrize("config", [
    {"approximator": "exact_block", "damping": {"kind": "tikhonov", "value": LAM}},
    {"approximator": "kfac_corrected", "damping": {"kind": "heuristic", "value": LAM},
     "coarse_space": {"kind": "spectral", "source": "first_level"}},
    {"approximator": "kfac", "damping": {"kind": "tikhonov", "value": LAM},
     "coarse_space": {"kind": "spectral", "source": "first_level"}},
    {"approximator": {"kind": "lanczos", "rank": 3}, "damping": {"kind": "tikhonov", "value": LAM},
     "coarse_space": "residual"},
    {"approximator": "deflation", "damping": {"kind": "levenberg_marquardt", "value": LAM, "inner": "heuristic"},
     "coarse_space": {"kind": "spectral", "source": "first_level"}, "coarse_mode": "previous"},
    {"curvature": "ggn", "preconditioner": "block_natural_gradient", "damping": {"kind": "heuristic", "value": LAM}},
])
def test_accepted_combinations_run(registry, config):
    """Combinations the rules accept (including ones next to a rejected one) really run."""
    pre = _build(config, registry)
    X, y = make_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumericalWarning)
        for _ in range(2):
            pre.update((X, y))
            out = pre.apply([torch.ones_like(p) for p in pre.params()])
    assert all(bool(torch.isfinite(o).all()) for o in out)


# --------------------------------------------------------------------------- plugin kinds: declared or not


class ExactLike(BlockApproximator):
    """A plugin approximator returning exact (shift-solvable) blocks."""

    kind = "exact_like"

    def fit(self, stats, previous=None):
        return LayerFit(block=ExactBlock(stats), info=FitInfo(method=self.kind))


class DeclaredExactLike(ExactLike):
    kind = "declared_exact_like"
    blocks = BlockDeclaration((ShiftSolvable,))


class FactorsOnly(TikhonovDamping):
    """A plugin damping (a Tikhonov subclass) that declares it needs shift-solvable blocks."""

    kind = "factors_only"
    requires = BlockRequirement((ShiftSolvable,), reason="a test rule")


class NeedsEigen(CoarseSpace):
    """A plugin coarse space that declares it needs an eigenbasis of every first-level block."""

    kind = "needs_eigen"
    first_level_needs = BlockRequirement((FactorEigenbasis,), reason="it reads first_level.blocks[i].eigen")

    def basis(self, ctx):
        return CoarseBasis(ctx.partition, [torch.ones(n, 1, dtype=ctx.dtype) for n in ctx.partition.sizes])


class MyGGN(GGNCurvature):
    kind = "my_ggn"


class MyHessian(HessianCurvature):
    kind = "my_hessian"


@pytest.fixture(scope="module")
def plugin_registry():
    reg = load_registry(external=False)

    class Plugin:
        @hookimpl
        def curvlib_register_approximators(self, registry):
            registry.add("exact_like", ExactLike, options=ApproximatorOptions)
            registry.add("declared_exact_like", DeclaredExactLike, options=ApproximatorOptions)

        @hookimpl
        def curvlib_register_dampings(self, registry):
            registry.add("factors_only", FactorsOnly, options=TikhonovOptions)

        @hookimpl
        def curvlib_register_coarse_spaces(self, registry):
            registry.add("needs_eigen", NeedsEigen, options=NoOptions)

        @hookimpl
        def curvlib_register_curvatures(self, registry):
            registry.add("my_ggn", MyGGN, options=NoOptions, per_layer_statistics=True)
            registry.add("my_hessian_declared", MyHessian, options=NoOptions, per_layer_statistics=False)
            registry.add("my_hessian", MyHessian, options=NoOptions)

    reg.register(Plugin(), name="thirdparty", distribution="third-party-dist")
    return reg


def test_a_declared_plugin_approximator_is_checked_against_the_damping(plugin_registry):
    heuristic = {"kind": "heuristic", "value": LAM}
    with pytest.raises(ConfigError) as info:
        _build({"approximator": "declared_exact_like", "damping": heuristic}, plugin_registry)
    text = str(info.value)
    assert "approximator kind 'declared_exact_like' (distribution 'third-party-dist', plugin 'thirdparty')" in text
    assert "damping kind 'heuristic' (distribution 'curvlib'" in text and "ShiftSolvable" in text
    _build({"approximator": "declared_exact_like", "damping": {"kind": "tikhonov", "value": LAM}}, plugin_registry)


def test_an_undeclared_plugin_approximator_builds_and_fails_where_first_used_as_before(plugin_registry):
    pre = _build({"approximator": "exact_like", "damping": {"kind": "heuristic", "value": LAM}}, plugin_registry)
    with pytest.raises(ConfigError, match="needs Kronecker factors"):
        pre.update(make_batch())


def test_a_declared_plugin_damping_is_checked_against_the_approximator(plugin_registry):
    with pytest.raises(ConfigError, match=r"damping kind 'factors_only' \(distribution 'third-party-dist'.*"
                                          r"approximator kind 'kfac'.*a test rule"):
        _build({"approximator": "kfac", "damping": {"kind": "factors_only", "value": LAM}}, plugin_registry)
    _build({"approximator": "declared_exact_like", "damping": {"kind": "factors_only", "value": LAM}}, plugin_registry)


def test_a_declared_plugin_coarse_space_is_checked_against_damping_and_approximator(plugin_registry):
    tikhonov = {"kind": "tikhonov", "value": LAM}
    with pytest.raises(ConfigError, match=r"coarse space kind 'needs_eigen' \(distribution 'third-party-dist'.*"
                                          r"damping kind 'tikhonov'.*approximator kind 'deflation'"):
        _build({"approximator": "deflation", "damping": tikhonov, "coarse_space": "needs_eigen"}, plugin_registry)
    with pytest.raises(ConfigError, match="needs_eigen"):  # the π-split's two-term inverse has damped factors only
        _build({"approximator": "kfac_corrected", "damping": {"kind": "heuristic", "value": LAM},
                "coarse_space": "needs_eigen"}, plugin_registry)
    _build({"approximator": "kpsvd", "damping": tikhonov, "coarse_space": "needs_eigen"}, plugin_registry)


def test_plugin_curvatures_declare_statistics_by_registration_metadata(plugin_registry):
    with pytest.raises(ConfigError, match=r"curvature kind 'my_hessian_declared' \(distribution 'third-party-dist'"):
        _build({"curvature": "my_hessian_declared"}, plugin_registry)
    _build({"curvature": "my_ggn"}, plugin_registry)
    _build({"curvature": "my_hessian"}, plugin_registry)  # undeclared: decided at the first refresh


def test_subclasses_of_builtins_inherit_their_declarations_like_a_plugins(plugin_registry):
    """The built-in declarations live on their classes (``requires``, ``blocks``,
    ``declared_blocks()``), as a plugin's do, so a subclass inherits them like any class
    attribute; a subclass that may return something else re-declares — ``requires = None``
    (or ``blocks = None``): undeclared, checked where it is first used; FactorsOnly declares
    its own requirement."""
    from curvlib.approximators.kfac import KFACApproximator
    from curvlib.approximators.svd_based import LanczosApproximator

    class Same(TikhonovDamping):
        kind = "same"

    class Sub(TikhonovDamping):
        kind = "sub"
        requires = None

    assert Same(value=LAM).block_requirement() == TikhonovDamping(value=LAM).block_requirement()
    assert Sub(value=LAM).block_requirement() is None
    assert TikhonovDamping(value=LAM).block_requirement() is not None
    assert FactorsOnly(value=LAM).block_requirement().any_of == (ShiftSolvable,)

    class CountingKFAC(KFACApproximator):
        kind = "counting_kfac"

    class UndeclaredKFAC(KFACApproximator):
        kind = "undeclared_kfac"
        blocks = None

    class WideLanczos(LanczosApproximator):
        kind = "wide_lanczos"

    assert CountingKFAC().declared_blocks() == KFACApproximator().declared_blocks()
    assert UndeclaredKFAC().declared_blocks() is None
    assert WideLanczos({"rank": 5}).declared_blocks().terms == (5, 5)


def test_the_base_classes_declare_nothing():
    """The documented defaults: a kind that declares nothing is ``None`` everywhere."""
    from curvlib.damping.base import Damping

    class BareSpace(CoarseSpace):
        kind = "bare_space"

        def basis(self, ctx):
            raise AssertionError("not called")

    class BareDamping(Damping):
        kind = "bare_damping"
        options_model = TikhonovOptions

        def _invert(self, block):
            raise AssertionError("not called")

    assert ExactLike().declared_blocks() is None
    assert BareSpace().first_level_requirement() is None
    bare = BareDamping(value=LAM)
    assert bare.block_requirement() is None
    assert bare.inverse_capabilities((ShiftSolvable,), None) is None
