"""The thesis's reference problems: the three deep auto-encoders of appendix 3.D (MNIST,
FACES, CURVES) and the two deep linear networks with batch normalization of §4.3.3.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from curvlib.bench.data import load_curves, load_faces
from curvlib.bench.problems.parts import check_widths, make_problem, mlp, mnist_data
from curvlib.bench.problems.problem import Problem

__all__ = [
    "CURVES_AUTOENCODER_WIDTHS",
    "DEEP_LINEAR_BN_WIDTHS",
    "FACES_AUTOENCODER_WIDTHS",
    "MNIST_AUTOENCODER_WIDTHS",
    "curves_autoencoder",
    "deep_linear_bn",
    "deep_linear_bn_narrow",
    "faces_autoencoder",
    "mnist_autoencoder",
]

# The thesis's architectures, appendix 3.D and §4.3.3 (widths of the Linear layers).
MNIST_AUTOENCODER_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
FACES_AUTOENCODER_WIDTHS = (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)
CURVES_AUTOENCODER_WIDTHS = (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)
DEEP_LINEAR_BN_WIDTHS = (784, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10)


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
    data = mnist_data(small, seed, path, "mnist_autoencoder")
    check_widths(widths, data, "mnist_autoencoder")
    return make_problem(
        "mnist_autoencoder", build=lambda: mlp(widths, hidden=nn.ReLU), loss_fn=nn.BCEWithLogitsLoss(),
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
    check_widths(widths, data, "faces_autoencoder")
    return make_problem(
        "faces_autoencoder", build=lambda: mlp(widths, hidden=nn.ReLU), loss_fn=nn.MSELoss(),
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
    check_widths(widths, data, "curves_autoencoder")
    return make_problem(
        "curves_autoencoder", build=lambda: mlp(widths, hidden=nn.ReLU), loss_fn=nn.BCEWithLogitsLoss(),
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
    data = mnist_data(small, seed, path, "deep_linear_bn")
    check_widths(widths, data, "deep_linear_bn")
    return make_problem(
        "deep_linear_bn",
        build=lambda: mlp(widths, hidden=None, batch_norm=True, hidden_bias=False),
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
    data = mnist_data(small, seed, path, "deep_linear_bn_narrow")
    check_widths(widths, data, "deep_linear_bn_narrow")
    return make_problem(
        "deep_linear_bn_narrow",
        build=lambda: mlp(widths, hidden=None, batch_norm=True, hidden_bias=False),
        loss_fn=nn.CrossEntropyLoss(), dataset=data, batch_size=512, task="classification", widths=widths,
        description=f"784-10x{n_layers} deep linear network (thesis §4.3.3, after Tselepidis et al.): "
        f"{_LINEAR_BN_NOTE}",
    )
