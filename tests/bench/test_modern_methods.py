"""Method names added for the modern problems (curvlib.bench.methods): ``adamw`` and the
``_reduce`` suffix (KFAC-reduce: approximator option ``weight_sharing="reduce"``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvlib.bench.methods import (
    FIRST_ORDER,
    Hyperparameters,
    available_methods,
    resolve_method,
)
from curvlib.bench.settings import BenchConfig, MethodConfig
from curvlib.bench.training_step import build_training_step, natural_gradient_available
from curvlib.errors import ConfigError, UnknownKindError
from curvlib.plugins import load_registry

NG_OK, NG_WHY = natural_gradient_available()


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def _weight_sharing_kinds(registry) -> list[str]:
    return [k for k in registry.approximators.kinds()
            if "weight_sharing" in registry.approximators.get(k).options.model_fields]


# --------------------------------------------------------------------------- adamw


def test_adamw_is_a_first_order_method_with_decoupled_weight_decay(registry):
    method = resolve_method("adamw", registry)
    assert method.family == "adamw" and not method.is_natural_gradient and "adamw" in FIRST_ORDER
    assert available_methods(registry)[:3] == ["sgd", "adam", "adamw"]
    hp = method.default_hyperparameters()
    assert (hp.lr, hp.weight_decay, hp.damping) == (3e-3, 1e-2, None)
    assert resolve_method("adam", registry).default_hyperparameters().weight_decay == 0.0
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    step = build_training_step(method, model, nn.MSELoss(), hp, generator=torch.Generator(), registry=registry)
    opt = step.optimizer
    assert type(opt) is torch.optim.AdamW and step.preconditioner_config is None and not step.needs_batch
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 1e-2 and plain["weight_decay"] == 0.0
    assert {p.ndim for p in decayed["params"]} == {2} and {p.ndim for p in plain["params"]} == {1}
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))
    loss = step.step(torch.randn(5, 3), torch.randn(5, 2))
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_adamw_settings_from_the_config(registry):
    method = resolve_method("adamw", registry)
    config = BenchConfig.from_mapping({"methods": ["adamw"], "weight_decay": 0.1, "damping": 0.5})
    hp = config.hyperparameters(method, config.methods[0])
    assert hp.weight_decay == 0.1 and hp.damping is None  # damping is natural gradient's only
    entry = MethodConfig(name="adamw", lr=1e-3, weight_decay=0.0)
    hp = config.hyperparameters(method, entry)
    assert (hp.lr, hp.weight_decay) == (1e-3, 0.0)


# --------------------------------------------------------------------------- _reduce


def test_reduce_suffix_sets_weight_sharing_reduce(registry):
    kinds = _weight_sharing_kinds(registry)
    assert {"kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected"} <= set(kinds)
    assert "kfac_reduce" in available_methods(registry)
    for kind in kinds:
        method = resolve_method(f"{kind}_reduce", registry)
        assert method.approximator == kind and method.is_natural_gradient
        assert dict(method.approximator_options) == {"weight_sharing": "reduce"}
        assert "reduce" in method.description
        config = method.preconditioner_config(method.default_hyperparameters())
        assert config["approximator"]["kind"] == kind and config["approximator"]["weight_sharing"] == "reduce"
        plain = resolve_method(kind, registry)  # the kind's own default damping (kfac_lowrank: tikhonov)
        assert config["damping"]["kind"] == plain.preconditioner_config(plain.default_hyperparameters())["damping"]["kind"]
    # the plain name keeps the approximator's own default (expand)
    plain = resolve_method("kfac", registry)
    assert plain.approximator_options == ()
    assert "weight_sharing" not in plain.preconditioner_config(plain.default_hyperparameters())["approximator"]


def test_reduce_combines_with_tikhonov_and_two_level(registry):
    for name in ("kfac_reduce_tikhonov", "kfac_tikhonov_reduce"):
        method = resolve_method(name, registry)
        assert method.damping_kind == "tikhonov" and dict(method.approximator_options) == {"weight_sharing": "reduce"}
        config = method.preconditioner_config(method.default_hyperparameters(damping=1e-2))
        assert config["damping"] == {"kind": "tikhonov", "value": 1e-2}
        assert config["approximator"] == {"kind": "kfac", "weight_sharing": "reduce"}
    coarse = next(iter(registry.coarse_spaces.kinds()))
    two = resolve_method(f"kfac_reduce+{coarse}", registry)
    assert two.coarse_space == coarse and dict(two.approximator_options) == {"weight_sharing": "reduce"}
    config = two.preconditioner_config(two.default_hyperparameters())
    assert config["approximator"]["weight_sharing"] == "reduce" and config["coarse_space"]["kind"] == coarse


def test_reduce_names_that_are_not_methods(registry):
    if "exact_block" in registry.approximators and "exact_block" not in _weight_sharing_kinds(registry):
        with pytest.raises(UnknownKindError, match="'exact_block' has no weight_sharing option"):
            resolve_method("exact_block_reduce", registry)
    for name in ("sgd_reduce", "adamw_reduce", "block_ng_reduce"):
        with pytest.raises(UnknownKindError, match="is not an approximator method"):
            resolve_method(name, registry)
    with pytest.raises(UnknownKindError, match="already reduces"):
        resolve_method("kfac_reduce_reduce", registry)
    with pytest.raises(UnknownKindError, match="_reduce"):
        resolve_method("_reduce", registry)
    method = resolve_method("kfac_reduce", registry)
    with pytest.raises(ConfigError, match="contradict"):
        method.preconditioner_config(Hyperparameters(lr=1.0, approximator_options={"weight_sharing": "expand"}))
    config = method.preconditioner_config(Hyperparameters(lr=1.0, approximator_options={"ema": 0.9}))
    assert config["approximator"] == {"kind": "kfac", "weight_sharing": "reduce", "ema": 0.9}


@pytest.mark.skipif(not NG_OK, reason=f"curvlib.optim is not importable: {NG_WHY}")
def test_reduce_config_is_a_valid_preconditioner_config(registry):
    from curvlib.precond import PreconditionerConfig

    method = resolve_method("kfac_reduce", registry)
    config = PreconditionerConfig(**method.preconditioner_config(method.default_hyperparameters()))
    dumped = config.model_dump(mode="json")
    assert dumped["approximator"]["kind"] == "kfac"
    assert registry.approximators.get("kfac").make_options(
        **{k: v for k, v in dumped["approximator"].items() if k != "kind"}).weight_sharing == "reduce"


# --------------------------------------------------------------------------- default damping


@pytest.mark.skipif(not NG_OK, reason=f"curvlib.optim is not importable: {NG_WHY}")
def test_exact_block_method_defaults_to_tikhonov_and_builds(registry):
    """``exact_block`` returns shift-solvable blocks, which the π-split refuses when the
    preconditioner is built; its registration's ``default_damping="tikhonov"`` metadata makes
    the bench method named after it a combination that builds (and ``exact_block_tikhonov``
    agrees with it)."""
    import curvlib

    assert registry.approximators.get("exact_block").metadata["default_damping"] == "tikhonov"
    assert "default_damping" not in registry.approximators.get("kfac").metadata
    for name in ("exact_block", "exact_block_tikhonov"):
        method = resolve_method(name, registry)
        assert method.approximator == "exact_block" and method.damping_kind == "tikhonov", name
        config = method.preconditioner_config(method.default_hyperparameters(damping=1e-2))
        assert config["approximator"] == {"kind": "exact_block"} and config["damping"] == {"kind": "tikhonov", "value": 1e-2}
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        pre = curvlib.build_preconditioner(model, nn.MSELoss(), config, registry=registry)
        X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
        pre.update((X, y))
        out = pre.apply([torch.ones_like(q) for q in pre.params()])
        assert all(bool(torch.isfinite(o).all()) for o in out)
    assert resolve_method("kfac", registry).damping_kind == "heuristic"  # kinds without the metadata

