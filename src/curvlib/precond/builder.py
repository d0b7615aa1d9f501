"""``build_preconditioner``: configuration + plugin registry -> :class:`Preconditioner`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from curvlib.errors import ConfigError
from curvlib.precond.config import PreconditionerConfig, resolve_config
from curvlib.precond.preconditioner import Preconditioner
from curvlib.plugins import load_registry

__all__ = ["build_preconditioner"]


def build_preconditioner(
    model: nn.Module,
    loss_fn: nn.Module,
    config: PreconditionerConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None,
    *,
    generator: torch.Generator | None = None,
    registry: Any = None,
) -> Preconditioner:
    """Build the preconditioner a configuration describes.

    Example::

        cfg = curvlib.PreconditionerConfig(curvature={"kind": "fisher", "mc_samples": 1},
                approximator={"kind": "kfac_corrected"}, damping={"kind": "heuristic", "value": 1e-3},
                coarse_space={"kind": "residual"}, update_every=10, invert_every=100, ema=0.95)
        pre = curvlib.build_preconditioner(model, loss_fn, cfg)   # or a dict, or "precond.yaml"
        info = pre.update((X, y))          # refresh / invert when due (step 0: both)
        direction = pre.apply(grads)       # list shaped like pre.params(), or the flat [p] vector

    Every ``kind`` is looked up in ``registry`` (third-party kinds work the same way as
    curvlib's) and its options are validated against the kind's pydantic model.

    Args:
        model: the network.
        loss_fn: its loss module (``nn.CrossEntropyLoss``, ``nn.MSELoss``,
            ``nn.BCEWithLogitsLoss``, ``nn.BCELoss``).
        config: a :class:`PreconditionerConfig`, a mapping of its fields, the path of a
            YAML/JSON file holding one, or ``None`` for the defaults.
        generator: the ``torch.Generator`` of the Monte Carlo targets (default: one on the
            model's device, seeded from torch's global RNG).
        registry: a :class:`curvlib.plugins.Registry` (default: :func:`curvlib.plugins.load_registry`).

    Raises:
        ConfigError: an invalid configuration; each line names the field path
            (``approximator.rank: ...``).
        UnknownKindError: an unknown kind (``damping.kind: unknown damping kind 'x'; known kinds: ...``).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"build_preconditioner: expected model to be an nn.Module, got {type(model).__name__}")
    cfg = PreconditionerConfig.coerce(config)
    if registry is None:
        registry = load_registry()
    resolved = resolve_config(cfg, registry)
    return Preconditioner(model, loss_fn, resolved, generator=generator, registry=registry)
