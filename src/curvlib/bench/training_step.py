"""The optimizer a resolved method builds, and one training step with it.

* :func:`build_training_step` — the optimizer of a :class:`~curvlib.bench.methods.Method`
  on a model with its :class:`~curvlib.bench.methods.Hyperparameters`: ``torch.optim.SGD``,
  ``Adam`` or ``AdamW`` for the first-order baselines, :class:`curvlib.optim.NaturalGradient`
  with the method's :class:`curvlib.precond.PreconditionerConfig`, or a kind of the
  ``optimizers`` plugin family built by its factory;
* :class:`TrainingStep` — that optimizer with its model and loss: zero the gradients,
  forward, backward, step;
* :func:`natural_gradient_available` — whether the natural-gradient methods can run
  (``curvlib.optim`` and ``curvlib.precond`` import); :class:`OptimizerUnavailableError`
  when one is asked for and they cannot.

The method names and their settings are in :mod:`curvlib.bench.methods`; the training
loop that calls :meth:`TrainingStep.step` is :func:`curvlib.bench.training.train`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvlib.bench.methods import FIRST_ORDER, Hyperparameters, Method
from curvlib.errors import ConfigError

__all__ = [
    "OptimizerUnavailableError",
    "TrainingStep",
    "build_training_step",
    "natural_gradient_available",
]


class OptimizerUnavailableError(ConfigError):
    """A natural-gradient method was asked for but ``curvlib.optim`` cannot be imported."""


def natural_gradient_available() -> tuple[bool, str]:
    """Whether ``curvlib.optim.NaturalGradient`` and ``curvlib.precond.PreconditionerConfig``
    import; the second item says why not."""
    try:
        importlib.import_module("curvlib.optim")
        importlib.import_module("curvlib.precond")
    except ImportError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


@dataclass
class TrainingStep:
    """One optimizer step on one batch: ``step(X, y) -> loss of the batch before the step``.

    Attributes:
        model: the model being trained.
        loss_fn: ``loss_fn(model(X), y) -> scalar``.
        optimizer: a ``torch.optim.Optimizer``.
        needs_batch: the optimizer's ``step`` takes ``batch=(X, y)`` (natural gradient:
            it captures curvature statistics from that batch).
        preconditioner_config: the ``PreconditionerConfig`` as a dict (``None`` for SGD/Adam).
    """

    model: nn.Module
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    needs_batch: bool = False
    preconditioner_config: dict[str, Any] | None = field(default=None)

    def step(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Zero the gradients, forward, backward, step; return the detached batch loss.  An
        optimizer with ``capture`` (:class:`~curvlib.optim.NaturalGradient`) takes its curvature
        from this forward pass (docs/optimizer.md, the training-loop pattern)."""
        self.optimizer.zero_grad(set_to_none=True)
        capture = getattr(self.optimizer, "capture", None) if self.needs_batch else None
        with capture((X, y)) if capture is not None else contextlib.nullcontext():
            loss = self.loss_fn(self.model(X), y)
        loss.backward()
        if self.needs_batch:
            self.optimizer.step(batch=(X, y))
        else:
            self.optimizer.step()
        return loss.detach()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return _jsonable(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def build_training_step(
    method: Method,
    model: nn.Module,
    loss_fn: nn.Module,
    hp: Hyperparameters,
    *,
    generator: torch.Generator,
    registry: Any,
    process_group: Any = "auto",
) -> TrainingStep:
    """The optimizer of ``method`` on ``model`` with ``hp``, wrapped in a :class:`TrainingStep`.

    ``generator`` drives every random draw of the optimizer (the Monte Carlo targets of
    the Fisher); ``registry`` resolves the approximator, damping, coarse space and
    optimizer kinds; ``process_group`` is the natural-gradient optimizer's (``None``: one process
    even inside an initialised group, see :mod:`curvlib.distributed`). A plugin optimizer (family ``"optimizer"``) is built as
    ``factory(options).build(model, loss_fn, lr=hp.lr, generator=generator, registry=registry)``
    with ``options`` = ``hp.optimizer_options`` validated against the kind's model.

    Raises:
        OptimizerUnavailableError: a natural-gradient method without ``curvlib.optim``.
        ConfigError: the preconditioner configuration is invalid.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if method.family == "sgd":
        opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        return TrainingStep(model, loss_fn, opt)
    if method.family == "adam":
        opt = torch.optim.Adam(params, lr=hp.lr, betas=(0.9, 0.999), weight_decay=hp.weight_decay)
        return TrainingStep(model, loss_fn, opt)
    if method.family == "adamw":
        # the usual practice (GPT-2, timm): decay the weight matrices, kernels and embeddings,
        # not the biases and normalization scales/shifts (vectors)
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.lr, betas=(0.9, 0.999))
        return TrainingStep(model, loss_fn, opt)
    if method.family == "optimizer":
        return _build_plugin_optimizer(method, model, loss_fn, hp, generator=generator, registry=registry)
    ok, why = natural_gradient_available()
    if not ok:
        raise OptimizerUnavailableError(
            f"method {method.name!r} needs curvlib.optim.NaturalGradient, which cannot be imported ({why}); "
            f"run the first-order methods only: {', '.join(FIRST_ORDER)}"
        )
    # imported here, after natural_gradient_available() checked they import: the first-order
    # methods keep working (and this raises OptimizerUnavailableError) when they do not
    from curvlib.optim import NaturalGradient
    from curvlib.precond import PreconditionerConfig

    raw = method.preconditioner_config(hp)
    try:
        config = PreconditionerConfig(**raw)
    except Exception as exc:  # pydantic ValidationError, or ConfigError from a validator
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"method {method.name!r}: invalid preconditioner configuration {raw}: {exc}") from exc
    opt = NaturalGradient(
        model, loss_fn, config,
        lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, kl_clip=hp.kl_clip or None,
        fallback=hp.fallback, generator=generator, registry=registry, process_group=process_group,
    )
    return TrainingStep(model, loss_fn, opt, needs_batch=True, preconditioner_config=_jsonable(config))


def _build_plugin_optimizer(
    method: Method,
    model: nn.Module,
    loss_fn: nn.Module,
    hp: Hyperparameters,
    *,
    generator: torch.Generator,
    registry: Any,
) -> TrainingStep:
    """The optimizer of a kind of the ``optimizers`` family (:func:`build_training_step`)."""
    assert method.optimizer is not None
    spec, options = registry.optimizers.resolve({"kind": method.optimizer, **hp.optimizer_options})
    builder = spec.factory(options)
    build = getattr(builder, "build", None)
    if not callable(build):
        raise ConfigError(
            f"optimizer kind {method.optimizer!r} ({spec.distribution}): its factory returned "
            f"{type(builder).__name__}, which has no build(model, loss_fn, *, lr, generator, registry)"
        )
    opt = build(model, loss_fn, lr=hp.lr, generator=generator, registry=registry)
    if not isinstance(opt, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer kind {method.optimizer!r} ({spec.distribution}): build() returned "
            f"{type(opt).__name__}, expected a torch.optim.Optimizer"
        )
    return TrainingStep(model, loss_fn, opt, needs_batch=method.needs_batch)
