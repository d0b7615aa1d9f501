"""Per-layer composition (``PreconditionerConfig.rules``): each rule's layers get exactly the
standalone ``approximate`` + ``damped_inverse`` of the rule's settings (dense float64), on their
own T1/T2 schedule, and the whole state round-trips bit-identically."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import curvlib
from curvlib.errors import ConfigError, UnknownKindError
from curvlib.plugins import load_registry
from curvlib.precond import PreconditionerConfig, build_preconditioner
from curvlib.testing.compare import assert_close
from curvlib.testing.references import dense_two_level_residual

DT = torch.float64


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


class _Net(nn.Module):
    """A conv trunk, a LayerNorm'd hidden layer and a small head: three kinds of layers."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(2, 3, 3)
        self.hidden = nn.Linear(12, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)
        self.to(DT)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.head(torch.tanh(self.norm(self.hidden(h))))


def _batch(seed: int, m: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 2, 4, 4, generator=g, dtype=DT), torch.randint(0, 4, (m,), generator=g)


RULES = [
    {"types": ["Conv2d"], "approximator": {"kind": "kpsvd", "max_iters": 40}, "damping": {"kind": "tikhonov", "value": 3e-2}},
    {"match": "head", "approximator": "exact_block", "damping": {"kind": "tikhonov", "value": 1e-2}},
    {"types": ["LayerNorm"], "damping": {"kind": "heuristic", "value": 5e-2}},
]
CONFIG = {"curvature": "ggn", "approximator": "kfac", "damping": {"kind": "heuristic", "value": 1e-3}, "ema": None,
          "rules": RULES}


def test_each_rule_gets_the_standalone_fit_and_inverse_of_its_settings(registry):
    """The composed inverse equals, block by block, approximate + damped_inverse of each rule."""
    model = _Net()
    X, y = _batch(0)
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), CONFIG, registry=registry)
    pre.update((X, y))
    assert {L.name: pre.rule_of(L.name) for L in pre.layers} == {
        "conv": "rules[0]", "hidden": "default", "norm": "rules[2]", "head": "rules[1]"}

    F = curvlib.curvature("ggn", model, nn.CrossEntropyLoss(), (X, y))
    expected = torch.zeros(F.p, F.p, dtype=DT)
    expected_fit = torch.zeros(F.p, F.p, dtype=DT)
    settings = {"conv": RULES[0], "head": RULES[1], "norm": {**RULES[2], "approximator": "kfac"},
                "hidden": {"approximator": "kfac", "damping": CONFIG["damping"]}}
    for i, L in enumerate(F.layers):
        kind = settings[L.name]["approximator"]
        kind = {"kind": kind} if isinstance(kind, str) else dict(kind)
        approx = curvlib.approximate(F, kind, layers=[i], registry=registry)
        inv = curvlib.damped_inverse(approx, settings[L.name]["damping"], registry=registry)
        s = L.slice
        expected[s, s] = inv.to_dense()[s, s]
        expected_fit[s, s] = approx.to_dense()[s, s]
    assert_close(pre.approximation.to_dense(), expected_fit, rtol=1e-10, atol=1e-12)
    assert_close(pre.inverse.to_dense(), expected, rtol=1e-10, atol=1e-12)
    # and the direction of a gradient list is that dense product
    g = [torch.randn(q.shape, dtype=DT, generator=torch.Generator().manual_seed(5)) for q in pre.params()]
    d = pre.apply(g)
    assert_close(pre.params_to_vector(d), expected @ pre.params_to_vector(g), rtol=1e-10, atol=1e-12)


