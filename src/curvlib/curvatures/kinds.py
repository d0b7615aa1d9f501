"""The built-in curvature kinds and their options models.

Each kind is a factory class: ``Kind(options).build(model, loss_fn, batch, *, generator,
registry)`` returns an operator (see :mod:`curvlib.curvatures.operator`); the per-sample
loss convention and the columns each kind back-propagates are those of
:mod:`curvlib.curvatures.losses`.

==================  ==============================  ===============  =====================
kind                columns r (per sample)          c                scale
==================  ==============================  ===============  =====================
``fisher``          ∇_f ℓ_b(ŷ_{b,s})/√k, ŷ ~ model   S (mc_samples)   1/(m·S)     (2.84)
``empirical_fisher`` ∇_f ℓ_b(y_b)/√k, data targets   1                1/m         (2.85)
``ggn``             columns of (∇²_f ℓ_b)^{1/2}      C (outputs)      1/m         (2.89)
``hessian``         — (double back-propagation)      —                (1/m)Σ_b ∇²ℓ_b
==================  ==============================  ===============  =====================

Capture cost: one forward pass with hooks, one backward pass for the loss gradient and
one backward pass per column (c in all); the ``ggn`` of a loss with many outputs (an
auto-encoder's 784 pixels) therefore costs 784 backward passes — prefer ``fisher`` there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn

from curvlib.capture.adapters import (
    LayerBlock,
    find_layers,
    warn_batch_coupling,
    warn_excluded,
)
from curvlib.capture.hooks import backpropagate_columns, capture_forward, weight_gradients
from curvlib.config import StrictModel
from curvlib.curvatures.losses import Columns, LossModel, loss_model_for
from curvlib.curvatures.operator import CurvatureOperator, HessianOperator
from curvlib.curvatures.statistics import LayerStatistics
from curvlib.errors import DTypeDeviceError, ShapeError, UnsupportedLossError
from curvlib.linalg.geometry import Geometry

__all__ = [
    "CapturedBatch",
    "EmpiricalFisherCurvature",
    "EmpiricalFisherOptions",
    "FisherCurvature",
    "FisherOptions",
    "GGNCurvature",
    "GGNOptions",
    "HessianCurvature",
    "HessianOptions",
    "capture_batch",
]


class FisherOptions(StrictModel):
    """Options of ``fisher``: the number S of Monte Carlo target draws per sample (2.84)."""

    mc_samples: int = Field(1, ge=1, description="target samples drawn per input from the model's predictive distribution")


class EmpiricalFisherOptions(StrictModel):
    """``empirical_fisher`` takes no options."""


class GGNOptions(StrictModel):
    """``ggn`` takes no options."""


class HessianOptions(StrictModel):
    """``hessian`` takes no options."""


@dataclass
class CapturedBatch:
    """One forward pass with hooks: layers, statistics sources and the loss.

    Attributes:
        layers: the called adapted layers, laid out in the flat vector.
        excluded: ``{qualified parameter name: reason}``.
        inputs: the model's positional inputs.
        target: the targets ``y``.
        output: the network output f ``[m, *out]`` (in the graph).
        layer_outputs: module outputs s_i (in the graph).
        activations: ā_i, ``[m, a_dim]`` or ``[m, T, a_dim]``.
        loss: L as the user's loss module computes it (detached).
        gradient: ∇_{W̄_i} L, ``[g_dim, a_dim]`` per layer.
    """

    layers: list[LayerBlock]
    excluded: dict[str, str]
    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    output: torch.Tensor
    layer_outputs: list[torch.Tensor]
    activations: list[torch.Tensor]
    loss: torch.Tensor
    gradient: list[torch.Tensor]

    @property
    def num_samples(self) -> int:
        return int(self.output.shape[0])

    @property
    def adapters(self) -> list[Any]:
        return [L.adapter for L in self.layers]


def _split_batch(batch: Any) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ShapeError(f"expected batch=(X, y) with X a tensor or a tuple of tensors, got {type(batch).__name__}")
    X, y = batch
    inputs = tuple(X) if isinstance(X, (tuple, list)) else (X,)
    return inputs, y


def capture_batch(model: nn.Module, loss_model: LossModel, batch: Any, registry: Any) -> CapturedBatch:
    """Discover the layers, run one hooked forward pass, check the loss, compute ∇L.

    Warns (:class:`~curvlib.capture.adapters.ExcludedParametersWarning`) about excluded
    parameters, including those of adapted modules the forward never called.
    """
    candidates, excluded = find_layers(model, registry)
    warn_batch_coupling(model, stacklevel=4)
    inputs, target = _split_batch(batch)
    device = candidates[0].adapter.weight.device
    for t in (*inputs, target):
        if isinstance(t, torch.Tensor) and t.device != device:
            raise DTypeDeviceError(f"batch tensor on {t.device}, the model's parameters are on {device}")
    with torch.enable_grad():
        with capture_forward([c.adapter for c in candidates]) as record:
            output = model(*inputs)
        if not isinstance(output, torch.Tensor):
            raise UnsupportedLossError(f"expected the model to return one tensor, got {type(output).__name__}")
        if not isinstance(target, torch.Tensor):
            raise UnsupportedLossError(f"expected a target tensor, got {type(target).__name__}")
        loss_model.check(output, target)
        called = record.called()
        for i, c in enumerate(candidates):
            if i not in called:
                for p in c.adapter.params():
                    pname = next(n for n, q in c.adapter.module.named_parameters(recurse=False) if q is p)
                    qual = f"{c.name}.{pname}" if c.name else pname
                    excluded[qual] = f"{type(c.adapter.module).__name__} {c.name!r} was not called through its forward"
        if not called:
            raise ShapeError("no adapted layer was called in the forward pass")
        layers = LayerBlock.build([candidates[i] for i in called])
        layer_outputs = [record.outputs[i] for i in called]
        activations = [record.activations[i] for i in called]
        loss = loss_model.loss_fn(output, target)
        gradient = weight_gradients(loss, layer_outputs, [L.adapter for L in layers], activations)
    warn_excluded(excluded, stacklevel=4)
    return CapturedBatch(
        layers=layers,
        excluded=excluded,
        inputs=inputs,
        target=target,
        output=output,
        layer_outputs=layer_outputs,
        activations=activations,
        loss=loss.detach(),
        gradient=gradient,
    )


def _default_generator() -> torch.Generator:
    """A CPU generator seeded from torch's global RNG (reproducible under ``torch.manual_seed``)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


