"""``curvlib.curvature``: build a curvature operator of a real network from one batch or
over a data set (:mod:`curvlib.curvatures.data`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from curvlib.capture.layout import unwrap_model
from curvlib.curvatures.batches import as_pair
from curvlib.curvatures.data import DataCurvatureOperator
from curvlib.curvatures.kinds import BuiltinCurvature
from curvlib.errors import ConfigError
from curvlib.plugins import load_registry

__all__ = ["curvature"]


def curvature(
    kind: str | Mapping[str, Any] | BaseModel,
    model: nn.Module,
    loss_fn: nn.Module,
    batch: Any = None,
    *,
    data: Iterable[Any] | None = None,
    num_data: int | None = None,
    progress: bool = False,
    batch_fn: Callable[[Any], Any] | None = None,
    generator: torch.Generator | None = None,
    registry: Any = None,
    check_samples: bool = True,
    loss_gradient: bool = True,
    **options: Any,
) -> Any:
    """The curvature matrix of ``model`` on one batch or over a data set, as an exact
    matrix-free operator.

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

        # over a data set: every product iterates over the batches (memory: one batch)
        F = curvlib.curvature("ggn", model, nn.CrossEntropyLoss(), data=loader)
        F @ v                 # = (1/N) Σ_β m_β C_β v, the operator of one batch holding all the data
        curvlib.curvatures.data.kfac_factors_over(F)   # KFAC factors over the data, one pass

        # dict batches: map each batch to (inputs, targets); a dict of inputs is passed as model(**inputs)
        F = curvlib.curvature("ggn", model, loss_fn, data=loader, batch_fn=lambda b: ({"x": b["x"]}, b["y"]))

    Args:
        kind: a registered curvature kind — ``"fisher"`` (true Fisher, Monte Carlo (2.84)),
            ``"empirical_fisher"`` (2.85), ``"ggn"`` (2.89), ``"hessian"`` — or a mapping
            ``{"kind": ..., **options}`` / an options model with a ``kind`` field.
        model: any ``nn.Module``; the modules with a layer adapter (Linear, Conv1d/2d/3d and
            their transposes with any groups, Embedding, LayerNorm/RMSNorm/GroupNorm/BatchNorm,
            MultiheadAttention, and those of layer plugins) are the layer blocks — called
            several times or with tied weights as well; other trainable parameters are
            excluded with an :class:`~curvlib.capture.adapters.ExcludedParametersWarning`.
            A ``torch.compile``'d or ``DistributedDataParallel``/``DataParallel``-wrapped model
            is captured through the module it wraps (same parameters).
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` or
            ``nn.BCELoss`` (on sigmoid outputs), reduction "mean" or "sum".  The per-sample
            convention is documented in :mod:`curvlib.curvatures.losses`.  Whatever the
            loss's reduction, every operator is the per-sample **mean** (1/m) Σ_b C_b (the
            curvature of the mean loss); ``F.total()`` is the **sum** Σ_b C_b = m·F, the
            curvature of a sum-reduced loss (curvlinops' convention for ``reduction="sum"``).
        batch: ``(X, y)``: ``model(X)`` for a tensor, ``model(*X)`` for a tuple,
            ``model(**X)`` for a dict (the batch size m is then ``y.shape[0]``); see
            :mod:`curvlib.curvatures.batches`.  Exactly one of ``batch`` and ``data``.
        data: a re-iterable of batches (a ``torch.utils.data.DataLoader``, a list; batches
            of any sizes): the operator over the data set, a
            :class:`~curvlib.curvatures.data.DataCurvatureOperator` equal to that of one batch
            holding all N samples, C = (1/N) Σ_β m_β C_β.  Each product runs over the data
            again (capture a batch, multiply, drop it), at the model's current parameters.
        num_data: N, the number of samples in ``data``, if known (saves a counting pass when
            the operator is built; checked against the batches at the first pass).  Only
            with ``data``.
        progress: show a progress bar over the batches of every pass (tqdm, else rich;
            neither is required).  Only with ``data``.
        batch_fn: ``batch -> (inputs, targets)``, applied to ``batch`` or to each batch of
            ``data`` (dict or HuggingFace-style batches); ``inputs`` a tensor, a tuple or a
            dict of keyword inputs.
        generator: the ``torch.Generator`` for the Monte Carlo targets of ``fisher`` (default:
            one seeded from torch's global RNG).  With ``data`` its state is snapshot when the
            operator is built and restored at every pass, so every product uses the same
            targets (the generator itself is not advanced).
        registry: a :class:`curvlib.plugins.Registry` (default: :func:`curvlib.plugins.load_registry`).
        check_samples: verify that every layer's statistics are per sample (one backward pass
            from one sample; catches layers whose input lacks the batch axis).  ``False``
            skips it, for a model and batch shapes checked before.  Only with ``batch`` and
            curvlib's own kinds.
        loss_gradient: also compute ∇L per layer (one backward pass; ``F.gradient_vector()``).
            ``False`` skips it when only products or factors are needed.  Only with ``batch``
            and curvlib's own kinds.
        **options: the kind's options, validated against its pydantic model
            (``fisher``: ``mc_samples``); unknown options raise :class:`~curvlib.errors.ConfigError`.

    Returns:
        with ``batch``: a :class:`~curvlib.curvatures.operator.CurvatureOperator` (``fisher``,
        ``empirical_fisher``, ``ggn``) or :class:`~curvlib.curvatures.operator.HessianOperator`;
        with ``data``: a :class:`~curvlib.curvatures.data.DataCurvatureOperator`.

    Raises:
        UnknownKindError: ``kind`` is not registered (the message lists the known kinds).
        ConfigError: invalid options; both or neither of ``batch`` and ``data``; ``num_data``
            or ``progress`` without ``data``; ``data`` a one-shot iterator.
        UnsupportedLossError: unsupported loss, reduction, output or target shape.
        UnsupportedLayerError: parameters are shared in a way no layer block can hold
            (two layers tying a weight with separate biases; a parameter also registered by
            a module without an adapter).
        ShapeError: an adapted layer's input lacks the batch axis; a batch is not a pair;
            empty ``data``; ``num_data`` differs from the samples seen; batches calling
            different layers.
    """
    if (batch is None) == (data is None):
        got = "both" if data is not None else "neither"
        raise ConfigError(f"curvature: expected exactly one of batch=(X, y) and data=<iterable of batches>, got {got}")
    if data is None and (num_data is not None or progress is not False):
        raise ConfigError(
            f"curvature: num_data and progress apply to data=... only; got num_data={num_data!r}, "
            f"progress={progress!r} with batch="
        )
    model = unwrap_model(model)  # torch.compile / DDP wrappers: capture on the module they wrap
    if registry is None:
        registry = load_registry()
    spec, opts = registry.curvatures.resolve(kind, **options)
    factory = spec.factory(opts)
    extra = {}
    if check_samples is not True or loss_gradient is not True:
        if data is not None or not isinstance(factory, BuiltinCurvature):
            raise ConfigError(
                f"curvature: check_samples and loss_gradient apply to curvlib's own kinds on one batch; "
                f"{spec.kind!r}{' over data' if data is not None else ''} does not take them"
            )
        extra = {"verify": check_samples is True, "gradient": loss_gradient is True}
    if data is not None:
        return DataCurvatureOperator(
            factory, model, loss_fn, data, kind=spec.kind, num_data=num_data, progress=progress,
            batch_fn=batch_fn, generator=generator, registry=registry,
        )
    if batch_fn is not None:
        batch = as_pair(batch, batch_fn)
    return factory.build(model, loss_fn, batch, generator=generator, registry=registry, **extra)
