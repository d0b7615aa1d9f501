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
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from curvlib.bench.data import (
    DataFileError,
    Dataset,
    TokenDataset,
    load_char_corpus,
    load_curves,
    load_digits,
    load_faces,
    load_mnist,
)
from curvlib.bench.models import CharTransformer, ResidualBlock
from curvlib.errors import ConfigError

__all__ = [
    "Problem",
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
    "mnist_resnet",
    "char_lm",
    "MODERN_METHODS",
    "default_methods_of",
]

# The thesis's architectures, appendix 3.D and §4.3.3 (widths of the Linear layers).
MNIST_AUTOENCODER_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
FACES_AUTOENCODER_WIDTHS = (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)
CURVES_AUTOENCODER_WIDTHS = (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)
DEEP_LINEAR_BN_WIDTHS = (784, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10)

Task = Literal["autoencoder", "classification", "next_token"]


# --------------------------------------------------------------------------- models
def init_module(module: nn.Module, generator: torch.Generator, *, embedding_std: float = 1.0) -> nn.Module:
    """(Re-)initialize every parameter and buffer of ``module`` in place from ``generator``.

    The distributions are PyTorch's defaults, drawn from ``generator``:

    * Linear, Conv2d and ConvTranspose2d: weight and bias U(−b, b), ``b = 1/√fan_in`` with
      ``fan_in = weight.shape[1] · prod(kernel)`` (for a transposed convolution, whose
      weight is ``[c_in, c_out, k, k]``, this is PyTorch's own count too);
    * Embedding: N(0, ``embedding_std``²) — PyTorch's N(0, 1) by default; a model whose
      output head shares the embedding (tied weights) wants a smaller scale (``char_lm``
      uses ``1/√d``); the padding row, if any, is zero;
    * MultiheadAttention: Glorot-uniform input projections, zero input-projection bias, the
      output projection as a Linear layer but with a zero bias;
    * batch and layer norms: :meth:`reset_parameters` (weight 1, bias 0, running mean 0,
      running variance 1).

    A parameter shared by several modules (tied weights) is drawn once, by the first module
    that holds it in ``module.named_modules()`` order. A module of any other kind that owns
    parameters or buffers raises :class:`~curvlib.errors.ConfigError`.
    """
    done: set[int] = set()  # ids of the parameters already drawn (tied weights: once)

    def fresh(*params: torch.Tensor | None) -> list[torch.Tensor]:
        todo = [q for q in params if q is not None and id(q) not in done]
        done.update(id(q) for q in todo)
        return todo

    with torch.no_grad():
        for name, sub in module.named_modules():
            if isinstance(sub, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = sub.weight.shape[1] * math.prod(sub.weight.shape[2:])
                bound = 1.0 / math.sqrt(fan_in)
                for q in fresh(sub.weight, sub.bias):
                    nn.init.uniform_(q, -bound, bound, generator=generator)
            elif isinstance(sub, nn.Embedding):
                for q in fresh(sub.weight):
                    nn.init.normal_(q, 0.0, embedding_std, generator=generator)
                    if sub.padding_idx is not None:
                        q[sub.padding_idx].zero_()
            elif isinstance(sub, nn.MultiheadAttention):
                projections = [sub.in_proj_weight] if sub.in_proj_weight is not None else \
                    [sub.q_proj_weight, sub.k_proj_weight, sub.v_proj_weight]
                for q in fresh(*projections):
                    nn.init.xavier_uniform_(q, generator=generator)
                for q in fresh(sub.bias_k, sub.bias_v):
                    nn.init.xavier_normal_(q, generator=generator)
                bound = 1.0 / math.sqrt(sub.out_proj.weight.shape[1])
                for q in fresh(sub.out_proj.weight):
                    nn.init.uniform_(q, -bound, bound, generator=generator)
                for q in fresh(sub.in_proj_bias, sub.out_proj.bias):
                    q.zero_()
            elif isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                fresh(*sub.parameters(recurse=False))
                sub.reset_parameters()
            elif any(id(q) not in done for q in sub.parameters(recurse=False)) \
                    or any(True for _ in sub.buffers(recurse=False)):
                raise ConfigError(f"init_module: no initialization rule for {name or 'the root'} "
                                  f"({type(sub).__name__})")
    return module


def _shared_parameters(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """The places ``(owner, attribute)`` of each parameter held by more than one module."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, sub in module.named_modules(remove_duplicate=False):
        for attr, param in sub.named_parameters(recurse=False):
            places.setdefault(id(param), [])
            if all(owner is not sub for owner, _ in places[id(param)]):
                places[id(param)].append((sub, attr))
    return [where for where in places.values() if len(where) > 1]


@dataclass(frozen=True)
class ModelFactory:
    """Builds fresh, seeded copies of one architecture: ``factory(seed) -> nn.Module``.

    Attributes:
        build: a function returning the (uninitialized) module; it is called on the
            ``meta`` device, then materialized on the CPU and initialized by ``init``.
            Parameters it shares between modules (tied weights) stay shared.
        init: ``init(module, generator)`` draws every parameter; default :func:`init_module`.
    """

    build: Callable[[], nn.Module]
    init: Callable[[nn.Module, torch.Generator], nn.Module] = init_module

    def __call__(
        self,
        seed: int | torch.Generator = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> nn.Module:
        """A new model with weights drawn from ``seed`` (an int, or a CPU ``torch.Generator``).

        The weights are drawn in float32 on the CPU and then cast and moved, so the same
        seed gives the same model (up to rounding) for every ``dtype`` and ``device``.
        """
        if isinstance(seed, torch.Generator):
            if seed.device.type != "cpu":
                raise ConfigError(f"model_fn: the generator must live on the CPU, got {seed.device}")
            generator = seed
        else:
            generator = torch.Generator().manual_seed(int(seed))
        with torch.device("meta"):
            module = self.build()
        tied = _shared_parameters(module)
        module = module.to_empty(device="cpu").to(torch.float32)
        for places in tied:  # to_empty gives every holder of a tied parameter its own copy: re-tie
            first_owner, first_attr = places[0]
            for owner, attr in places[1:]:
                setattr(owner, attr, getattr(first_owner, first_attr))
        self.init(module, generator)
        return module.to(device=device, dtype=dtype)


def _mlp(widths: tuple[int, ...], *, hidden: Callable[[], nn.Module] | None, batch_norm: bool = False,
         hidden_bias: bool = True) -> nn.Sequential:
    """Linear layers ``widths[0] → … → widths[-1]``; between two of them an optional
    batch norm then an optional activation; nothing after the last (logits / linear output)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        last = i == len(widths) - 2
        layers.append(nn.Linear(d_in, d_out, bias=hidden_bias or last))
        if not last:
            if batch_norm:
                layers.append(nn.BatchNorm1d(d_out))
            if hidden is not None:
                layers.append(hidden())
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- problems
@dataclass(frozen=True, eq=False)
class Problem:
    """One benchmark problem.

    Attributes:
        name: the key of :data:`PROBLEMS`.
        model_fn: ``model_fn(seed=0, *, device=None, dtype=torch.float32) -> nn.Module``,
            a fresh seeded model (:class:`ModelFactory`). The model maps inputs
            ``[B, d]`` to outputs ``[B, d]`` (auto-encoders; logits or values) or
            ``[B, n_classes]`` (classifiers; logits); a next-token model maps token ids
            ``[B, T]`` to logits ``[B, V, T]``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, a stock torch loss, mean-reduced
            (for next-token prediction: the mean over the ``B·T`` positions).
        dataset: the data: a :class:`~curvlib.bench.data.Dataset` (inputs ``dataset.X_*``
            rows ``[n, d]``) or, for ``task="next_token"``, a
            :class:`~curvlib.bench.data.TokenDataset` (windows ``[n, T]`` of token ids).
        batch_size: the thesis's batch size where it gives one, at most ``n_train``.
        description: architecture, activations, loss, data, and what was chosen where
            the source is silent.
        task: ``"autoencoder"`` (targets are the inputs), ``"classification"`` (targets
            are the int64 labels) or ``"next_token"`` (targets are the int64 next tokens
            ``[B, T]`` of a :class:`~curvlib.bench.data.TokenDataset`).
        widths: the widths of the Linear layers in order for the fully-connected
            models, ``None`` for the others.
        loss_unit: what one unit of the loss is, for reports (``"nats/char"``); ``None``:
            unstated.
        default_methods: the methods ``curvlib bench`` runs on this problem when none are
            given; ``None``: the benchmark's defaults
            (:data:`curvlib.bench.runner.DEFAULT_METHODS`).
        hyperparameter_defaults: per method family (``"sgd"``, ``"adam"``, ``"adamw"``,
            ``"natural_gradient"``), settings that replace the family's defaults on this
            problem (e.g. ``{"adam": {"lr": 1e-3}}``); the user's settings still win.
    """

    name: str
    model_fn: ModelFactory
    loss_fn: nn.Module
    dataset: Dataset | TokenDataset
    batch_size: int
    description: str
    task: Task
    widths: tuple[int, ...] | None = None
    loss_unit: str | None = None
    default_methods: tuple[str, ...] | None = None
    hyperparameter_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"Problem {self.name!r}: batch_size must be ≥ 1, got {self.batch_size}")
        if (self.task == "next_token") != isinstance(self.dataset, TokenDataset):
            raise ConfigError(f"Problem {self.name!r}: task {self.task!r} with a {type(self.dataset).__name__}; "
                              "next-token prediction needs a TokenDataset and a TokenDataset needs next_token")
        if self.task == "classification" and self.dataset.y_train is None:
            raise ConfigError(f"Problem {self.name!r}: a classification problem needs labelled data")

    def targets(self, X: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The loss targets for inputs ``X [B, d]`` and labels ``y [B]`` (``X``, or ``y``),
        or for token windows ``X [B, T]`` and their next tokens ``y [B, T]`` (``y``)."""
        if self.task == "autoencoder":
            return X
        if y is None:
            raise ConfigError(f"Problem {self.name!r}: {self.task} targets need labels")
        return y

    def batches(
        self,
        generator: torch.Generator,
        *,
        split: Literal["train", "test"] = "train",
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of ``(inputs, targets)`` in an order drawn from ``generator``:
        ``([B, d], [B, d] or [B])``, or for next-token prediction ``([B, T], [B, T])``
        (``B = batch_size``; the last batch may be smaller unless ``drop_last``)."""
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        X = self.dataset.X_train if split == "train" else self.dataset.X_test
        y = self.dataset.y_train if split == "train" else self.dataset.y_test
        order = torch.randperm(X.shape[0], generator=generator)
        stop = X.shape[0] - (X.shape[0] % self.batch_size if drop_last else 0)
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield X[idx], self.targets(X[idx], None if y is None else y[idx])


def _problem(name: str, *, build: Callable[[], nn.Module], loss_fn: nn.Module, dataset: Dataset | TokenDataset,
             batch_size: int, description: str, task: Task, widths: tuple[int, ...] | None = None,
             init: Callable[[nn.Module, torch.Generator], nn.Module] = init_module, loss_unit: str | None = None,
             default_methods: tuple[str, ...] | None = None,
             hyperparameter_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> Problem:
    return Problem(
        name=name,
        model_fn=ModelFactory(build, init),
        loss_fn=loss_fn,
        dataset=dataset,
        batch_size=min(batch_size, dataset.n_train),
        description=description,
        task=task,
        widths=widths,
        loss_unit=loss_unit,
        default_methods=default_methods,
        hyperparameter_defaults=dict(hyperparameter_defaults or {}),
    )


def _check_widths(widths: tuple[int, ...], dataset: Dataset, name: str) -> None:
    if widths[0] != dataset.n_features:
        raise DataFileError(f"{name}: the model takes inputs of length {widths[0]}, the data has "
                            f"{dataset.n_features} features (image_shape {dataset.image_shape})")


def _mnist(small: bool, seed: int, path: str | Path | None, name: str) -> Dataset:
    data = load_mnist(path, seed=seed)
    if data.image_shape != (1, 28, 28):
        raise DataFileError(f"{name}: expected 28×28 images, got image_shape {data.image_shape}")
    return data.subset(n_train=min(1024, data.n_train), n_test=min(256, data.n_test)) if small else data


def mnist_autoencoder(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """Auto-encoder problem 1 of appendix 3.D on MNIST.

    784-1000-500-250-30-250-500-1000-784, ReLU after each of the seven hidden layers
    (the 30-unit code layer included, as 3.D lists ReLU×7 then Sigmoid; the classic
    Hinton–Salakhutdinov network used logistic units and a linear code instead), a
    sigmoid output with binary cross-entropy (here logits + ``BCEWithLogitsLoss``),
    batch size 512 (thesis experiments also vary it). Data: the 5,000 shipped MNIST
    images (4,000 train), or full MNIST from ``path``. ``small``: 784-100-50-25-10-25-50-100-784
    on 1,024 training images.
    """
    widths = (784, 100, 50, 25, 10, 25, 50, 100, 784) if small else MNIST_AUTOENCODER_WIDTHS
    data = _mnist(small, seed, path, "mnist_autoencoder")
    _check_widths(widths, data, "mnist_autoencoder")
    return _problem(
        "mnist_autoencoder", build=lambda: _mlp(widths, hidden=nn.ReLU), loss_fn=nn.BCEWithLogitsLoss(),
        dataset=data, batch_size=512, task="autoencoder", widths=widths,
        description=f"{'-'.join(map(str, widths))} auto-encoder, ReLU hidden, sigmoid output (logits), "
        "binary cross-entropy (thesis appendix 3.D, problem 1)",
    )


def faces_autoencoder(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """Auto-encoder problem 2 of appendix 3.D on FACES.

    625-2000-1000-500-30-500-1000-2000-625, ReLU after each hidden layer (code layer
    included), a linear output and squared error (``MSELoss``). The thesis's FACES set
    (82,800 training images, 25×25) is not shipped anywhere; the stand-in is the
    scikit-image LFW subset: 200 25×25 crops (100 faces, 100 non-faces, all used as
    auto-encoder inputs), 160 for training. Batch size 1024 in the thesis, capped at the
    160 training images (full batch). ``small``: 625-200-100-50-10-50-100-200-625.
    """
    widths = (625, 200, 100, 50, 10, 50, 100, 200, 625) if small else FACES_AUTOENCODER_WIDTHS
    data = load_faces(path, seed=seed)
    _check_widths(widths, data, "faces_autoencoder")
    return _problem(
        "faces_autoencoder", build=lambda: _mlp(widths, hidden=nn.ReLU), loss_fn=nn.MSELoss(),
        dataset=data, batch_size=1024, task="autoencoder", widths=widths,
        description=f"{'-'.join(map(str, widths))} auto-encoder, ReLU hidden, linear output, squared "
        "error (thesis appendix 3.D, problem 2); LFW subset stands in for FACES",
    )


def curves_autoencoder(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """Auto-encoder problem 3 of appendix 3.D on CURVES.

    784-400-200-100-50-25-6-25-50-100-200-400-784, ReLU after every hidden layer (3.D
    says "ReLU – Sigmoid": ReLU inside, sigmoid at the output), binary cross-entropy on
    logits, batch size 256. Data: 20,000 images from :func:`~curvlib.bench.data.make_curves`
    (16,000 train, 4,000 test, as in the thesis), or a ``.npy`` of images ``[n, 28, 28]``
    from ``path``. ``small``: 784-80-40-20-10-8-6-8-10-20-40-80-784 on 1,280 images.
    """
    widths = (784, 80, 40, 20, 10, 8, 6, 8, 10, 20, 40, 80, 784) if small else CURVES_AUTOENCODER_WIDTHS
    data = load_curves(path, n=1280 if small else 20_000, seed=seed)
    _check_widths(widths, data, "curves_autoencoder")
    return _problem(
        "curves_autoencoder", build=lambda: _mlp(widths, hidden=nn.ReLU), loss_fn=nn.BCEWithLogitsLoss(),
        dataset=data, batch_size=256, task="autoencoder", widths=widths,
        description=f"{'-'.join(map(str, widths))} auto-encoder, ReLU hidden, sigmoid output (logits), "
        "binary cross-entropy (thesis appendix 3.D, problem 3) on generated CURVES",
    )


_LINEAR_BN_NOTE = (
    "no activation; BatchNorm1d after every hidden Linear, none after the output; hidden "
    "Linear layers have no bias (a bias before a batch norm is cancelled by its mean "
    "subtraction: its gradient is identically zero), the output layer has one; logits with "
    "cross-entropy on the 10 labels (§4.3.3 names neither the loss nor these details)"
)


def deep_linear_bn(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """The second deep linear network of §4.3.3 on MNIST.

    Widths 784-1000-900-800-700-600-500-400-300-200-100-50-20-10 (13 Linear layers), no
    activation, batch normalization, batch size 512 as in the thesis. Where §4.3.3 is
    silent: BatchNorm1d follows every hidden Linear layer (not the output); hidden
    Linear layers carry no bias (a batch norm's mean subtraction cancels it); the 10
    outputs are class logits with cross-entropy. ``small``:
    784-100-90-80-70-60-50-40-30-20-10-10-10-10 on 1,024 images.
    """
    widths = (784, 100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 10, 10, 10) if small else DEEP_LINEAR_BN_WIDTHS
    data = _mnist(small, seed, path, "deep_linear_bn")
    _check_widths(widths, data, "deep_linear_bn")
    return _problem(
        "deep_linear_bn",
        build=lambda: _mlp(widths, hidden=None, batch_norm=True, hidden_bias=False),
        loss_fn=nn.CrossEntropyLoss(), dataset=data, batch_size=512, task="classification", widths=widths,
        description=f"{'-'.join(map(str, widths))} deep linear network (thesis §4.3.3): {_LINEAR_BN_NOTE}",
    )


def deep_linear_bn_narrow(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """The first deep linear network of §4.3.3: 64 layers of 10 units with batch norm.

    §4.3.3 takes it from Tselepidis et al. (random 10-dimensional inputs there) and
    trains it on Fashion-MNIST with batch size 512. Fashion-MNIST is not shipped by any
    package, so the default data is the shipped MNIST; pass ``path=`` to a folder of
    Fashion-MNIST idx files to follow the thesis exactly. Widths 784-10-10-…-10
    (64 Linear layers: the first maps the image to 10 units), otherwise built like
    :func:`deep_linear_bn`. ``small``: 16 layers on 1,024 images.
    """
    n_layers = 16 if small else 64
    widths = (784,) + (10,) * n_layers
    data = _mnist(small, seed, path, "deep_linear_bn_narrow")
    _check_widths(widths, data, "deep_linear_bn_narrow")
    return _problem(
        "deep_linear_bn_narrow",
        build=lambda: _mlp(widths, hidden=None, batch_norm=True, hidden_bias=False),
        loss_fn=nn.CrossEntropyLoss(), dataset=data, batch_size=512, task="classification", widths=widths,
        description=f"784-10x{n_layers} deep linear network (thesis §4.3.3, after Tselepidis et al.): "
        f"{_LINEAR_BN_NOTE}",
    )


def digits_autoencoder(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """A small auto-encoder on the 8×8 digits: 64-32-8-32-64 (``small``: 64-16-4-16-64).

    Built like the thesis's auto-encoders: ReLU hidden layers, sigmoid output (logits)
    with binary cross-entropy; batch size 128; 1,438 training images.
    """
    widths = (64, 16, 4, 16, 64) if small else (64, 32, 8, 32, 64)
    data = load_digits(path, seed=seed)
    _check_widths(widths, data, "digits_autoencoder")
    return _problem(
        "digits_autoencoder", build=lambda: _mlp(widths, hidden=nn.ReLU), loss_fn=nn.BCEWithLogitsLoss(),
        dataset=data, batch_size=128, task="autoencoder", widths=widths,
        description=f"{'-'.join(map(str, widths))} auto-encoder on 8x8 digits, ReLU hidden, sigmoid "
        "output (logits), binary cross-entropy",
    )


def digits_mlp(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """The fully-connected 64-15-15-15-15-10 network on 1,000 8×8 digits of the seed-002
    lecture's figure (natural gradient vs Gauss–Newton), small enough (1,855 parameters)
    for the exact Fisher.

    The lecture calls it an auto-encoder, but 10 outputs on DIGITS are class scores, so
    this is a classifier: ReLU hidden layers (the lecture does not say), cross-entropy,
    batch size 128. ``small`` changes nothing (it is small already).
    """
    widths = (64, 15, 15, 15, 15, 10)
    data = load_digits(path, seed=seed)
    data = data.subset(n_train=min(1000, data.n_train))
    _check_widths(widths, data, "digits_mlp")
    return _problem(
        "digits_mlp", build=lambda: _mlp(widths, hidden=nn.ReLU), loss_fn=nn.CrossEntropyLoss(),
        dataset=data, batch_size=128, task="classification", widths=widths,
        description="64-15-15-15-15-10 classifier on 1,000 8x8 digits, ReLU hidden, cross-entropy "
        "(seed-002 lecture figure)",
    )


def mnist_cnn(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """A small CNN classifier on 28×28 MNIST.

    ``[B, 784] → [B, 1, 28, 28]``, Conv2d(1→16, 5×5, pad 2), ReLU, MaxPool 2 →
    Conv2d(16→32, 5×5, pad 2), ReLU, MaxPool 2 → flatten ``[B, 32·7·7]`` → Linear(→10),
    cross-entropy, batch size 256. ``small``: 4 and 8 channels, 1,024 images.
    """
    c1, c2 = (4, 8) if small else (16, 32)
    data = _mnist(small, seed, path, "mnist_cnn")

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # [B, c1, 14, 14]
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # [B, c2, 7, 7]
            nn.Flatten(), nn.Linear(c2 * 7 * 7, 10),
        )

    return _problem(
        "mnist_cnn", build=build, loss_fn=nn.CrossEntropyLoss(), dataset=data, batch_size=256,
        task="classification",
        description=f"CNN conv5x5({c1})-pool-conv5x5({c2})-pool-linear(10) on MNIST, ReLU, cross-entropy",
    )


def mnist_conv_autoencoder(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """A convolutional auto-encoder on 28×28 MNIST (exercises ConvTranspose2d, chapter 5).

    Encoder: Conv2d(1→16, 3×3, stride 2, pad 1) → ``[B, 16, 14, 14]``, ReLU,
    Conv2d(16→32, 3×3, stride 2, pad 1) → ``[B, 32, 7, 7]``, ReLU. Decoder:
    ConvTranspose2d(32→16, 3×3, stride 2, pad 1, output_padding 1) → ``[B, 16, 14, 14]``,
    ReLU, ConvTranspose2d(16→1, same) → ``[B, 1, 28, 28]`` logits, flattened to
    ``[B, 784]``; binary cross-entropy on logits, batch size 256. ``small``: 4 and 8
    channels, 1,024 images.
    """
    c1, c2 = (4, 8) if small else (16, 32)
    data = _mnist(small, seed, path, "mnist_conv_autoencoder")

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1),
            nn.Flatten(),
        )

    return _problem(
        "mnist_conv_autoencoder", build=build, loss_fn=nn.BCEWithLogitsLoss(), dataset=data,
        batch_size=256, task="autoencoder",
        description=f"conv auto-encoder conv3x3/2({c1})-conv3x3/2({c2})-convT3x3/2({c1})-convT3x3/2(1) "
        "on MNIST, ReLU, binary cross-entropy on logits",
    )


#: The comparison the modern-architecture problems run by default: the first-order
#: baselines (Adam is the reference of the time-to-target), KFAC with both treatments of
#: weight sharing (expand: positions are extra samples; reduce: summed first), KPSVD,
#: corrected KFAC and one two-level method.
MODERN_METHODS: tuple[str, ...] = (
    "sgd", "adam", "adamw", "kfac", "kfac_reduce", "kpsvd", "kfac_corrected", "kfac+residual",
)


def default_methods_of(name: str) -> tuple[str, ...] | None:
    """The methods ``curvlib bench`` runs on problem ``name`` when none are given (``None``:
    the runner's :data:`~curvlib.bench.runner.DEFAULT_METHODS`)."""
    return MODERN_METHODS if name in ("char_lm", "mnist_resnet") else None


def char_lm(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """A decoder-only character-level transformer language model on Python source code.

    Model (:class:`~curvlib.bench.models.CharTransformer`): token and learned position
    embeddings (d = 128), 4 pre-norm transformer blocks (4 heads of causal self-attention,
    then a 128-512-128 GELU MLP, LayerNorm before each, no dropout), a final LayerNorm and an
    output head tied to the token embedding; logits ``[B, V, T]`` with cross-entropy, the
    mean over the ``B·T`` predicted characters (nats/char). Embeddings are drawn from
    N(0, 1/d) (tied to the head, PyTorch's N(0, 1) would start with logits of scale √d),
    the rest with PyTorch's defaults.

    Data (:func:`~curvlib.bench.data.load_char_corpus`): the first 1,000,000 characters of
    the running interpreter's standard-library sources (``argparse``, ``typing``,
    ``inspect``, … in a fixed order; nothing downloaded), 98 character ids (tab, newline,
    printable ASCII, one unknown id), the last 10 % of the text held out as the test set,
    windows of T + 1 = 65 characters (inputs: the first 64, targets: the next character of
    each), batch size 64 windows. ``path``: a text file or a folder of text files instead.
    ``seed`` does not change the data (the split is by position).

    ``small``: d = 32, 2 heads, 2 blocks, MLP 32-128-32, T = 32, the first 200,000 characters.

    Learning rates (:attr:`Problem.hyperparameter_defaults`; the best of a short grid, 200
    steps ``small``, 300 full): SGD 0.1 (``small``) / 0.03 (SGD at 0.3 diverges on the full
    model), Adam and AdamW 1e-2 / 1e-3.
    """
    if small:
        seq_len, d, heads, layers, d_ff, max_chars = 32, 32, 2, 2, 128, 200_000
        sgd_lr, adam_lr = 0.1, 1e-2
    else:
        seq_len, d, heads, layers, d_ff, max_chars = 64, 128, 4, 4, 512, 1_000_000
        sgd_lr, adam_lr = 0.03, 1e-3
    data = load_char_corpus(path, seq_len=seq_len, max_chars=max_chars)
    vocab = data.vocab_size

    def build() -> nn.Module:
        return CharTransformer(vocab, seq_len, d, heads, layers, d_ff)

    return _problem(
        "char_lm", build=build, loss_fn=nn.CrossEntropyLoss(), dataset=data, batch_size=64, task="next_token",
        init=functools.partial(init_module, embedding_std=d ** -0.5), loss_unit="nats/char",
        default_methods=default_methods_of("char_lm"),
        hyperparameter_defaults={"sgd": {"lr": sgd_lr}, "adam": {"lr": adam_lr}, "adamw": {"lr": adam_lr}},
        description=f"character transformer LM: d={d}, {layers} pre-norm blocks ({heads}-head causal attention, "
        f"{d}-{d_ff}-{d} GELU MLP), tied {vocab}x{d} embedding/head, T={seq_len}, cross-entropy per character",
    )


def mnist_resnet(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """A small ResNet with batch normalization on 28×28 MNIST.

    ``[B, 784] → [B, 1, 28, 28]`` → stem Conv2d(1→16, 3×3, pad 1) + BatchNorm2d + ReLU →
    three :class:`~curvlib.bench.models.ResidualBlock` (conv3×3-BN-ReLU-conv3×3-BN plus
    the shortcut, then ReLU): 16→16 at 28×28 (identity shortcut), 16→32 with stride 2
    (→ 14×14) and 32→64 with stride 2 (→ 7×7), both with a 1×1-conv + BN shortcut →
    global average pool ``[B, 64]`` → Linear(64→10) → cross-entropy; batch size 128.
    The convolutions have no bias (each is followed by a batch norm); the batch norms
    train on batch statistics (``model.train()``) and evaluate with their running ones.
    ``small``: 8, 16 and 32 channels, 1,024 images. Adam and AdamW learning rate 1e-2 (the best
    of {1e-3, 3e-3, 1e-2} after 200 steps at both sizes; SGD's default 0.3 was best of
    {0.03, 0.1, 0.3}).
    """
    c = 8 if small else 16
    data = _mnist(small, seed, path, "mnist_resnet")

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),  # [B, c, 28, 28]
            ResidualBlock(c, c),                                                      # [B, c, 28, 28]
            ResidualBlock(c, 2 * c, stride=2),                                        # [B, 2c, 14, 14]
            ResidualBlock(2 * c, 4 * c, stride=2),                                    # [B, 4c, 7, 7]
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10),
        )

    return _problem(
        "mnist_resnet", build=build, loss_fn=nn.CrossEntropyLoss(), dataset=data, batch_size=128,
        task="classification", default_methods=default_methods_of("mnist_resnet"),
        hyperparameter_defaults={"adam": {"lr": 1e-2}, "adamw": {"lr": 1e-2}},
        description=f"ResNet on MNIST: conv3x3({c})-BN-ReLU, residual blocks {c}->{c}, {c}->{2 * c}/2, "
        f"{2 * c}->{4 * c}/2 (conv-BN-ReLU-conv-BN + shortcut), global average pool, linear(10), cross-entropy",
    )


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
    "mnist_resnet": mnist_resnet,
    "char_lm": char_lm,
}
"""Builder of each problem by name: ``PROBLEMS[name](small=..., seed=..., path=...)``."""
