"""Benchmark problems: a model, a loss, a data set and a batch size (DESIGN.md §7).

The reference problems are the three deep auto-encoders of the thesis's appendix 3.D
and the deep linear networks with batch normalization of §4.3.3; a few small extra
problems cover what those do not (convolutions, transposed convolutions, a tiny
network where exact natural gradient is affordable).

=============================  ============================================================
builder                        model (widths of the Linear layers, or layers) / loss / data
=============================  ============================================================
``mnist_autoencoder``          784-1000-500-250-30-250-500-1000-784, BCE, MNIST (3.D, problem 1)
``faces_autoencoder``          625-2000-1000-500-30-500-1000-2000-625, MSE, FACES (3.D, problem 2)
``curves_autoencoder``         784-400-200-100-50-25-6-25-50-100-200-400-784, BCE, CURVES (3.D, 3)
``deep_linear_bn``             784-1000-900-…-100-50-20-10 linear + batch norm, CE, MNIST (§4.3.3)
``deep_linear_bn_narrow``      64 linear layers of width 10 + batch norm, CE, MNIST (§4.3.3)
``digits_autoencoder``         64-32-8-32-64, BCE, 8×8 digits
``digits_mlp``                 64-15-15-15-15-10, CE, 1,000 8×8 digits (the seed-002 figure)
``mnist_cnn``                  2 × (Conv2d 5×5, ReLU, max-pool) + Linear, CE, MNIST
``mnist_conv_autoencoder``     2 strided Conv2d + 2 ConvTranspose2d (output_padding), BCE, MNIST
``mnist_conv_bn_autoencoder``  the same with BatchNorm2d after the first three layers (§5.3.1)
``mnist_resnet``               conv-BN stem + 3 residual blocks (BatchNorm2d) + avg pool, CE, MNIST
``char_lm``                    4-block causal transformer LM, tied embedding, CE per character,
                               Python standard-library source text
=============================  ============================================================

Every builder has the signature ``builder(*, small=False, seed=0, path=None) -> Problem``:

* ``small=True`` keeps the depth and the kind of every layer but shrinks hidden widths
  (and the MNIST/CURVES training sets), for tests and the quick benchmark. The default
  is the real architecture.
* ``seed`` seeds the data: the train/test split and the generated CURVES images (the
  text of ``char_lm`` is split by position and does not depend on it).
  Model weights are seeded separately, by the argument of :attr:`Problem.model_fn`.
* ``path`` replaces the shipped data with the user's own files: a folder of MNIST idx
  files (full MNIST, or Fashion-MNIST as the thesis used for the narrow linear network),
  a ``.npy`` of face images, a digits csv, a ``.npy`` of CURVES images, or a text file or
  folder of text files for ``char_lm``.

Conventions shared by all models:

* Inputs are flattened ``[B, d]`` rows of :class:`~curvlib.bench.data.Dataset`; the conv
  models unflatten to ``[B, 1, 28, 28]`` themselves (an ``nn.Unflatten`` first layer), so
  every image problem feeds its data the same way. The language model (``char_lm``) takes
  windows of token ids ``[B, T]`` of a :class:`~curvlib.bench.data.TokenDataset` and
  returns logits ``[B, V, T]``, its targets the next tokens ``[B, T]``.
* A sigmoid output followed by binary cross-entropy (the thesis's choice) is written as
  a linear output layer producing **logits** and ``nn.BCEWithLogitsLoss``: the same
  function, computed stably, and the form curvature code expects (the model's output is
  the natural parameter of the Bernoulli distribution).
* Losses are stock torch modules with ``reduction="mean"``. For ``MSELoss`` and
  ``BCEWithLogitsLoss`` that mean runs over the batch **and** the output features, so
  the loss is the thesis's per-sample sum over features (3.D) divided by ``d_out``.
* Weights are drawn from the distribution PyTorch uses by default for Linear and conv
  layers, U(−1/√fan_in, 1/√fan_in) for weights and biases, but from a seeded
  ``torch.Generator``: the module is built on the ``meta`` device and initialized
  afterwards, so building a model never touches the global RNG. Batch and layer norms
  start at weight 1, bias 0 (running mean 0, running variance 1); attention and embeddings
  as :func:`init_module` says. The thesis does not state an initialization.

One module per group of builders (:mod:`~curvlib.bench.problems.thesis`,
:mod:`~curvlib.bench.problems.extras`, :mod:`~curvlib.bench.problems.modern`), on top of
:class:`Problem` (:mod:`~curvlib.bench.problems.problem`), the seeded model construction
(:mod:`~curvlib.bench.problems.model_factory`) and the parts the builders share
(:mod:`~curvlib.bench.problems.parts`); :data:`PROBLEMS` names them all.
"""

from __future__ import annotations

from collections.abc import Callable

from curvlib.bench.problems.extras import (
    digits_autoencoder,
    digits_mlp,
    mnist_cnn,
    mnist_conv_autoencoder,
    mnist_conv_bn_autoencoder,
)
from curvlib.bench.problems.model_factory import ModelFactory, init_module
from curvlib.bench.problems.modern import MODERN_METHODS, char_lm, default_methods_of, mnist_resnet
from curvlib.bench.problems.problem import Problem, Task
from curvlib.bench.problems.thesis import (
    CURVES_AUTOENCODER_WIDTHS,
    DEEP_LINEAR_BN_WIDTHS,
    FACES_AUTOENCODER_WIDTHS,
    MNIST_AUTOENCODER_WIDTHS,
    curves_autoencoder,
    deep_linear_bn,
    deep_linear_bn_narrow,
    faces_autoencoder,
    mnist_autoencoder,
)

__all__ = [
    "Problem",
    "Task",
    "PROBLEMS",
    "ModelFactory",
    "init_module",
    "MNIST_AUTOENCODER_WIDTHS",
    "FACES_AUTOENCODER_WIDTHS",
    "CURVES_AUTOENCODER_WIDTHS",
    "DEEP_LINEAR_BN_WIDTHS",
    "mnist_autoencoder",
    "faces_autoencoder",
    "curves_autoencoder",
    "deep_linear_bn",
    "deep_linear_bn_narrow",
    "digits_autoencoder",
    "digits_mlp",
    "mnist_cnn",
    "mnist_conv_autoencoder",
    "mnist_conv_bn_autoencoder",
    "mnist_resnet",
    "char_lm",
    "MODERN_METHODS",
    "default_methods_of",
]

PROBLEMS: dict[str, Callable[..., Problem]] = {
    "mnist_autoencoder": mnist_autoencoder,
    "faces_autoencoder": faces_autoencoder,
    "curves_autoencoder": curves_autoencoder,
    "deep_linear_bn": deep_linear_bn,
    "deep_linear_bn_narrow": deep_linear_bn_narrow,
    "digits_autoencoder": digits_autoencoder,
    "digits_mlp": digits_mlp,
    "mnist_cnn": mnist_cnn,
    "mnist_conv_autoencoder": mnist_conv_autoencoder,
    "mnist_conv_bn_autoencoder": mnist_conv_bn_autoencoder,
    "mnist_resnet": mnist_resnet,
    "char_lm": char_lm,
}
"""Builder of each problem by name: ``PROBLEMS[name](small=..., seed=..., path=...)``."""
