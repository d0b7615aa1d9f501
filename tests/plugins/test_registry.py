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
    PluginWarning,
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


def test_collision_names_both_distributions_and_the_first_registration_wins(site):
    make_distribution(site, "tp-first", {"tp_first": GOOD_PLUGIN.format(kind="same")}, {"first": "tp_first"})
    make_distribution(site, "tp-second", {"tp_second": GOOD_PLUGIN.format(kind="same")}, {"second": "tp_second"})
    registry = Registry.load()
    (failure,) = registry.failures
    assert (failure.plugin, failure.distribution) == ("second", "tp-second")
    assert isinstance(failure.error, PluginCollisionError)
    msg = str(failure)
    assert "dampings" in msg and "'same'" in msg and "tp-first" in msg and "tp-second" in msg
    with pytest.warns(PluginWarning, match=r"'same'.*tp-first.*tp-second"):
        assert registry.dampings.get("same").distribution == "tp-first"
    assert "second" not in registry.plugins
    with pytest.raises(PluginCollisionError, match=r"'same'.*tp-first.*tp-second"):
        Registry.load(strict=True)


CLASH_PLUGIN = """
    from curvlib.config import StrictModel
    from curvlib.plugins import hookimpl

    class Options(StrictModel):
        value: float = 1.0

    class Fake:
        '''Not the built-in (test plugin).'''
        def __init__(self, options):
            raise AssertionError("the colliding plugin must never be built")

    @hookimpl
    def curvlib_register_dampings(registry):
        registry.add("clash_extra", Fake, options=Options)
        registry.add("tikhonov", Fake, options=Options)
"""


def test_collision_with_a_builtin_keeps_the_builtin_and_everything_else_working(site):
    import warnings

    import torch
    from torch import nn

    from curvlib.optim import NaturalGradient

    make_distribution(site, "tp-clash", {"tp_clash": CLASH_PLUGIN}, {"clash": "tp_clash"})
    make_distribution(site, "tp-good", {"tp_good": GOOD_PLUGIN.format(kind="constant")}, {"good": "tp_good"})
    registry = Registry.load()  # does not raise
    (failure,) = registry.failures
    assert (failure.plugin, failure.distribution, failure.stage) == ("clash", "tp-clash", "registering")
    assert isinstance(failure.error, PluginCollisionError)
    msg = str(failure)
    assert "dampings kind 'tikhonov'" in msg and "'curvlib'" in msg and "'tp-clash'" in msg
    assert "\n" not in msg
    # the colliding plugin is left out entirely; the other plugin and every built-in load
    assert "clash_extra" not in registry.dampings and "clash" not in registry.plugins
    assert "constant" in registry.dampings
    for name in BUILTIN_PLUGIN_MODULES:
        assert registry.plugins[name] == "curvlib"
    # its other kind is unknown, and the message says which plugin failed
    with pytest.raises(UnknownKindError, match=r"clash \(tp-clash: PluginCollisionError\)"):
        registry.dampings.get("clash_extra")
    # the collided kind is the built-in's, with a warning naming both
    with pytest.warns(PluginWarning, match=r"dampings kind 'tikhonov'.*'curvlib'.*'tp-clash'"):
        spec = registry.dampings.get("tikhonov")
    assert spec.distribution == "curvlib"
    # a NaturalGradient whose kinds do not involve the collision builds and steps, silently
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        opt = NaturalGradient(model, nn.CrossEntropyLoss(), {"damping": {"kind": "heuristic", "value": 1e-2}},
                              lr=0.1, registry=registry, generator=torch.Generator().manual_seed(0))
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(X), y).backward()
        opt.step(batch=(X, y))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    # and one that asks for it gets the built-in
    with pytest.warns(PluginWarning, match="tikhonov"):
        NaturalGradient(model, nn.CrossEntropyLoss(), {"damping": {"kind": "tikhonov", "value": 1e-2}},
                        lr=0.1, registry=registry)


def test_plugin_calling_sys_exit_on_import_is_recorded_not_fatal(site):
    make_distribution(
        site,
        "tp-exit",
        {"tp_exit": "import sys\nsys.exit(3)\n", "tp_fine": GOOD_PLUGIN.format(kind="fine")},
        {"exiting": "tp_exit", "fine": "tp_fine"},
    )
    registry = Registry.load()  # the process is still alive
    assert "fine" in registry.dampings
    (failure,) = registry.failures
    assert (failure.plugin, failure.distribution) == ("exiting", "tp-exit")
    assert isinstance(failure.error, PluginLoadError)
    msg = str(failure)
    assert "called sys.exit(3) on import" in msg and "entry point exiting = tp_exit" in msg and "tp-exit" in msg
    with pytest.raises(PluginLoadError, match=r"exiting.*tp-exit.*sys\.exit\(3\)"):
        Registry.load(strict=True)


def test_sys_exit_in_a_registration_hook_is_recorded(site):
    source = """
        import sys
        from curvlib.plugins import hookimpl

        @hookimpl
        def curvlib_register_dampings(registry):
            sys.exit("bye")
    """
    make_distribution(site, "tp-exithook", {"tp_exithook": source}, {"exithook": "tp_exithook"})
    registry = Registry.load()
    (failure,) = registry.failures
    assert failure.plugin == "exithook" and failure.stage == "registering"
    assert "called sys.exit('bye') while registering" in str(failure)


def test_keyboard_interrupt_during_import_propagates_with_a_note(site):
    make_distribution(site, "tp-ctrlc", {"tp_ctrlc": "raise KeyboardInterrupt\n"}, {"ctrlc": "tp_ctrlc"})
    with pytest.raises(KeyboardInterrupt) as info:
        Registry.load()
    if sys.version_info >= (3, 11):
        notes = " ".join(info.value.__notes__)
        assert 'plugin "ctrlc"' in notes and "tp-ctrlc" in notes and "tp_ctrlc" in notes


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


def test_cli_plugins_list_reports_collisions_and_exits_one_line_each(site, capsys):
    from curvlib.cli import main

    make_distribution(site, "tp-clash", {"tp_clash": CLASH_PLUGIN}, {"clash": "tp_clash"})
    make_distribution(site, "tp-exit", {"tp_exit": "import sys\nsys.exit(3)\n"}, {"exiting": "tp_exit"})
    make_distribution(site, "tp-cli", {"tp_cli": GOOD_PLUGIN.format(kind="cli_kind")}, {"cli": "tp_cli"})
    assert main(["plugins", "list"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Traceback" not in out + captured.err
    assert "cli_kind" in out and "clash_extra" not in out
    lines = out.splitlines()
    failures = lines[lines.index("failed plugins (2)") + 1:]
    assert len(failures) == 2, failures
    clash = next(line for line in failures if '"clash"' in line)
    assert "PluginCollisionError" in clash and "dampings kind 'tikhonov'" in clash
    assert "'curvlib'" in clash and "'tp-clash'" in clash
    exiting = next(line for line in failures if '"exiting"' in line)
    assert "called sys.exit(3) on import" in exiting and "tp-exit" in exiting
