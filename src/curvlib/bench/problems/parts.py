"""What the problem builders share: assembling a :class:`~curvlib.bench.problems.problem.Problem`,
fully-connected stacks, the MNIST data (shrunk for ``small``) and the check that a model
fits its data.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlib.bench.data import DataFileError, Dataset, TokenDataset, load_mnist
from curvlib.bench.problems.model_factory import ModelFactory, init_module
from curvlib.bench.problems.problem import Problem, Task

__all__ = ["check_widths", "make_problem", "mlp", "mnist_data"]


def mlp(widths: tuple[int, ...], *, hidden: Callable[[], nn.Module] | None, batch_norm: bool = False,
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


def make_problem(name: str, *, build: Callable[[], nn.Module], loss_fn: nn.Module, dataset: Dataset | TokenDataset,
                 batch_size: int, description: str, task: Task, widths: tuple[int, ...] | None = None,
                 init: Callable[[nn.Module, torch.Generator], nn.Module] = init_module, loss_unit: str | None = None,
                 default_methods: tuple[str, ...] | None = None,
                 hyperparameter_defaults: Mapping[str, Mapping[str, Any]] | None = None) -> Problem:
    """The :class:`Problem` of a builder: the model ``build`` wrapped in a
    :class:`ModelFactory` with ``init``, the batch size capped at the training inputs."""
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


def check_widths(widths: tuple[int, ...], dataset: Dataset, name: str) -> None:
    """Raise :class:`~curvlib.bench.data.DataFileError` unless the first Linear layer
    (``widths[0]``) takes the data's ``d`` features."""
    if widths[0] != dataset.n_features:
        raise DataFileError(f"{name}: the model takes inputs of length {widths[0]}, the data has "
                            f"{dataset.n_features} features (image_shape {dataset.image_shape})")


def mnist_data(small: bool, seed: int, path: str | Path | None, name: str) -> Dataset:
    """28×28 MNIST for problem ``name`` (:func:`~curvlib.bench.data.load_mnist` of ``path``,
    split with ``seed``); ``small``: its first 1,024 training and 256 test images."""
    data = load_mnist(path, seed=seed)
    if data.image_shape != (1, 28, 28):
        raise DataFileError(f"{name}: expected 28×28 images, got image_shape {data.image_shape}")
    return data.subset(n_train=min(1024, data.n_train), n_test=min(256, data.n_test)) if small else data
