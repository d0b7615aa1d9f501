"""The example distributions of ``plugins/`` as a user gets them: installed next to curvlib
(``pip install -c constraints.txt ./plugins/<name>``) and found through the ``curvlib``
entry-point group only.

Every folder ``plugins/<name>/`` with a ``pyproject.toml`` is checked; one that is not
installed in this environment is skipped with the command that installs it (CI installs
them all).  The CLI runs in a subprocess, as a user runs it, once with external plugins and
once with ``CURVLIB_DISABLE_EXTERNAL_PLUGINS=1``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from curvlib.plugins import DISABLE_EXTERNAL_ENV, ENTRY_POINT_GROUP, load_registry

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIRS = sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))

#: kinds each distribution must provide, (family, kind); others it registers are listed too
EXPECTED = {
    "curvlib-ekfac": {("approximators", "ekfac")},
    "curvlib-grouped-newton": {("coarse_spaces", "grouped_direction"), ("optimizers", "grouped_newton")},
}


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs Python ≥ 3.11 or tomli")
    with path.open("rb") as fh:
        return tomllib.load(fh)


@dataclass(frozen=True)
class Plugin:
    folder: Path
    name: str
    version: str
    entry_points: dict[str, str]  # the pyproject's [project.entry-points.curvlib] table
    dist: md.Distribution

    @property
    def install_command(self) -> str:
        return f"pip install -c constraints.txt ./plugins/{self.folder.name}"


@pytest.fixture(params=PLUGIN_DIRS, ids=[p.name for p in PLUGIN_DIRS])
def plugin(request) -> Plugin:
    folder: Path = request.param
    project = _load_toml(folder / "pyproject.toml")["project"]
    name = project["name"]
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        pytest.skip(f"{name} is not installed in this environment: run `pip install -c constraints.txt "
                    f"./plugins/{folder.name}` (CI installs every plugin before the tests)")
    eps = dict(project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {}))
    return Plugin(folder, name, project["version"], eps, dist)


def _plugins_list_subprocess(tmp_dir: Path) -> str:
    """``curvlib plugins list`` in a fresh interpreter with ``CURVLIB_DISABLE_EXTERNAL_PLUGINS=1``."""
    env = {**os.environ, DISABLE_EXTERNAL_ENV: "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "curvlib.cli", "plugins", "list"],
        cwd=tmp_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"`curvlib plugins list` failed (rc {proc.returncode}):\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def listing(tmp_path_factory) -> dict[bool, str]:
    """``curvlib plugins list`` output with external plugins (key False: in this process, whose
    environment does not disable them) and with ``CURVLIB_DISABLE_EXTERNAL_PLUGINS=1`` (key
    True: a subprocess, as a user sets the variable)."""
    from curvlib.cli import main

    if not PLUGIN_DIRS:
        pytest.skip("no plugins/<name>/pyproject.toml")
    buf = io.StringIO()
    env_before = os.environ.pop(DISABLE_EXTERNAL_ENV, None)
    try:
        with contextlib.redirect_stdout(buf):
            assert main(["plugins", "list"]) == 0
    finally:
        if env_before is not None:
            os.environ[DISABLE_EXTERNAL_ENV] = env_before
    return {False: buf.getvalue(), True: _plugins_list_subprocess(tmp_path_factory.mktemp("cli"))}


def _sections(text: str) -> dict[str, list[str]]:
    """The listing's lines by family header (``approximators (7)``)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = line.split(" (")[0]
            out[current] = []
        elif current is not None:
            out[current].append(line.strip())
    return out


def _kinds_of(distribution: str) -> set[tuple[str, str]]:
    registry = load_registry(external=True)
    return {(fam.name, spec.kind) for fam in registry.families() for spec in fam if spec.distribution == distribution}


def test_plugins_list_shows_the_kinds_with_their_distribution(plugin, listing):
    kinds = _kinds_of(plugin.name)
    assert kinds, f"expected {plugin.name} to register at least one kind through its entry points; it registers none"
    assert EXPECTED.get(plugin.name, set()) <= kinds, (EXPECTED[plugin.name], kinds)
    sections = _sections(listing[False])
    label = f"{plugin.name} {plugin.dist.version}"
    for family, kind in sorted(kinds):
        lines = [line for line in sections.get(family, []) if line.split()[:1] == [kind]]
        assert lines, f"expected `curvlib plugins list` to show {family} kind {kind!r}; section {family}: {sections.get(family)}"
        assert label in lines[0], f"expected the line of {kind!r} to name its distribution {label!r}: {lines[0]!r}"
    assert plugin.name not in "\n".join(sections.get("failed plugins", [])), listing[False]


def test_disabling_external_plugins_removes_them(plugin, listing):
    text = listing[True]
    sections = _sections(text)
    for family, kind in sorted(_kinds_of(plugin.name)):
        assert not any(line.split()[:1] == [kind] for line in sections.get(family, [])), (
            f"expected {family} kind {kind!r} to vanish with {DISABLE_EXTERNAL_ENV}=1:\n{text}"
        )
    assert plugin.name not in text
    assert any(line.split()[:1] == ["kfac"] for line in sections["approximators"])  # curvlib's own remain


def test_registers_only_through_its_entry_points(plugin):
    installed = {ep.name: ep.value for ep in plugin.dist.entry_points if ep.group == ENTRY_POINT_GROUP}
    assert installed == plugin.entry_points, (
        f"the installed {plugin.name} declares curvlib entry points {installed}, its pyproject.toml "
        f"{plugin.entry_points}: reinstall it ({plugin.install_command})"
    )
    registry = load_registry(external=True)
    assert not [f for f in registry.failures if f.distribution == plugin.name], [str(f) for f in registry.failures]
    for family in registry.families():
        for spec in family:
            if spec.distribution == plugin.name:
                assert spec.plugin in plugin.entry_points, (family.name, spec.kind, spec.plugin)
    assert plugin.dist.version == plugin.version, (
        f"installed {plugin.name} {plugin.dist.version}, the folder says {plugin.version}: reinstall ({plugin.install_command})"
    )


def test_installed_copy_is_the_folder_s_source(plugin):
    """A regular (non-editable) install must carry the folder's current sources; a stale
    install fails here with the command to refresh it."""
    src = plugin.folder / "src"
    if not src.is_dir():
        pytest.skip(f"{plugin.folder.name} has no src/ layout")
    files = {str(f).replace("\\", "/"): f for f in (plugin.dist.files or [])}
    stale = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        if rel not in files:
            if any(name.endswith(".pth") for name in files):
                pytest.skip(f"{plugin.name} is installed in editable mode (its sources are the folder's)")
            stale.append(f"{rel} (not installed)")
        elif Path(plugin.dist.locate_file(files[rel])).read_bytes() != path.read_bytes():
            stale.append(rel)
    assert not stale, f"the installed {plugin.name} differs from plugins/{plugin.folder.name}/src in {stale}: {plugin.install_command}"