def test_mixed_schedules_refresh_and_invert_each_layer_on_its_own_t1_t2(registry):
    rules = [
        {"types": ["Conv2d"], "update_every": 2, "invert_every": 4},
        {"match": "head", "update_every": 3, "invert_every": 6},
    ]
    cfg = {"curvature": "ggn", "rules": rules, "update_every": 1, "invert_every": 2}
    model = _Net()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=registry)
    seen: dict[str, list[int]] = {"rules[0]": [], "rules[1]": [], "default": []}
    inverted: dict[str, list[int]] = {"rules[0]": [], "rules[1]": [], "default": []}
    steps = 13
    for k in range(steps):
        before = {g.rule.label: (g.approximation, g.inverse) for g in pre.groups}
        info = pre.update(_batch(k))
        assert info.refreshed == (k % 1 == 0) and info.inverted == (k % 2 == 0 or k % 4 == 0 or k % 6 == 0)
        for g in pre.groups:
            a, inv = before[g.rule.label]
            if g.approximation is not a:
                seen[g.rule.label].append(k)
            if g.inverse is not inv:
                inverted[g.rule.label].append(k)
    assert seen == {"rules[0]": list(range(0, steps, 2)), "rules[1]": list(range(0, steps, 3)),
                    "default": list(range(steps))}
    assert inverted == {"rules[0]": list(range(0, steps, 4)), "rules[1]": list(range(0, steps, 6)),
                        "default": list(range(0, steps, 2))}
    counts = {g.rule.label: (g.num_refreshes, g.num_inversions, g.last_refresh_step, g.last_inversion_step)
              for g in pre.groups}
    assert counts == {"rules[0]": (7, 4, 12, 12), "rules[1]": (5, 3, 12, 12), "default": (13, 7, 12, 12)}


def test_a_rule_refreshed_less_often_keeps_its_fit_between_its_refreshes(registry):
    cfg = {"curvature": "ggn", "rules": [{"match": "hidden", "update_every": 4, "invert_every": 4}]}
    pre = build_preconditioner(_Net(), nn.CrossEntropyLoss(), cfg, registry=registry)
    pre.update(_batch(0))
    kept = pre.groups[0].approximation
    for k in range(1, 4):
        pre.update(_batch(k))
        assert pre.groups[0].approximation is kept
        assert pre.groups[1].last_refresh_step == k
    pre.update(_batch(4))
    assert pre.groups[0].approximation is not kept and pre.groups[0].num_refreshes == 2


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _train(opt, model, steps, seed0):
    for k in range(steps):
        X, y = _batch(seed0 + k)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step(batch=(X, y))


@pytest.mark.filterwarnings("ignore::curvlib.ExcludedParametersWarning")
@pytest.mark.parametrize("coarse", [None, "residual"])
def test_a_composed_optimizer_resumes_bit_identically(registry, coarse):
    rules = [
        {"types": ["Conv2d"], "approximator": {"kind": "kpsvd", "max_iters": 30}, "damping": {"kind": "tikhonov", "value": 1e-2},
         "update_every": 2, "invert_every": 4},
        {"match": "head", "update_every": 3, "invert_every": 3},
        {"types": ["LayerNorm"], "fallback": True},
    ]
    cfg = {"curvature": {"kind": "fisher", "mc_samples": 1}, "rules": rules, "update_every": 1, "invert_every": 2,
           "damping": {"kind": "levenberg_marquardt", "value": 1e-2, "inner": "heuristic"}, "coarse_space": coarse}

    def build(seed):
        model = _Net(seed)
        opt = curvlib.NaturalGradient(model, nn.CrossEntropyLoss(), cfg, lr=0.1, fallback="adam",
                                      generator=torch.Generator().manual_seed(seed + 3))
        return model, opt

    model, opt = build(0)
    with pytest.warns(curvlib.ExcludedParametersWarning, match=r"left to the fallback optimizer by rules\[2\]"):
        _train(opt, model, 5, 0)
    assert "norm.weight" in opt.preconditioner.excluded and "norm" not in [L.name for L in opt.preconditioner.layers]
    saved = _roundtrip({"model": copy.deepcopy(model.state_dict()), "opt": opt.state_dict()})
    _train(opt, model, 7, 100)

    model2, opt2 = build(1)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    _train(opt2, model2, 7, 100)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    s1, s2 = opt.preconditioner.state_dict(), opt2.preconditioner.state_dict()
    assert [g["num_refreshes"] for g in s1["groups"]] == [g["num_refreshes"] for g in s2["groups"]] == [6, 4, 0, 12]


