"""A benchmark problem: a seeded model factory, a loss, a data set and a batch size."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from curvlib.bench.data import Dataset, TokenDataset
from curvlib.bench.problems.model_factory import ModelFactory
from curvlib.errors import ConfigError

__all__ = ["Problem", "Task"]

Task = Literal["autoencoder", "classification", "next_token"]


@dataclass(frozen=True, eq=False)
class Problem:
    """One benchmark problem.

    Attributes:
        name: the key of :data:`~curvlib.bench.problems.PROBLEMS`.
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
            (:data:`curvlib.bench.settings.DEFAULT_METHODS`).
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