class _StatisticsCurvature:
    """Common build path of the kinds defined by back-propagated columns."""

    kind = ""
    options_model: type[StrictModel] = StrictModel

    def __init__(self, options: StrictModel | None = None) -> None:
        self.options = options if options is not None else self.options_model()

    def _columns(
        self, loss_model: LossModel, cap: CapturedBatch, generator: torch.Generator | None
    ) -> tuple[Columns, float, torch.Tensor | None]:
        raise NotImplementedError

    def build(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        batch: Any,
        *,
        generator: torch.Generator | None = None,
        registry: Any = None,
    ) -> CurvatureOperator:
        """Capture ``batch`` and return the :class:`CurvatureOperator` of this kind.

        Args:
            model: the network; ``model(*X)`` must return the output f ``[m, *out]``.
            loss_fn: a supported loss module (see :mod:`curvlib.curvatures.losses`).
            batch: ``(X, y)``.
            generator: the random source of ``fisher`` target sampling.
            registry: a :class:`curvlib.plugins.Registry` (default: freshly loaded).
        """
        registry = _registry(registry)
        loss_model = loss_model_for(loss_fn)
        cap = capture_batch(model, loss_model, batch, registry)
        columns, scale, samples = self._columns(loss_model, cap, generator)
        g = backpropagate_columns(cap.output, cap.layer_outputs, cap.adapters, columns.count, columns.get)
        stats = [_layer_statistics(L, a, gi, scale) for L, a, gi in zip(cap.layers, cap.activations, g)]
        return CurvatureOperator(
            cap.layers,
            list(cap.excluded),
            stats,
            kind=self.kind,
            loss=cap.loss,
            gradient=cap.gradient,
            sampled_targets=samples,
        )