def test_a_state_saved_with_other_rules_is_refused(registry):
    pre = build_preconditioner(_Net(), nn.CrossEntropyLoss(), CONFIG, registry=registry)
    pre.update(_batch(0))
    state = pre.state_dict()
    other = build_preconditioner(_Net(), nn.CrossEntropyLoss(), {**CONFIG, "rules": RULES[:2]}, registry=registry)
    with pytest.raises(ConfigError, match=r"groups \['rules\[0\]', 'rules\[1\]', 'rules\[2\]', 'default'\]"):
        other.load_state_dict(state)
    plain = build_preconditioner(_Net(), nn.CrossEntropyLoss(), {"curvature": "ggn"}, registry=registry)
    with pytest.raises(ConfigError, match="saved with other rules"):
        plain.load_state_dict(state)
    swapped = [RULES[1], RULES[0], RULES[2]]
    other = build_preconditioner(_Net(), nn.CrossEntropyLoss(), {**CONFIG, "rules": swapped}, registry=registry)
    with pytest.raises(ConfigError):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"match": "x", "min_params": 5, "max_params": 2}], r"rules\[0\]: min_params = 5 > max_params = 2"),
        ([{}, {"match": "x"}], r"rules\[0\] has no matcher.*rules\[1:\] can never match"),
        ([{"match": "x", "fallback": True, "damping": "tikhonov"}], r"rules\[0\]: fallback=True.*\['damping'\]"),
        ([{"match": "x"}, {"match": "y", "approximator": {"kind": "kpsvd", "rank": 0}}],
         r"rules\[1\]\.approximator\.rank"),
        ([{"match": "x", "update_every": 3, "invert_every": 4}], r"rules\[0\]: invert_every \(T2 = 4\) must be a multiple"),
        ([{"match": "x", "damping": {"kind": "levenberg_marquardt", "value": 1e-2}}],
         r"rules\[0\]\.damping: 'levenberg_marquardt' adapts λ"),
        ([{"match": "x", "predicate": 3}], r"rules\[0\]\.predicate: expected a callable"),
        ([{"match": "x", "matcher": "y"}], r"rules\[0\]\.matcher: Extra inputs"),
        ([{"match": "x", "approximator": "exact_block"}], r"rules\[0\]: incompatible kinds.*heuristic"),
        ([{"match": ""}], r"rules\[0\]\.match"),
        ([{"types": []}], r"rules\[0\]\.types"),
    ],
)
def test_invalid_rules_are_refused_at_construction_naming_the_rule(registry, rules, message):
    with pytest.raises(ConfigError, match=message):
        build_preconditioner(_Net(), nn.CrossEntropyLoss(), {"rules": rules}, registry=registry)


def test_an_unknown_kind_in_a_rule_names_the_rule(registry):
    with pytest.raises(UnknownKindError, match=r"rules\[0\]\.approximator\.kind: unknown approximator kind 'nope'"):
        build_preconditioner(_Net(), nn.CrossEntropyLoss(), {"rules": [{"match": "x", "approximator": "nope"}]},
                             registry=registry)


def test_rules_need_the_kronecker_preconditioner(registry):
    with pytest.raises(ConfigError, match="rules compose the block-diagonal Kronecker"):
        PreconditionerConfig(preconditioner="block_natural_gradient", damping={"kind": "tikhonov", "value": 1e-2},
                             rules=[{"match": "x"}])


def test_matchers(registry):
    from curvlib.precond.config import LayerRule

    conv = nn.Conv2d(1, 1, 1)
    assert LayerRule(match="enc.*").matches("enc.0", conv, 2)
    assert not LayerRule(match="enc.*").matches("dec.0", conv, 2)
    assert LayerRule(types=["_ConvNd"]).matches("c", conv, 2)  # a base class matches
    assert not LayerRule(types=["Linear"]).matches("c", conv, 2)
    assert LayerRule(max_params=2).matches("c", conv, 2) and not LayerRule(max_params=1).matches("c", conv, 2)
    assert LayerRule(min_params=3).matches("c", conv, 3) and not LayerRule(min_params=3).matches("c", conv, 2)
    assert LayerRule(predicate=lambda name, m: name == "c").matches("c", conv, 2)
    assert not LayerRule(match="c", types=["Linear"]).matches("c", conv, 2)  # all given matchers must pass
    with pytest.raises(ConfigError, match="returned int"):
        LayerRule(predicate=lambda name, m: 1).matches("c", conv, 2)


