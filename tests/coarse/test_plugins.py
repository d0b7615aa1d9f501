"""The built-in coarse spaces as plugins: registration, distribution, options validation."""

from __future__ import annotations

import pytest

import coarse_reference as ref
from curvlib.coarse import (
    KrylovCoarseSpace,
    KrylovOptions,
    NicolaidesCoarseSpace,
    ResidualCoarseSpace,
    SpectralCoarseSpace,
    TaylorCoarseSpace,
    two_level,
)
from curvlib.errors import ConfigError, UnknownKindError
from curvlib.plugins import load_registry

EXPECTED = {
    "nicolaides": NicolaidesCoarseSpace,
    "spectral": SpectralCoarseSpace,
    "krylov": KrylovCoarseSpace,
    "residual": ResidualCoarseSpace,
    "taylor": TaylorCoarseSpace,
}


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def test_builtin_coarse_spaces_are_registered_by_curvlib(registry):
    fam = registry.coarse_spaces
    assert set(EXPECTED) <= set(fam.kinds())
    for kind, cls in EXPECTED.items():
        spec = fam.get(kind)
        assert spec.factory is cls
        assert spec.distribution == "curvlib"
        assert spec.plugin == "builtin_coarse_spaces"
        assert spec.description
        space = fam.create(kind)
        assert isinstance(space, cls) and space.kind == kind
    assert not [f for f in registry.failures if f.plugin == "builtin_coarse_spaces"]


@pytest.mark.parametrize(
    "config",
    [
        {"kind": "krylov", "iterations": 0},
        {"kind": "krylov", "iterations": "many"},
        {"kind": "krylov", "seed": "random"},
        {"kind": "taylor", "order": 0},
        {"kind": "taylor", "q": -1},
        {"kind": "taylor", "order": 2, "extra": 1},
        {"kind": "residual", "order": 2},
        {"kind": "nicolaides", "seed": "residual"},
        {"kind": "spectral", "source": "somewhere"},
    ],
)
def test_options_reject_bad_input(config, registry):
    with pytest.raises(ConfigError):
        registry.coarse_spaces.create(config)


def test_options_accept_good_input(registry):
    s = registry.coarse_spaces.create({"kind": "krylov", "seed": "residual", "iterations": 3})
    assert s.options == KrylovOptions(seed="residual", iterations=3) and s.depends_on_input
    assert not registry.coarse_spaces.create("krylov").depends_on_input
    assert registry.coarse_spaces.create({"kind": "taylor", "q": 4}).options.order == 4
    with pytest.raises(ConfigError):
        KrylovCoarseSpace(iterations=0)
    with pytest.raises(ConfigError):
        KrylovCoarseSpace(KrylovOptions(), iterations=2)


def test_unknown_kind_lists_the_known_ones(registry):
    F, *_ = ref.make_curvature("mlp", "ggn")
    with pytest.raises(UnknownKindError, match="nicolaides"):
        two_level(None, F, "no_such_space", 1e-3, registry=registry)
    with pytest.raises(ConfigError):
        two_level(None, F, "krylov", 1e-3, registry=registry, iterations=-3)
