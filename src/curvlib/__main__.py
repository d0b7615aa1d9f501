"""``python -m curvlib``: the ``curvlib`` command line (:func:`curvlib.cli.main`), for an
environment whose scripts directory is not on ``PATH``."""

from curvlib.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
