"""The ``curvlib`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from curvlib.plugins import load_registry

__all__ = ["main"]


def _plugins_list(args: argparse.Namespace) -> int:
    registry = load_registry(external=False if args.no_external else None)
    out = sys.stdout
    for family in registry.families():
        out.write(f"{family.name} ({len(family)})\n")
        if not len(family):
            out.write("  (none)\n")
        for spec in family:
            dist = f"{spec.distribution} {registry.distribution_version(spec.distribution)}"
            out.write(f"  {spec.kind:<22} {dist:<28} {spec.description}\n")
    if registry.failures:
        out.write(f"failed plugins ({len(registry.failures)})\n")
        for failure in registry.failures:
            out.write(f"  {failure}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvlib", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="inspect installed plugins")
    psub = plugins.add_subparsers(dest="plugins_command", required=True)
    plist = psub.add_parser("list", help="every family with its kinds and the distribution providing each")
    plist.add_argument("--no-external", action="store_true", help="load only curvlib's own plugins")
    plist.set_defaults(func=_plugins_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