def test_rules_from_a_yaml_file(tmp_path, registry):
    path = tmp_path / "composed.yaml"
    path.write_text(
        "curvature: ggn\n"
        "approximator: kfac\n"
        "rules:\n"
        "  - match: head\n"
        "    approximator: exact_block\n"
        "    damping: {kind: tikhonov, value: 1e-2}\n"
        "  - types: [Conv2d]\n"
        "    update_every: 2\n"
        "    invert_every: 2\n"
    )
    cfg = PreconditionerConfig.from_file(path)
    assert cfg.rules[0].damping["value"] == 1e-2 and cfg.rules[1].types == ("Conv2d",)
    assert PreconditionerConfig.coerce(cfg.to_dict()) == cfg
    pre = build_preconditioner(_Net(), nn.CrossEntropyLoss(), path, registry=registry)
    pre.update(_batch(0))
    assert pre.rule_of("head") == "rules[0]" and pre.rule_of("conv") == "rules[1]" and pre.rule_of("norm") == "default"


@pytest.mark.filterwarnings("ignore::curvlib.ExcludedParametersWarning")
def test_describe_names_each_layers_rule_settings_and_costs(registry):
    cfg = {**CONFIG, "rules": [*RULES, {"match": "hidden", "fallback": True}]}
    pre = build_preconditioner(_Net(), nn.CrossEntropyLoss(), cfg, registry=registry)
    from curvlib.precond.explain import layer_plan

    rows = {r.name: r for r in layer_plan(pre)}
    assert {n: (r.rule, r.approximator.split("(")[0]) for n, r in rows.items()} == {
        "conv": ("rules[0]", "kpsvd"), "hidden": ("rules[3]", "fallback"), "norm": ("rules[2]", "kfac"),
        "head": ("rules[1]", "exact_block")}
    conv, head = rows["conv"], rows["head"]
    assert (conv.a_dim, conv.g_dim, conv.p_i, conv.terms) == (19, 3, 57, 1)
    assert conv.entries == 19**2 + 3**2 and conv.flops == 2 * 19 * 3 * (19 + 3)
    assert head.entries == 28**2 and head.flops == 2 * 28**2 and head.terms is None
    assert rows["norm"].bound and rows["norm"].terms == 2  # kfac may fit two terms: an upper bound before the fit
    pre.update(_batch(0))
    norm = {r.name: r for r in layer_plan(pre)}["norm"]
    fit = pre.groups[2].approximation.fits[0]
    assert not norm.bound and norm.terms == len(fit.terms)
    text = pre.describe()
    head_line, = [line for line in text.splitlines() if line.startswith("head ")]
    assert head_line.split()[:5] == ["head", "Linear", "rules[1]", "exact_block", "tikhonov(λ=0.01)"]
    assert "78 parameters left to the fallback optimizer" in text


def test_curvlib_explain_prints_the_plan_of_a_config_file(tmp_path, monkeypatch, capsys):
    from curvlib.cli import main

    (tmp_path / "nets_for_explain.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))\n")
    (tmp_path / "c.yaml").write_text("rules:\n  - match: '2'\n    approximator: exact_block\n"
                                     "    damping: {kind: tikhonov, value: 1.0e-2}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["explain", "c.yaml", "--model", "nets_for_explain:make"]) == 0
    out = capsys.readouterr().out
    assert "2      Linear  rules[0]  exact_block" in out and "0      Linear  default   kfac" in out
    assert main(["explain", "c.yaml", "--model", "nets_for_explain"]) == 2
    assert "expected MODULE:FACTORY" in capsys.readouterr().err
    assert main(["explain", "c.yaml", "--model", "nets_for_explain:nope"]) == 2
    (tmp_path / "bad.yaml").write_text("rules:\n  - match: x\n    update_every: 3\n    invert_every: 4\n")
    assert main(["explain", "bad.yaml", "--model", "nets_for_explain:make"]) == 2
    assert "rules[0]: invert_every (T2 = 4) must be a multiple" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["multiplicative", "additive"])
