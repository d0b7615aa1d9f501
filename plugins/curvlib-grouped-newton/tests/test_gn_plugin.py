"""The distribution reaches curvlib only through the ``curvlib`` entry-point group."""

from __future__ import annotations

from gn_reference import single_thread  # noqa: F401  (autouse fixture)
import importlib.metadata as md
import io
from contextlib import redirect_stdout

import pytest

from curvlib.plugins import ENTRY_POINT_GROUP, load_registry

DIST = "curvlib-grouped-newton"


@pytest.fixture(scope="module")
def dist():
    try:
        return md.distribution(DIST)
    except md.PackageNotFoundError:
        pytest.fail(f"{DIST} is not installed: pip install -c constraints.txt ./plugins/curvlib-grouped-newton")


def test_entry_points_are_only_in_the_curvlib_group(dist):
    eps = list(dist.entry_points)
    assert [(ep.group, ep.name, ep.value) for ep in eps] == [
        (ENTRY_POINT_GROUP, "grouped_newton", "curvlib_grouped_newton.plugin")
    ]
    assert any(ep.name == "grouped_newton" for ep in md.entry_points(group=ENTRY_POINT_GROUP))


def test_discovered_by_load_registry(dist):
    reg = load_registry()
    assert not [f for f in reg.failures if f.distribution == DIST], [str(f) for f in reg.failures]
    spec = reg.coarse_spaces.get("grouped_direction")
    assert (spec.plugin, spec.distribution) == ("grouped_newton", DIST)
    assert reg.plugins["grouped_newton"] == DIST
    assert reg.distribution_version(DIST) == dist.version
    # it adds exactly two kinds: the coarse space and the optimizer
    ours = [(s.family, s.kind) for fam in reg.families() for s in fam if s.distribution == DIST]
    assert ours == [("coarse_spaces", "grouped_direction"), ("optimizers", "grouped_newton")]
    opt = reg.optimizers.get("grouped_newton")
    assert opt.metadata["needs_batch"] is True and opt.metadata["default_lr"] > 0


def test_external_plugins_can_be_disabled(dist, monkeypatch):
    assert "grouped_direction" not in load_registry(external=False).coarse_spaces
    monkeypatch.setenv("CURVLIB_DISABLE_EXTERNAL_PLUGINS", "1")
    assert "grouped_direction" not in load_registry().coarse_spaces


def test_listed_by_the_cli(dist):
    from curvlib.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plugins", "list"]) == 0
    line = next(ln for ln in out.getvalue().splitlines() if "grouped_direction" in ln)
    assert DIST in line and dist.version in line
