"""How a batch reaches the model: ``(inputs, targets)`` with positional or keyword inputs.

A batch given to :func:`curvlib.curvature` (``batch=`` or each element of ``data=``) is a
pair ``(X, y)``; the model's output is

==========================  =====================  =========================================
``X``                       the model is called    the batch size m is
==========================  =====================  =========================================
a tensor                    ``model(X)``           ``X.shape[0]``
a tuple / list of inputs    ``model(*X)``          axis 0 of the first tensor input (ndim ≥ 1)
a mapping ``{name: …}``     ``model(**X)``         ``y.shape[0]`` (the targets' first axis)
==========================  =====================  =========================================

Any other batch — a dict of a HuggingFace tokenizer or a ``Dataset`` returning dicts — goes
through a user ``batch_fn``: ``batch -> (inputs, targets)`` (:func:`as_pair`), for example
``batch_fn=lambda b: ({"x": b["x"], "mask": b["mask"]}, b["y"])``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from curvlib.errors import ConfigError, ShapeError

__all__ = ["BatchFn", "ModelBatch", "as_pair", "split_batch"]

BatchFn = Callable[[Any], Any]


@dataclass(frozen=True)
class ModelBatch:
    """One batch split into the model's inputs and the loss targets.

    Attributes:
        args: the positional inputs (``model(*args, **kwargs)``).
        kwargs: the keyword inputs (from a mapping ``X``; empty otherwise).
        target: the targets y (``[m, …]``).
    """

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    target: Any

    @property
    def num_samples(self) -> int | None:
        """m (module docstring): y's first axis for keyword inputs, else axis 0 of the first
        positional tensor with at least one axis; ``None`` when there is none."""
        if self.kwargs:
            t = self.target
            return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.ndim > 0 else None
        first = next((t for t in self.args if isinstance(t, torch.Tensor) and t.ndim > 0), None)
        return None if first is None else int(first.shape[0])

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor of the batch: inputs (positional, then keyword) and the targets."""
        for t in (*self.args, *self.kwargs.values(), self.target):
            if isinstance(t, torch.Tensor):
                yield t

    def call(self, model: nn.Module) -> Any:
        """The model's output on this batch: ``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)


def as_pair(batch: Any, batch_fn: BatchFn | None = None) -> tuple[Any, Any]:
    """``batch`` (through ``batch_fn`` when given) as the pair ``(inputs, targets)``.

    Raises:
        ConfigError: ``batch_fn`` is not callable.
        ShapeError: the batch (or what ``batch_fn`` returned) is not a pair.
    """
    if batch_fn is not None:
        if not callable(batch_fn):
            raise ConfigError(f"batch_fn: expected a callable batch -> (inputs, targets), got {type(batch_fn).__name__}")
        out = batch_fn(batch)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ShapeError(f"batch_fn: expected it to return (inputs, targets), got {_describe(out)}")
        return out[0], out[1]
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ShapeError(
            f"expected a batch (X, y) with X a tensor, a tuple of tensors or a dict of keyword inputs, got "
            f"{_describe(batch)}; for other batches (a dict holding inputs and targets, say) pass "
            "batch_fn=lambda b: (inputs, targets)"
        )
    return batch[0], batch[1]


def split_batch(batch: Any, batch_fn: BatchFn | None = None) -> ModelBatch:
    """``batch`` -> :class:`ModelBatch` (module docstring).

    Raises:
        ShapeError: not a pair, a mapping of inputs whose keys are not strings, or a batch
            with no samples (m = 0).
    """
    X, y = as_pair(batch, batch_fn)
    if isinstance(X, Mapping):
        bad = [k for k in X if not isinstance(k, str)]
        if bad:
            raise ShapeError(f"expected keyword inputs with string keys (model(**inputs)), got keys {bad[:5]!r}")
        out = ModelBatch((), dict(X), y)
    elif isinstance(X, (tuple, list)):
        out = ModelBatch(tuple(X), {}, y)
    else:
        out = ModelBatch((X,), {}, y)
    if out.num_samples == 0:
        shapes = [list(t.shape) for t in out.tensors()]
        raise ShapeError(f"the batch has no samples (m = 0; tensor shapes {shapes}): a curvature needs at least one sample")
    return out


def _describe(x: Any) -> str:
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} elements"
    return f"a {type(x).__name__}"