def test_a_coarse_space_over_the_layers_rules_select(registry, mode):
    """Two-level over the trunk only: R₀ᵀ has one column per selected layer and zero rows elsewhere,
    so the head stays one-level (dense float64 reference of (4.17)/(4.19))."""
    lam = 0.05
    cfg = {"curvature": "ggn", "coarse_space": "residual", "coarse_mode": mode,
           "damping": {"kind": "heuristic", "value": lam},
           "rules": [{"match": "head", "approximator": "exact_block", "damping": {"kind": "tikhonov", "value": 1e-2}},
                     {"types": ["Conv2d", "Linear"], "coarse": True}]}
    model = _Net()
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=registry)
    pre.update(_batch(0))
    F = pre.curvature
    slices = [L.slice for L in F.layers if L.name in ("conv", "hidden")]
    assert [g.rule.coarse for g in pre.groups] == [False, True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F_dense = F.to_dense()
    M_dense = pre.inverse.to_dense()
    for seed in (0, 1):
        g = torch.randn(pre.p, dtype=DT, generator=torch.Generator().manual_seed(seed))
        expected = dense_two_level_residual(F_dense, M_dense, g, lam, slices, mode)
        assert_close(pre.apply(g), expected, rtol=1e-9, atol=1e-11)


def test_coarse_membership_rules():
    cfg = PreconditionerConfig(coarse_space="residual", rules=[{"match": "a", "coarse": False}, {"match": "b"}])
    assert cfg._coarse_members() == [False, True, True]  # everything but rules[0]
    cfg = PreconditionerConfig(coarse_space="residual", rules=[{"match": "a", "coarse": True}, {"match": "b"}])
    assert cfg._coarse_members() == [True, False, False]  # exactly rules[0]
    with pytest.raises(ConfigError, match=r"rules\[0\]: coarse=True needs a coarse_space"):
        PreconditionerConfig(rules=[{"match": "a", "coarse": True}])
    with pytest.raises(ConfigError, match="no rule puts any layer in the coarse space"):
        PreconditionerConfig(coarse_space="residual", rules=[{"match": "a", "coarse": False}, {"coarse": False}])
    with pytest.raises(ConfigError, match="coarse_mode='previous'"):
        PreconditionerConfig(coarse_space="nicolaides", coarse_mode="previous", rules=[{"match": "a"}])


def test_a_coarse_space_rule_that_matches_no_layer_is_refused_at_the_first_refresh(registry):
    cfg = {"curvature": "ggn", "coarse_space": "residual", "rules": [{"match": "nothing*", "coarse": True}]}
    pre = build_preconditioner(_Net(), nn.CrossEntropyLoss(), cfg, registry=registry)
    with pytest.raises(ConfigError, match=r"no preconditioned layer is in the coarse space.*\['rules\[0\]'\]"):
        pre.update(_batch(0))
    assert pre.step == 0 and not pre.is_ready


def test_the_coarse_spaces_needs_are_checked_for_each_rule_in_it(registry):
    spectral = {"kind": "spectral", "source": "first_level"}
    bad = {"curvature": "ggn", "coarse_space": spectral,
           "rules": [{"match": "conv", "approximator": {"kind": "deflation", "rank": 2}, "damping": {"kind": "tikhonov", "value": 1e-2}}]}
    with pytest.raises(ConfigError, match=r"rules\[0\]: incompatible kinds: coarse_space"):
        build_preconditioner(_Net(), nn.CrossEntropyLoss(), bad, registry=registry)
    bad["rules"][0]["coarse"] = False  # left one-level: nothing to check
    build_preconditioner(_Net(), nn.CrossEntropyLoss(), bad, registry=registry)
