"""The errors of the data loaders.

They belong with the others in :mod:`curvlib.errors`; they live here until that file is
free to edit (they already descend from :class:`~curvlib.errors.CurvlibError` and the
matching built-in).
"""

from __future__ import annotations

from curvlib.errors import CurvlibError

__all__ = ["DataFileError", "MissingDataPackageError"]


class MissingDataPackageError(CurvlibError, ImportError):
    """A loader needs a data file shipped by a PyPI package that is not installed."""


class DataFileError(CurvlibError, ValueError):
    """A data file is missing from where it should be, or its contents are malformed."""
