"""PreconditionerConfig and build_preconditioner: validation messages name the field path,
unknown kinds list the known ones, files load, third-party kinds plug in."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from pydantic import Field
from torch import nn

import curvlib.precond as precond
from curvlib.approximators.base import ApproximatorOptions, BlockApproximator, FitInfo, LayerFit
from curvlib.errors import ConfigError, UnknownKindError
from curvlib.linalg import KroneckerSum
from curvlib.plugins import BUILTIN_PLUGIN_MODULES, Registry, hookimpl, load_registry
from curvlib.precond import PreconditionerConfig, build_preconditioner

DT = torch.float64


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def _mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model


def _batch(seed=1, m=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, 4, generator=g, dtype=DT), torch.randint(0, 2, (m,), generator=g)


# -- the config model itself -----------------------------------------------------------------


def test_defaults_and_bare_kind_names():
    cfg = PreconditionerConfig()
    assert cfg.curvature["kind"] == "fisher" and cfg.approximator == {"kind": "kfac"}
    assert cfg.damping["kind"] == "heuristic" and cfg.coarse_space is None
    assert (cfg.update_every, cfg.invert_every, cfg.ema) == (1, 1, 0.95)
    cfg = PreconditionerConfig(approximator="kpsvd", coarse_space="residual")
    assert cfg.approximator == {"kind": "kpsvd"} and cfg.coarse_space == {"kind": "residual"}


def test_invert_every_must_be_a_multiple_of_update_every_message_names_both():
    with pytest.raises(ConfigError) as exc:
        PreconditionerConfig(update_every=10, invert_every=15)
    msg = str(exc.value)
    assert "invert_every" in msg and "update_every" in msg and "15" in msg and "10" in msg
    PreconditionerConfig(update_every=10, invert_every=100)  # fine


@pytest.mark.parametrize(
    ("field", "value"),
    [("update_every", 0), ("invert_every", -1), ("ema", 1.5), ("ema", -0.1), ("coarse_mode", "sideways"),
     ("preconditioner", "diagonal"), ("approximator", {"rank": 2}), ("damping", 3)],
)
def test_invalid_fields_are_named(field, value):
    with pytest.raises(ConfigError) as exc:
        PreconditionerConfig(**{field: value})
    assert field in str(exc.value)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="update_evry"):
        PreconditionerConfig(update_evry=3)


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="coarse_space.*preconditioner"):
        PreconditionerConfig(coarse_space={"kind": "residual"}, preconditioner="exact_natural_gradient")
    with pytest.raises(ConfigError, match="coarse_mode.*coarse_space"):
        PreconditionerConfig(coarse_mode="additive")


def test_config_is_frozen():
    cfg = PreconditionerConfig()
    with pytest.raises(Exception):
        cfg.update_every = 3  # type: ignore[misc]


def test_from_yaml_and_json_files(tmp_path):
    data = {
        "curvature": {"kind": "fisher", "mc_samples": 2},
        "approximator": {"kind": "kfac_corrected", "max_iters": 20},
        "damping": {"kind": "tikhonov", "value": 0.01},
        "update_every": 5,
        "invert_every": 20,
        "ema": 0.9,
    }
    expected = PreconditionerConfig(**data)
    j = tmp_path / "c.json"
    j.write_text(json.dumps(data))
    y = tmp_path / "c.yaml"
    y.write_text(
        "curvature: {kind: fisher, mc_samples: 2}\n"
        "approximator:\n  kind: kfac_corrected\n  max_iters: 20\n"
        "damping: {kind: tikhonov, value: 0.01}\n"
        "update_every: 5\ninvert_every: 20\nema: 0.9\n"
    )
    assert PreconditionerConfig.from_file(j) == expected
    assert PreconditionerConfig.from_file(str(y)) == expected
    assert PreconditionerConfig.coerce(y) == expected
    assert PreconditionerConfig.coerce(expected.to_dict()) == expected


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="existing file"):
        PreconditionerConfig.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="could not parse"):
        PreconditionerConfig.from_file(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        PreconditionerConfig.from_file(lst)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("update_every: 3\ninvert_every: 4\n")
    with pytest.raises(ConfigError, match="invert_every.*wrong.yaml"):
        PreconditionerConfig.from_file(wrong)


# -- resolution against the registry ---------------------------------------------------------


def test_unknown_kind_lists_known_kinds(registry):
    with pytest.raises(UnknownKindError) as exc:
        build_preconditioner(_mlp(), nn.CrossEntropyLoss(), {"approximator": {"kind": "kfca"}}, registry=registry)
    msg = str(exc.value)
    assert msg.startswith("approximator.kind:") and "'kfca'" in msg
    for known in ("'kfac'", "'kpsvd'", "'deflation'", "'lanczos'", "'kfac_corrected'"):
        assert known in msg
    with pytest.raises(UnknownKindError, match=r"damping\.kind:.*'tikhonov'"):
        build_preconditioner(_mlp(), nn.CrossEntropyLoss(), {"damping": "nope"}, registry=registry)
    with pytest.raises(UnknownKindError, match=r"curvature\.kind:.*'fisher'"):
        build_preconditioner(_mlp(), nn.CrossEntropyLoss(), {"curvature": "fishr"}, registry=registry)


def test_invalid_kind_options_name_the_path(registry):
    loss = nn.CrossEntropyLoss()
    with pytest.raises(ConfigError) as exc:
        build_preconditioner(_mlp(), loss, {"approximator": {"kind": "deflation", "rank": 0}}, registry=registry)
    assert "approximator.rank:" in str(exc.value) and "(got 0)" in str(exc.value)
    with pytest.raises(ConfigError, match=r"approximator\.rnak:"):
        build_preconditioner(_mlp(), loss, {"approximator": {"kind": "deflation", "rnak": 2}}, registry=registry)
    with pytest.raises(ConfigError, match=r"damping\.value:"):
        build_preconditioner(_mlp(), loss, {"damping": {"kind": "tikhonov", "value": -1.0}}, registry=registry)
    with pytest.raises(ConfigError, match=r"damping\.value:"):
        build_preconditioner(_mlp(), loss, {"damping": {"kind": "tikhonov"}}, registry=registry)
    with pytest.raises(ConfigError, match=r"curvature\.mc_samples:"):
        build_preconditioner(_mlp(), loss, {"curvature": {"kind": "fisher", "mc_samples": 0}}, registry=registry)


def test_ema_and_interval_are_inherited_unless_set(registry):
    loss = nn.CrossEntropyLoss()
    pre = build_preconditioner(_mlp(), loss, {"ema": 0.7, "update_every": 3, "invert_every": 3}, registry=registry)
    assert pre.resolved.approximator.data["ema"] == 0.7
    pre = build_preconditioner(_mlp(), loss, {"ema": 0.7, "approximator": {"kind": "kfac", "ema": None}}, registry=registry)
    assert pre.resolved.approximator.data["ema"] is None
    pre = build_preconditioner(
        _mlp(), loss,
        {"update_every": 5, "invert_every": 10, "damping": {"kind": "levenberg_marquardt", "value": 1e-2}},
        registry=registry,
    )
    assert pre.damping.options.interval == 5
    pre = build_preconditioner(
        _mlp(), loss,
        {"update_every": 5, "invert_every": 10, "damping": {"kind": "levenberg_marquardt", "value": 1e-2, "interval": 1}},
        registry=registry,
    )
    assert pre.damping.options.interval == 1


def test_config_from_file_path_builds(tmp_path, registry):
    f = tmp_path / "p.yaml"
    f.write_text("approximator: {kind: kfac}\ndamping: {kind: tikhonov, value: 0.1}\nupdate_every: 2\ninvert_every: 4\n")
    pre = build_preconditioner(_mlp(), nn.CrossEntropyLoss(), str(f), registry=registry)
    assert pre.config.update_every == 2 and pre.resolved.damping.kind == "tikhonov"


# -- a third-party kind through a throwaway registry -------------------------------------------


class IdentityOptions(ApproximatorOptions):
    scale: float = Field(1.0, gt=0)


class IdentityApproximator(BlockApproximator):
    """``identity``: F̂_ii = s·I ⊗ I (a test plugin)."""

    kind = "identity"
    options_model = IdentityOptions

    def fit(self, stats, previous=None):
        A = torch.eye(stats.a_dim, dtype=stats.a.dtype, device=stats.a.device) * self.options.scale
        B = torch.eye(stats.g_dim, dtype=stats.a.dtype, device=stats.a.device)
        k = 1 if previous is None else previous.refresh + 1
        return LayerFit(block=KroneckerSum([(A, B)]), info=FitInfo(method=self.kind, refresh=k), state={"refresh": k})


class _ThirdParty:
    @hookimpl
    def curvlib_register_approximators(self, registry):
        registry.add("identity", IdentityApproximator, options=IdentityOptions)


def _throwaway_registry():
    reg = Registry()
    for name, mod in BUILTIN_PLUGIN_MODULES.items():
        reg.register(importlib.import_module(mod), name=name, distribution="curvlib")
    reg.register(_ThirdParty(), name="third_party", distribution="third-party-test")
    return reg


def test_third_party_kind_works_in_the_config():
    reg = _throwaway_registry()
    model = _mlp()
    cfg = {"approximator": {"kind": "identity", "scale": 3.0}, "damping": {"kind": "tikhonov", "value": 0.5}}
    pre = build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=reg, generator=torch.Generator().manual_seed(0))
    pre.update(_batch())
    g = torch.randn(pre.p, generator=torch.Generator().manual_seed(3), dtype=DT)
    # (3·I⊗I + 0.5·I)⁻¹ g
    torch.testing.assert_close(pre.apply(g), g / 3.5, rtol=1e-12, atol=0)
    with pytest.raises(ConfigError, match=r"approximator\.scale:"):
        build_preconditioner(model, nn.CrossEntropyLoss(), {"approximator": {"kind": "identity", "scale": 0}}, registry=reg)
    # not known to the default registry
    with pytest.raises(UnknownKindError, match="identity"):
        build_preconditioner(model, nn.CrossEntropyLoss(), cfg, registry=load_registry(external=False))


def test_exported_names():
    for name in ("PreconditionerConfig", "Preconditioner", "build_preconditioner", "UpdateInfo"):
        assert hasattr(precond, name)
