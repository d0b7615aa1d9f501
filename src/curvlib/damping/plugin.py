"""curvlib's built-in damping plugin, registered through the ``curvlib`` entry-point group
exactly like a third-party plugin (see pyproject.toml)."""

from __future__ import annotations
