"""Where the data files are: files shipped inside installed PyPI packages, found
*without importing* the package (importing scikit-learn alone costs more than a second),
and files the user points to with ``path=``; reading image arrays from ``.npy`` files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from curvlib.bench.data.errors import DataFileError, MissingDataPackageError

__all__ = ["images_from_npy", "locate_package", "shipped_file", "user_file"]


def locate_package(import_name: str) -> Path | None:
    """Directory of an installed package, found without importing it; ``None`` if absent."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def shipped_file(import_name: str, pip_name: str, relative: str, what: str) -> Path:
    """The file ``relative`` inside the installed package ``import_name`` (PyPI name
    ``pip_name``); ``what`` names the loader in the errors.

    Raises:
        MissingDataPackageError: the package is not installed (the message says what to install).
        DataFileError: it is installed but has no such file.
    """
    root = locate_package(import_name)
    if root is None:
        raise MissingDataPackageError(
            f"{what} reads {import_name}/{relative}, shipped by the PyPI package "
            f"{pip_name!r}, which is not installed: run `pip install {pip_name}` "
            f"(or pass path= to a local copy of the data)"
        )
    file = root / relative
    if not file.is_file():
        raise DataFileError(
            f"{what}: the installed {pip_name!r} package at {root} has no {relative}; "
            f"a release that ships it is needed (`pip install -U {pip_name}`), or pass path="
        )
    return file


def user_file(path: str | Path, what: str) -> Path:
    """``path`` (``~`` expanded) if it exists, else :class:`DataFileError` naming ``what``."""
    file = Path(path).expanduser()
    if not file.exists():
        raise DataFileError(f"{what}: path {str(file)!r} does not exist")
    return file


def images_from_npy(file: Path, what: str) -> np.ndarray:
    """``[n, H, W]`` images from a ``.npy``: integers are 8-bit (0–255), floats in [0, 1]."""
    images = np.load(file, allow_pickle=False)
    if images.ndim != 3:
        raise DataFileError(f"{what}: {file} must hold images [n, H, W], got shape {images.shape}")
    lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 0.0)
    integer = np.issubdtype(images.dtype, np.integer)
    if lo < 0.0 or hi > (255.0 if integer else 1.0):
        raise DataFileError(f"{what}: {file} holds {images.dtype} values in [{lo}, {hi}]; expected "
                            "integers in [0, 255] or floats in [0, 1]")
    images = images.astype(np.float64)
    return images / 255.0 if integer else images
