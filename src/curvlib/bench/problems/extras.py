"""Small extra problems that cover what the thesis's do not: a tiny network where exact
natural gradient is affordable, convolutions and transposed convolutions.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from curvlib.bench.data import load_digits
from curvlib.bench.problems.parts import check_widths, make_problem, mlp, mnist_data
from curvlib.bench.problems.problem import Problem

__all__ = ["digits_autoencoder", "digits_mlp", "mnist_cnn", "mnist_conv_autoencoder", "mnist_conv_bn_autoencoder"]


def digits_autoencoder(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """A small auto-encoder on the 8×8 digits: 64-32-8-32-64 (``small``: 64-16-4-16-64).

    Built like the thesis's auto-encoders: ReLU hidden layers, sigmoid output (logits)
    with binary cross-entropy; batch size 128; 1,438 training images.
    """
    widths = (64, 16, 4, 16, 64) if small else (64, 32, 8, 32, 64)
    data = load_digits(path, seed=seed)
    check_widths(widths, data, "digits_autoencoder")
    return make_problem(
        "digits_autoencoder", build=lambda: mlp(widths, hidden=nn.ReLU), loss_fn=nn.BCEWithLogitsLoss(),
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
    check_widths(widths, data, "digits_mlp")
    return make_problem(
        "digits_mlp", build=lambda: mlp(widths, hidden=nn.ReLU), loss_fn=nn.CrossEntropyLoss(),
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
    data = mnist_data(small, seed, path, "mnist_cnn")

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, c1, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),   # [B, c1, 14, 14]
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),  # [B, c2, 7, 7]
            nn.Flatten(), nn.Linear(c2 * 7 * 7, 10),
        )

    return make_problem(
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
    return _conv_autoencoder("mnist_conv_autoencoder", batch_norm=False, small=small, seed=seed, path=path)


def mnist_conv_bn_autoencoder(*, small: bool = False, seed: int = 0, path: str | Path | None = None) -> Problem:
    """The convolutional auto-encoder of §5.3.1: :func:`mnist_conv_autoencoder` with a
    BatchNorm2d after each of its first three layers (before the ReLU) — "four layers deep
    and contain batch normalizations"; batch size 256. ``small``: 4 and 8 channels, 1,024 images.
    """
    return _conv_autoencoder("mnist_conv_bn_autoencoder", batch_norm=True, small=small, seed=seed, path=path)


def _conv_autoencoder(name: str, *, batch_norm: bool, small: bool, seed: int, path: str | Path | None) -> Problem:
    c1, c2 = (4, 8) if small else (16, 32)
    data = mnist_data(small, seed, path, name)

    def norm(c: int) -> list[nn.Module]:
        return [nn.BatchNorm2d(c)] if batch_norm else []

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, c1, 3, stride=2, padding=1), *norm(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), *norm(c2), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1), *norm(c1), nn.ReLU(),
            nn.ConvTranspose2d(c1, 1, 3, stride=2, padding=1, output_padding=1),
            nn.Flatten(),
        )

    bn = "-bn" if batch_norm else ""
    return make_problem(
        name, build=build, loss_fn=nn.BCEWithLogitsLoss(), dataset=data, batch_size=256, task="autoencoder",
        description=f"conv auto-encoder conv3x3/2({c1}){bn}-conv3x3/2({c2}){bn}-convT3x3/2({c1}){bn}-convT3x3/2(1) "
        "on MNIST, ReLU, binary cross-entropy on logits",
    )
