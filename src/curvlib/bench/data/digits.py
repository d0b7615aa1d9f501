"""DIGITS: the 1,797 8×8 handwritten digits shipped by ``scikit-learn``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curvlib.bench.data.dataset import Dataset, image_dataset
from curvlib.bench.data.errors import DataFileError
from curvlib.bench.data.files import shipped_file, user_file

__all__ = ["load_digits"]


def load_digits(path: str | Path | None = None, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 1,797 8×8 handwritten digits of scikit-learn, ``[n, 64]`` in ``[0, 1]``, labels 0–9.

    ``path=None`` reads ``sklearn/datasets/data/digits.csv.gz`` (the file behind
    ``sklearn.datasets.load_digits``) with numpy, without importing scikit-learn;
    ``path`` may name another file of that layout: 64 integer pixels 0–16, then the label.
    """
    if path is None:
        file = shipped_file("sklearn", "scikit-learn", "datasets/data/digits.csv.gz", "load_digits")
    else:
        file = user_file(path, "load_digits")
    table = np.loadtxt(file, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 65:
        raise DataFileError(f"load_digits: {file} must have 65 columns (64 pixels + label), got {table.shape[1]}")
    X = table[:, :64] / 16.0
    y = table[:, 64].astype(np.int64)
    return image_dataset("digits", X, y, image_shape=(1, 8, 8), test_fraction=test_fraction, seed=seed,
                    description="8x8 handwritten digits (scikit-learn), pixels 0-16 scaled to [0, 1]",
                    source=str(file))
