"""The architecture of DESIGN.md §2, read from the import statements of the package.

Every ``import`` counts, at module level, inside a function or under ``TYPE_CHECKING``:
no two modules of curvlib import each other, the plug-in families (approximators, damping,
coarse) never import one another, and ``linalg`` knows nothing of the layers above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import curvlib

ROOT = Path(curvlib.__file__).resolve().parent


def _module_name(file: Path) -> str:
    parts = ("curvlib", *file.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(f): f for f in sorted(ROOT.rglob("*.py"))}


def _imports(file: Path) -> set[str]:
    """The curvlib modules ``file`` imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in MODULES:
            for alias in node.names:  # ``from curvlib.bench import report`` imports the module report
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
    return found


EDGES = {name: _imports(file) - {name} for name, file in MODULES.items()}


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_two_modules_import_each_other():
    mutual = sorted({tuple(sorted((a, b))) for a, targets in EDGES.items() for b in targets if a in EDGES.get(b, ())})
    assert not mutual, f"modules importing each other: {mutual}"


def test_plugin_families_never_import_each_other():
    families = {"curvlib.approximators", "curvlib.damping", "curvlib.coarse"}
    crossing = sorted((a, b) for a, targets in EDGES.items() for b in targets
                      if _package(a) in families and _package(b) in families and _package(a) != _package(b))
    assert not crossing, f"a family imports another family: {crossing}"


def test_linalg_imports_only_the_side_pillars():
    allowed = {"curvlib.linalg", "curvlib.errors", "curvlib.config"}
    upward = sorted((a, b) for a, targets in EDGES.items() for b in targets
                    if _package(a) == "curvlib.linalg" and _package(b) not in allowed)
    assert not upward, f"linalg imports a layer above it: {upward}"
