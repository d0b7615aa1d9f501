"""curvlib's plugin system (pluggy, entry-point group ``curvlib``).

- :data:`hookimpl` marks a plugin's hook implementations;
- :class:`Registry` discovers and holds every kind of every family;
- :data:`BUILTIN_PLUGIN_MODULES` lists curvlib's own plugins, which are declared as
  entry points in curvlib's ``pyproject.toml`` like any third-party plugin.
"""

from __future__ import annotations

from curvlib.plugins.hookspecs import BUILTIN_PLUGIN_MODULES, ENTRY_POINT_GROUP, hookimpl, hookspec
from curvlib.plugins.registry import (
    BUILTIN_DISTRIBUTION,
    DISABLE_EXTERNAL_ENV,
    FAMILIES,
    Family,
    FamilyRegistrar,
    PluginFailure,
    PluginSpec,
    Registry,
)

__all__ = [
    "BUILTIN_DISTRIBUTION",
    "BUILTIN_PLUGIN_MODULES",
    "DISABLE_EXTERNAL_ENV",
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "Family",
    "FamilyRegistrar",
    "PluginFailure",
    "PluginSpec",
    "Registry",
    "hookimpl",
    "hookspec",
    "load_registry",
]


def load_registry(*, external: bool | None = None, strict: bool = False) -> Registry:
    """Discover every plugin and return a fresh :class:`Registry` (see :meth:`Registry.load`)."""
    return Registry.load(external=external, strict=strict)