def _layer_statistics(L: LayerBlock, a: torch.Tensor, g: torch.Tensor, scale: float) -> LayerStatistics:
    geometry = Geometry.none() if L.spatial_shape is None else Geometry.grid(L.spatial_shape, L.kernel_size)
    return LayerStatistics(a, g, scale, geometry, has_bias=L.has_bias)


class FisherCurvature(_StatisticsCurvature):
    """``fisher``: the true Fisher by Monte Carlo (2.84) — S targets per input drawn from the
    model's predictive distribution with the given ``torch.Generator``; scale 1/(m·S).

    The draws are kept in ``operator.sampled_targets``.  E[fisher] = ggn (Thm 2.1).
    """

    kind = "fisher"
    options_model = FisherOptions

    def _columns(self, loss_model, cap, generator):
        gen = generator if generator is not None else _default_generator()
        S = int(self.options.mc_samples)
        samples = loss_model.sample_targets(cap.output, S, gen)
        targets = [loss_model.target_column(samples, s) for s in range(S)]
        return loss_model.gradient_columns(cap.output, targets), 1.0 / (cap.num_samples * S), samples


class EmpiricalFisherCurvature(_StatisticsCurvature):
    """``empirical_fisher`` (2.85): per-sample gradients at the data targets, divided by √k; scale 1/m."""

    kind = "empirical_fisher"
    options_model = EmpiricalFisherOptions

    def _columns(self, loss_model, cap, generator):
        return loss_model.gradient_columns(cap.output, [cap.target]), 1.0 / cap.num_samples, None


class GGNCurvature(_StatisticsCurvature):
    """``ggn``: (1/m) Σ_b J_bᵀ ∇²_f ℓ_b J_b (2.89) from the columns of a square root of the
    loss Hessian w.r.t. the output (one backward pass per output entry / class); scale 1/m."""

    kind = "ggn"
    options_model = GGNOptions

    def _columns(self, loss_model, cap, generator):
        return loss_model.ggn_columns(cap.output), 1.0 / cap.num_samples, None


class HessianCurvature:
    """``hessian``: exact products with ∇²_θ (1/m) Σ_b ℓ_b by double back-propagation
    (see :class:`HessianOperator`); re-runs the model for every product call."""

    kind = "hessian"
    options_model = HessianOptions

    def __init__(self, options: StrictModel | None = None) -> None:
        self.options = options if options is not None else HessianOptions()

    def build(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        batch: Any,
        *,
        generator: torch.Generator | None = None,
        registry: Any = None,
    ) -> HessianOperator:
        """Capture ``batch`` once (layers, loss checks, gradient) and return the :class:`HessianOperator`."""
        registry = _registry(registry)
        loss_model = loss_model_for(loss_fn)
        cap = capture_batch(model, loss_model, batch, registry)
        return HessianOperator(
            cap.layers,
            list(cap.excluded),
            model=model,
            loss_model=loss_model,
            inputs=cap.inputs,
            target=cap.target,
            num_samples=cap.num_samples,
            loss=cap.loss,
            gradient=[g.detach() for g in cap.gradient],
        )


def _registry(registry: Any) -> Any:
    if registry is not None:
        return registry
    from curvlib.plugins import load_registry

    return load_registry()


BUILTIN_KINDS: Sequence[tuple[str, type, type[StrictModel]]] = (
    ("fisher", FisherCurvature, FisherOptions),
    ("empirical_fisher", EmpiricalFisherCurvature, EmpiricalFisherOptions),
    ("ggn", GGNCurvature, GGNOptions),
    ("hessian", HessianCurvature, HessianOptions),
)
