"""FACES: 25×25 grey images from Labeled Faces in the Wild, shipped by ``scikit-image``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curvlib.bench.data.dataset import Dataset, image_dataset
from curvlib.bench.data.errors import DataFileError
from curvlib.bench.data.files import images_from_npy, shipped_file, user_file

__all__ = ["load_faces"]


def load_faces(
    path: str | Path | None = None, *, faces_only: bool = False, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """25×25 grey images from Labeled Faces in the Wild, flattened to ``[n, 625]`` in ``[0, 1]``.

    ``path=None`` reads ``skimage/data/lfw_subset.npy`` shipped by ``scikit-image``
    (not imported): 200 images, the first 100 faces (label 1), the next 100 non-face
    crops (label 0). ``path`` may instead name any ``.npy`` of images ``[n, H, W]``,
    floats in ``[0, 1]`` or integers in ``[0, 255]`` (labels then all 1).

    Args:
        faces_only: keep only the 100 faces (the thesis's FACES set holds faces only).
    """
    if path is None:
        file = shipped_file("skimage", "scikit-image", "data/lfw_subset.npy", "load_faces")
        images = images_from_npy(file, "load_faces")
        if images.shape[0] != 200:
            raise DataFileError(f"load_faces: {file} should hold 200 images, got {images.shape[0]}")
        labels = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
        description = "LFW subset (scikit-image): 100 faces (label 1) and 100 non-faces (label 0), [0, 1]"
    else:
        file = user_file(path, "load_faces")
        images = images_from_npy(file, "load_faces")
        labels = np.ones(images.shape[0], np.int64)
        description = f"{images.shape[0]} face images from {file.name}, [0, 1]"
    if faces_only:
        keep = labels == 1
        images, labels = images[keep], labels[keep]
        description += "; faces only"
    n, h, w = images.shape
    return image_dataset("faces", images.reshape(n, h * w), labels, image_shape=(1, h, w),
                    test_fraction=test_fraction, seed=seed, description=description, source=str(file))
