"""Two models people train: a character-level transformer language model (``char_lm``) and
a ResNet with batch normalization (``mnist_resnet``), with the methods they run by default.
"""

from __future__ import annotations

import functools
from pathlib import Path

from torch import nn

from curvlib.bench.data import load_char_corpus
from curvlib.bench.models import CharTransformer, ResidualBlock
from curvlib.bench.problems.model_factory import init_module
from curvlib.bench.problems.parts import make_problem, mnist_data
from curvlib.bench.problems.problem import Problem

__all__ = ["MODERN_METHODS", "char_lm", "default_methods_of", "mnist_resnet"]


#: The comparison the modern-architecture problems run by default: the first-order
#: baselines (Adam is the reference of the time-to-target), KFAC with both treatments of
#: weight sharing (expand: positions are extra samples; reduce: summed first), KPSVD,
#: corrected KFAC and one two-level method.
MODERN_METHODS: tuple[str, ...] = (
    "sgd", "adam", "adamw", "kfac", "kfac_reduce", "kpsvd", "kfac_corrected", "kfac+residual",
)


def default_methods_of(name: str) -> tuple[str, ...] | None:
    """The methods ``curvlib bench`` runs on problem ``name`` when none are given (``None``:
    the runner's :data:`~curvlib.bench.settings.DEFAULT_METHODS`)."""
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

    return make_problem(
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
    data = mnist_data(small, seed, path, "mnist_resnet")

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),  # [B, c, 28, 28]
            ResidualBlock(c, c),                                                      # [B, c, 28, 28]
            ResidualBlock(c, 2 * c, stride=2),                                        # [B, 2c, 14, 14]
            ResidualBlock(2 * c, 4 * c, stride=2),                                    # [B, 4c, 7, 7]
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10),
        )

    return make_problem(
        "mnist_resnet", build=build, loss_fn=nn.CrossEntropyLoss(), dataset=data, batch_size=128,
        task="classification", default_methods=default_methods_of("mnist_resnet"),
        hyperparameter_defaults={"adam": {"lr": 1e-2}, "adamw": {"lr": 1e-2}},
        description=f"ResNet on MNIST: conv3x3({c})-BN-ReLU, residual blocks {c}->{c}, {c}->{2 * c}/2, "
        f"{2 * c}->{4 * c}/2 (conv-BN-ReLU-conv-BN + shortcut), global average pool, linear(10), cross-entropy",
    )
