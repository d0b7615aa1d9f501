"""``curvlib.curvature``: build a curvature operator of a real network from one batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

__all__ = ["curvature"]


def curvature(
    kind: str | Mapping[str, Any] | BaseModel,
    model: nn.Module,
    loss_fn: nn.Module,
    batch: Any,
    *,
    generator: torch.Generator | None = None,
    registry: Any = None,
    **options: Any,
) -> Any:
    """The curvature matrix of ``model`` on one batch, as an exact matrix-free operator.

    Example::

        g = torch.Generator().manual_seed(0)
        F = curvlib.curvature("fisher", model, nn.CrossEntropyLoss(), batch=(X, y), mc_samples=1, generator=g)
        F @ v                 # v: [p], [p, k], or a list shaped like F.params() -> same form
        F.block(i, j)         # layer block operator: matvec, shape, to_dense
        F.to_dense()          # [p, p] (PerformanceWarning)
        F.to_scipy()          # scipy LinearOperator, float64 numpy in/out
        F.layers              # LayerBlock: name, module, kind, a_dim, g_dim, p_i, slice, param_shapes
        F.statistics(i)       # LayerStatistics of layer i (uses, geometry, scale)
        F.params()            # the parameters, each once (the order of list-shaped vectors)
        F.excluded            # qualified names of parameters left out (no adapter, …)

    Args:
        kind: a registered curvature kind — ``"fisher"`` (true Fisher, Monte Carlo (2.84)),
            ``"empirical_fisher"`` (2.85), ``"ggn"`` (2.89), ``"hessian"`` — or a mapping
            ``{"kind": ..., **options}`` / an options model with a ``kind`` field.
        model: any ``nn.Module``; the modules with a layer adapter (Linear, Conv1d/2d/3d and
            their transposes with any groups, Embedding, LayerNorm/RMSNorm/GroupNorm/BatchNorm,
            MultiheadAttention, and those of layer plugins) are the layer blocks — called
            several times or with tied weights as well; other trainable parameters are
            excluded with an :class:`~curvlib.capture.adapters.ExcludedParametersWarning`.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` or
            ``nn.BCELoss`` (on sigmoid outputs), reduction "mean" or "sum".  The per-sample
            convention is documented in :mod:`curvlib.curvatures.losses`; every operator is
            the per-sample mean (1/m) Σ_b C_b.
        batch: ``(X, y)``; ``model(X)`` (or ``model(*X)`` for a tuple) gives the output.
        generator: the ``torch.Generator`` for the Monte Carlo targets of ``fisher`` (default:
            one seeded from torch's global RNG).
        registry: a :class:`curvlib.plugins.Registry` (default: :func:`curvlib.plugins.load_registry`).
        **options: the kind's options, validated against its pydantic model
            (``fisher``: ``mc_samples``); unknown options raise :class:`~curvlib.errors.ConfigError`.

    Returns:
        a :class:`~curvlib.curvatures.operator.CurvatureOperator` (``fisher``,
        ``empirical_fisher``, ``ggn``) or :class:`~curvlib.curvatures.operator.HessianOperator`.

    Raises:
        UnknownKindError: ``kind`` is not registered (the message lists the known kinds).
        ConfigError: invalid options.
        UnsupportedLossError: unsupported loss, reduction, output or target shape.
        UnsupportedLayerError: parameters are shared in a way no layer block can hold
            (two layers tying a weight with separate biases; a parameter also registered by
            a module without an adapter).
        ShapeError: an adapted layer's input lacks the batch axis.
    """
    if registry is None:
        from curvlib.plugins import load_registry

        registry = load_registry()
    spec, opts = registry.curvatures.resolve(kind, **options)
    return spec.factory(opts).build(model, loss_fn, batch, generator=generator, registry=registry)
