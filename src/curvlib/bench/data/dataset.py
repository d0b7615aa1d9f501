"""The image data set of the benchmark problems and its seeded train/test split.

A :class:`Dataset` holds float32 inputs in ``[0, 1]`` flattened to ``[n, d]``
(``image_shape`` says how to fold them back) and int64 labels where the data has any.
Unless a file already fixes the split, :func:`image_dataset` splits with
:func:`split_train_test`: a permutation drawn from ``numpy.random.default_rng(seed)``, so
the same seed gives the same split on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from curvlib.errors import ConfigError, ShapeError

__all__ = ["Dataset", "float_tensor", "image_dataset", "label_tensor", "split_train_test"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test pair of flattened inputs, with labels when the data has them.

    Attributes:
        name: short id (``"mnist_5k"``, ``"faces"``, ...).
        X_train: ``[n_train, d]`` float32 inputs in ``[0, 1]``.
        y_train: ``[n_train]`` int64 labels, or ``None`` for unlabelled data (CURVES).
        X_test: ``[n_test, d]`` float32 (``n_test`` may be 0).
        y_test: ``[n_test]`` int64 labels, or ``None``.
        image_shape: ``(C, H, W)`` with ``C·H·W == d``: ``X.view(-1, *image_shape)``
            recovers the images.
        description: one line on what the data is and how it was split.
        source: where it came from (file path, or the generator and its seed).
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor | None
    X_test: torch.Tensor
    y_test: torch.Tensor | None
    image_shape: tuple[int, ...]
    description: str
    source: str

    def __post_init__(self) -> None:
        d = math.prod(self.image_shape)
        for split, X, y in (("train", self.X_train, self.y_train), ("test", self.X_test, self.y_test)):
            if X.ndim != 2 or X.shape[1] != d:
                raise ShapeError(
                    f"Dataset {self.name!r}: X_{split} must be [n, {d}] for image_shape "
                    f"{self.image_shape}, got {tuple(X.shape)}"
                )
            if X.dtype != torch.float32:
                raise ShapeError(f"Dataset {self.name!r}: X_{split} must be float32, got {X.dtype}")
            if y is not None and (y.shape != (X.shape[0],) or y.dtype != torch.int64):
                raise ShapeError(
                    f"Dataset {self.name!r}: y_{split} must be int64 [{X.shape[0]}], "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
        if (self.y_train is None) != (self.y_test is None):
            raise ShapeError(f"Dataset {self.name!r}: labels must be given for both splits or neither")

    @property
    def n_train(self) -> int:
        return self.X_train.shape[0]

    @property
    def n_test(self) -> int:
        return self.X_test.shape[0]

    @property
    def n_features(self) -> int:
        """``d``, the length of one flattened input."""
        return self.X_train.shape[1]

    @property
    def n_classes(self) -> int | None:
        """Number of label values (max label + 1), ``None`` for unlabelled data."""
        if self.y_train is None:
            return None
        labels = torch.cat([self.y_train, self.y_test])
        return int(labels.max()) + 1 if labels.numel() else 0

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` training and ``n_test`` test rows (``None`` keeps all).

        The splits are already shuffled by the loaders, so a prefix is a random subset.
        """
        for label, k, n in (("n_train", n_train, self.n_train), ("n_test", n_test, self.n_test)):
            if k is not None and not 0 <= k <= n:
                raise ConfigError(f"Dataset {self.name!r}: {label} must be in [0, {n}], got {k}")
        tr = slice(None) if n_train is None else slice(0, n_train)
        te = slice(None) if n_test is None else slice(0, n_test)
        return replace(
            self,
            X_train=self.X_train[tr],
            y_train=None if self.y_train is None else self.y_train[tr],
            X_test=self.X_test[te],
            y_test=None if self.y_test is None else self.y_test[te],
            description=f"{self.description} (subset: {self.X_train[tr].shape[0]} train, "
            f"{self.X_test[te].shape[0]} test)",
        )


def split_train_test(
    X: np.ndarray, y: np.ndarray | None, *, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Shuffle rows with ``numpy.random.default_rng(seed)`` and cut off a test part.

    Args:
        X: ``[n, d]``.
        y: ``[n]`` or ``None``.
        test_fraction: in ``[0, 1)``; the test part has ``round(n·test_fraction)`` rows.
        seed: the permutation's seed.

    Returns:
        ``(X_train [n - n_test, d], y_train, X_test [n_test, d], y_test)``.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    n = X.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    if y is None:
        return X[train], None, X[test], None
    return X[train], y[train], X[test], y[test]


def image_dataset(
    name: str,
    X: np.ndarray,
    y: np.ndarray | None,
    *,
    image_shape: tuple[int, ...],
    test_fraction: float,
    seed: int,
    description: str,
    source: str,
) -> Dataset:
    """A :class:`Dataset` of images ``X`` ``[n, d]`` (values in ``[0, 1]``) and labels ``y``
    ``[n]`` (or ``None``), split by :func:`split_train_test`; the split is appended to
    ``description``."""
    Xtr, ytr, Xte, yte = split_train_test(X, y, test_fraction=test_fraction, seed=seed)
    split = f"seeded split (seed={seed}, test_fraction={test_fraction}): {Xtr.shape[0]} train, {Xte.shape[0]} test"
    return Dataset(
        name=name,
        X_train=float_tensor(Xtr),
        y_train=label_tensor(ytr),
        X_test=float_tensor(Xte),
        y_test=label_tensor(yte),
        image_shape=image_shape,
        description=f"{description}; {split}",
        source=source,
    )


def float_tensor(X: np.ndarray) -> torch.Tensor:
    """``X`` as a contiguous float32 tensor of the same shape."""
    return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))


def label_tensor(y: np.ndarray | None) -> torch.Tensor | None:
    """Labels ``y`` ``[n]`` as a contiguous int64 tensor (``None`` stays ``None``)."""
    return None if y is None else torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
