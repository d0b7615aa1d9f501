"""The plugin registry, exercised with real throwaway distributions on sys.path.

Each test writes a ``<name>-<version>.dist-info`` folder with ``METADATA`` and
``entry_points.txt`` next to a plugin module, exactly what ``pip install`` leaves
behind, so discovery goes through ``importlib.metadata`` like for a user.
"""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from curvlib.config import StrictModel
from curvlib.errors import (
    ConfigError,
    PluginCollisionError,
    PluginError,
    PluginLoadError,
    UnknownKindError,
)
from curvlib.plugins import (
    BUILTIN_PLUGIN_MODULES,
    DISABLE_EXTERNAL_ENV,
    FAMILIES,
    Registry,
    hookimpl,
    load_registry,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]


def make_distribution(tmp: Path, dist: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write an installed-looking distribution: modules plus a .dist-info folder."""
    for modname, source in modules.items():
        (tmp / f"{modname}.py").write_text(textwrap.dedent(source))
    info = tmp / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[curvlib]\n{lines}\n")


GOOD_PLUGIN = """
    from pydantic import Field
    from curvlib.config import StrictModel
    from curvlib.plugins import hookimpl

    class ConstantOptions(StrictModel):
        value: float = Field(1.0, gt=0)

    class ConstantDamping:
        '''A damping that returns a constant (test plugin).'''
        def __init__(self, options):
            self.options = options

    @hookimpl
    def curvlib_register_dampings(registry):
        registry.add("{kind}", ConstantDamping, options=ConstantOptions)
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A temporary site directory prepended to sys.path; modules imported from it are forgotten afterwards."""
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_EXTERNAL_ENV, raising=False)
    importlib.invalidate_caches()
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("tp_"):
            del sys.modules[name]
    importlib.invalidate_caches()


def test_builtins_are_loaded_through_entry_points_of_the_curvlib_distribution():
    registry = load_registry(external=False)
    assert not registry.failures, [str(f) for f in registry.failures]
    for name in BUILTIN_PLUGIN_MODULES:
        assert registry.plugins.get(name) == "curvlib", (name, registry.plugins)


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_pyproject_entry_points_match_builtin_table():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert data["project"]["entry-points"]["curvlib"] == BUILTIN_PLUGIN_MODULES


def test_external_plugin_registers_with_its_distribution_and_validates_options(site):
    make_distribution(site, "tp-good", {"tp_good": GOOD_PLUGIN.format(kind="constant")}, {"good": "tp_good"})
    registry = Registry.load()
    spec = registry.dampings.get("constant")
    assert (spec.plugin, spec.distribution, spec.family) == ("good", "tp-good", "dampings")
    assert spec.description.startswith("A damping that returns a constant")
    spec2, options = registry.dampings.resolve({"kind": "constant", "value": 3.0})
    assert spec2 is spec and options.value == 3.0
    obj = registry.dampings.create("constant", value=2.0)
    assert obj.options.value == 2.0
    with pytest.raises(ConfigError, match="value"):
        registry.dampings.resolve({"kind": "constant", "value": -1.0})
    with pytest.raises(ConfigError, match="not_an_option"):
        registry.dampings.resolve({"kind": "constant", "not_an_option": 1})


def test_options_are_frozen(site):
    make_distribution(site, "tp-good", {"tp_good": GOOD_PLUGIN.format(kind="constant")}, {"good": "tp_good"})
    _, options = Registry.load().dampings.resolve("constant")
    with pytest.raises(Exception):
        options.value = 5.0


def test_broken_plugin_is_reported_and_others_still_load(site):
    make_distribution(
        site,
        "tp-mixed",
        {"tp_ok": GOOD_PLUGIN.format(kind="fine"), "tp_broken": "import this_module_does_not_exist_xyz\n"},
        {"ok": "tp_ok", "broken": "tp_broken"},
    )
    registry = Registry.load()
    assert "fine" in registry.dampings
    assert len(registry.failures) == 1
    failure = registry.failures[0]
    assert (failure.plugin, failure.distribution) == ("broken", "tp-mixed")
    assert 'Error importing plugin "broken"' in str(failure)
    assert "this_module_does_not_exist_xyz" in str(failure)
    assert "Traceback" in failure.traceback
    # builtins unaffected
    for name in BUILTIN_PLUGIN_MODULES:
        assert name in registry.plugins


def test_strict_loading_raises_on_broken_plugin(site):
    make_distribution(site, "tp-broken", {"tp_broken2": "raise RuntimeError('boom')\n"}, {"broken2": "tp_broken2"})
    with pytest.raises(PluginLoadError, match=r'"broken2".*tp-broken.*boom'):
        Registry.load(strict=True)


def test_collision_names_both_distributions(site):
    make_distribution(site, "tp-first", {"tp_first": GOOD_PLUGIN.format(kind="same")}, {"first": "tp_first"})
    make_distribution(site, "tp-second", {"tp_second": GOOD_PLUGIN.format(kind="same")}, {"second": "tp_second"})
    with pytest.raises(PluginCollisionError) as info:
        Registry.load()
    assert "tp-first" in str(info.value) and "tp-second" in str(info.value) and "'same'" in str(info.value)


def test_misspelt_hook_is_caught_and_nothing_is_registered(site):
    source = """
        from curvlib.plugins import hookimpl

        @hookimpl
        def curvlib_register_damping(registry):   # missing 's'
            registry.add("typo", object)
    """
    make_distribution(site, "tp-typo", {"tp_typo": source}, {"typo": "tp_typo"})
    registry = Registry.load()
    assert "typo" not in registry.dampings
    (failure,) = registry.failures
    assert failure.plugin == "typo" and "curvlib_register_damping" in str(failure.error)
    assert isinstance(failure.error, PluginError)


def test_environment_variable_disables_external_plugins(site, monkeypatch):
    make_distribution(site, "tp-good", {"tp_good": GOOD_PLUGIN.format(kind="constant")}, {"good": "tp_good"})
    monkeypatch.setenv(DISABLE_EXTERNAL_ENV, "1")
    registry = Registry.load()
    assert "constant" not in registry.dampings
    assert set(registry.plugins.values()) == {"curvlib"}
    monkeypatch.setenv(DISABLE_EXTERNAL_ENV, "0")
    assert "constant" in Registry.load().dampings


def test_unknown_kind_lists_known_kinds(site):
    make_distribution(site, "tp-good", {"tp_good": GOOD_PLUGIN.format(kind="constant")}, {"good": "tp_good"})
    registry = Registry.load()
    with pytest.raises(UnknownKindError, match=r"unknown damping kind 'nope'.*'constant'"):
        registry.dampings.get("nope")
    with pytest.raises(KeyError):  # also a KeyError for callers that expect one
        registry.dampings.get("nope")
    with pytest.raises(UnknownKindError, match="no 'kind'"):
        registry.dampings.resolve({"value": 1.0})


def test_registry_is_an_object_not_global_state():
    a, b = Registry(), Registry()

    class Options(StrictModel):
        pass

    class Plugin:
        @hookimpl
        def curvlib_register_coarse_spaces(self, registry):
            registry.add("local_only", lambda options: options, options=Options)

    a.register(Plugin(), name="local")
    assert "local_only" in a.coarse_spaces and "local_only" not in b.coarse_spaces
    assert a.coarse_spaces.get("local_only").distribution == "<local>"


def test_registrar_rejects_bad_registrations():
    class BadOptions:
        pass

    class Plugin:
        @hookimpl
        def curvlib_register_dampings(self, registry):
            registry.add("bad", object, options=BadOptions)

    reg = Registry()
    with pytest.raises(PluginError, match="pydantic BaseModel"):
        reg.register(Plugin(), name="bad")
    assert "bad" not in reg.dampings and "bad" not in reg.plugins

    class Upper:
        @hookimpl
        def curvlib_register_dampings(self, registry):
            registry.add("NotLower", object)

    with pytest.raises(PluginError, match="lowercase"):
        Registry().register(Upper(), name="upper")


def test_every_family_has_a_hook():
    assert FAMILIES == ("approximators", "dampings", "coarse_spaces", "curvatures", "layers", "optimizers")
    reg = Registry()
    for fam in FAMILIES:
        assert reg.family(fam).name == fam
    with pytest.raises(UnknownKindError):
        reg.family("nonsense")


def test_cli_plugins_list_shows_kinds_distributions_and_failures(site, capsys):
    from curvlib.cli import main

    make_distribution(
        site,
        "tp-cli",
        {"tp_cli": GOOD_PLUGIN.format(kind="cli_kind"), "tp_clibroken": "raise ImportError('nope')\n"},
        {"cli": "tp_cli", "clibroken": "tp_clibroken"},
    )
    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    for fam in FAMILIES:
        assert fam in out
    line = next(l for l in out.splitlines() if "cli_kind" in l)
    assert "tp-cli 1.2.3" in line
    assert 'Error importing plugin "clibroken" (distribution tp-cli)' in out
    assert main(["plugins", "list", "--no-external"]) == 0
    assert "cli_kind" not in capsys.readouterr().out
