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

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field
from torch import nn

from curvlib.capture.adapters.base import UseCapture
from curvlib.capture.hooks import backpropagate_columns, capture_forward, check_samples_independent, distinct_outputs
from curvlib.capture.layout import (
    BlockCandidate,
    LayerBlock,
    batch_coupled_modules,
    blocks_params,
    find_layers,
    leave_out,
    warn_batch_coupling,
    warn_excluded,
)
from curvlib.config import StrictModel
from curvlib.curvatures.batches import split_batch
from curvlib.curvatures.losses import Columns, LossModel, loss_model_for
from curvlib.curvatures.operator import CurvatureOperator, HessianOperator
from curvlib.curvatures.statistics import LayerStatistics, Use
from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError, UnsupportedLossError
from curvlib.plugins import load_registry

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
    "StatisticsCurvature",
    "capture_batch",
]


class FisherOptions(StrictModel):
    """Options of ``fisher``: the number S of Monte Carlo target draws per sample (2.84)."""

    mc_samples: int = Field(1, ge=1, le=1_000_000, description="target samples drawn per input from the model's predictive distribution (≤ 10⁶: each is a backward pass)")


class EmpiricalFisherOptions(StrictModel):
    """``empirical_fisher`` takes no options."""


class GGNOptions(StrictModel):
    """``ggn`` takes no options."""


class HessianOptions(StrictModel):
    """``hessian`` takes no options."""


@dataclass
class CapturedBatch:
    """One forward pass with hooks: layer blocks, their recorded uses and the loss.

    Attributes:
        layers: the called layer blocks, laid out in the flat vector.
        excluded: ``{qualified parameter name: reason}``.
        inputs: the model's positional inputs.
        target: the targets ``y``.
        output: the network output f ``[m, *out]`` (in the graph).
        uses: per block, the recorded uses of each of its adapters (primary first), in call order.
        loss: L as the user's loss module computes it (detached).
        gradient: ∇_{W̄_i} L, ``[g_dim, a_dim]`` per block (``None`` for a product-only capture).
        kwargs: the model's keyword inputs (``model(*inputs, **kwargs)``; empty unless the
            batch's X is a mapping, see :mod:`curvlib.curvatures.batches`).
    """

    layers: list[LayerBlock]
    excluded: dict[str, str]
    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    output: torch.Tensor
    uses: list[list[list[UseCapture]]]
    loss: torch.Tensor
    gradient: list[torch.Tensor] | None
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.output.shape[0])

    def statistics(self, columns: list[list[list[torch.Tensor]]], scale: float) -> list[LayerStatistics]:
        """Each block's :class:`LayerStatistics` from its uses and their back-propagated columns
        (``columns`` grouped like :attr:`uses`); tied adapters' uses placed in the block's W̄."""
        out = []
        for L, per_adapter, g_per_adapter in zip(self.layers, self.uses, columns):
            uses = []
            for placement, recorded, gs in zip(L.placements, per_adapter, g_per_adapter):
                for u, g in zip(recorded, gs):
                    rows, g = placement.place(u.rows, g, L.g_dim, L.a_dim)
                    uses.append(Use(rows, g, u.geometry, placement.transposed))
            out.append(LayerStatistics(uses=uses, scale=scale, has_bias=L.has_bias))
        return out


def capture_batch(model: nn.Module, loss_model: LossModel, batch: Any, registry: Any, *,
                  verify: bool = True, gradient: bool = True) -> CapturedBatch:
    """Discover the layer blocks, run one hooked forward pass, check the loss and that every
    layer's statistics are per sample (:func:`~curvlib.capture.hooks.check_samples_independent`,
    one backward pass; skipped when BatchNorm in training mode couples the samples anyway),
    compute ∇L.  ``batch`` is ``(X, y)``: the model is called ``model(X)``, ``model(*X)``
    for a tuple, ``model(**X)`` for a mapping (:mod:`curvlib.curvatures.batches`).

    Warns (:class:`~curvlib.capture.adapters.ExcludedParametersWarning`) about excluded
    parameters, including those of adapted modules the forward never called.

    ``verify=False`` skips the per-sample probe (one backward pass), for a caller that
    verified the same model and batch shapes before; ``gradient=False`` skips ∇L (one
    backward pass; ``gradient`` is then ``None``), for a caller that needs only products.
    """
    with torch.enable_grad(), hooked_pass(model, loss_model, batch, registry, verify=verify,
                                          gradient=gradient) as captured:
        captured.set_output(split_batch(batch).call(model))
    return captured.result


class _HookedPass:
    """The state of :func:`hooked_pass`: the recorded forward, then (at exit) the :class:`CapturedBatch`."""

    def __init__(self, record: Any) -> None:
        self.record = record
        self.output: torch.Tensor | None = None
        self.result: CapturedBatch | None = None
        self.operator: Any = None  # set by the kinds' capturing()

    def set_output(self, output: Any) -> None:
        self.check_first_call()
        self.output = output

    def check_first_call(self, *_: Any) -> None:
        if self.output is not None:
            raise ConfigError(
                "the model was called twice while its curvature statistics were being captured; call it once "
                "on the batch (one forward pass per refresh; a second pass, such as a gradient penalty's, "
                "after the block)"
            )


@contextlib.contextmanager
def hooked_pass(model: nn.Module, loss_model: LossModel, batch: Any, registry: Any, *, verify: bool = True,
                gradient: bool = True, own_forward: bool = False) -> Iterator[_HookedPass]:
    """The hooked forward pass of :func:`capture_batch`, run by the caller inside the block.

    The caller calls the model once on ``batch`` inside the block and hands the output to
    ``set_output`` — or, with ``own_forward=True`` (the caller's own training forward, see
    :meth:`curvlib.optim.NaturalGradient.capture`), a forward hook on ``model`` picks it up.
    At the exit the output and the loss are checked, the per-sample probe and ∇L run
    (``verify``, ``gradient``; both retain the graph) and ``result`` holds the
    :class:`CapturedBatch`.  An exception inside the block propagates, hooks removed.
    """
    candidates, excluded = find_layers(model, registry)
    candidates = leave_out(model, candidates, excluded)
    warn_batch_coupling(model)
    split = split_batch(batch)
    target = split.target
    first_param = next((p for c in candidates for p in c.adapter.params()), None)
    device = first_param.device if first_param is not None else None
    for t in split.tensors():
        if device is not None and t.device != device:
            raise DTypeDeviceError(f"batch tensor on {t.device}, the model's parameters are on {device}")
    adapters = [ad for c in candidates for ad in c.adapters]
    index = {id(ad): k for k, ad in enumerate(adapters)}
    m = split.num_samples
    with capture_forward(adapters, batch_size=m) as record:
        state = _HookedPass(record)
        hooks = [model.register_forward_pre_hook(state.check_first_call),  # before the layers' hooks record
                 model.register_forward_hook(lambda _m, _args, out: state.set_output(out))] if own_forward else []
        try:
            yield state
        finally:
            for hook in hooks:
                hook.remove()
    output = state.output
    if output is None:
        raise ConfigError("the model was not called on the batch while its curvature statistics were being captured")
    if not isinstance(output, torch.Tensor):
        raise UnsupportedLossError(f"expected the model to return one tensor, got {type(output).__name__}")
    if loss_model.target_required and not isinstance(target, torch.Tensor):
        raise UnsupportedLossError(f"expected a target tensor, got {type(target).__name__}")
    if m is not None and output.ndim > 0 and output.shape[0] != m:
        raise ShapeError(f"the model's output has {output.shape[0]} entries on axis 0, the batch {m} samples")
    with torch.enable_grad():
        loss_model.check(output, target)
        if verify and not batch_coupled_modules(model):  # BatchNorm in training mode mixes samples (warned)
            check_samples_independent(output, record)
        called = [c for c in candidates if any(record.uses[index[id(ad)]] for ad in c.adapters)]
        for c in candidates:
            if c not in called:
                _exclude_uncalled(c, excluded)
        if not called:
            raise ShapeError("no adapted layer was called in the forward pass")
        layers = LayerBlock.build(called)
        uses = [[record.uses[index[id(ad)]] for ad in L.adapters] for L in layers]
        loss = loss_model.loss_fn(output, target)
        grad = _loss_gradient(loss, layers) if gradient else None
    warn_excluded(excluded)
    state.result = CapturedBatch(
        layers=layers,
        excluded=excluded,
        inputs=split.args,
        target=target,
        output=output,
        uses=uses,
        loss=loss.detach(),
        gradient=grad,
        kwargs=dict(split.kwargs),
    )


def _multiple(r: torch.Tensor, g: torch.Tensor) -> float | None:
    """α with r = α·g to rounding (max-norm residual ≤ 256·eps·max|r|), or ``None``: α from the
    entry of largest |g|, checked on every entry, one host read."""
    if r.shape != g.shape or g.numel() == 0:
        return None
    rf, gf = r.reshape(-1), g.reshape(-1).to(r.dtype)
    i = gf.abs().argmax()
    alpha = rf[i] / gf[i]
    alpha_, residual, r_max, g_max = torch.stack([alpha, (rf - alpha * gf).abs().max(), rf.abs().max(),
                                                  gf.abs().max()]).tolist()
    if g_max == 0.0:
        return 0.0 if r_max == 0.0 else None
    return alpha_ if residual <= 256 * torch.finfo(r.dtype).eps * r_max else None


def _loss_gradient(loss: torch.Tensor, layers: list[LayerBlock]) -> list[torch.Tensor]:
    """∇_{W̄_i} L ``[g_dim, a_dim]`` of every block (one backward pass, graph retained)."""
    params = blocks_params(layers)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
    where = {id(p): k for k, p in enumerate(params)}
    return [L.adapter.params_to_matrix(L.adapter.pieces([grads[where[id(p)]] for p in L.adapter.params()]))
            for L in layers]


def _exclude_uncalled(c: BlockCandidate, excluded: dict[str, str]) -> None:
    for ad in c.adapters:
        own = {id(q): n for n, q in ad.module.named_parameters(recurse=False)}
        for p in ad.params():
            qual = f"{ad.name}.{own[id(p)]}" if ad.name else own[id(p)]
            excluded[qual] = f"{type(ad.module).__name__} {ad.name!r} was not called through its forward"


def _default_generator() -> torch.Generator:
    """A CPU generator seeded from torch's global RNG (reproducible under ``torch.manual_seed``)."""
    seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator().manual_seed(seed)


class BuiltinCurvature:
    """The built-in kinds' factories: ``build`` also accepts ``verify`` and ``gradient`` (see
    :func:`capture_batch`), which curvlib's own callers pass for repeated captures."""


class StatisticsCurvature(BuiltinCurvature):
    """Common build path of the kinds defined by back-propagated columns (``fisher``,
    ``empirical_fisher``, ``ggn``); they can also capture from the caller's own forward pass
    (:meth:`capturing`)."""

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
        verify: bool = True,
        gradient: bool = True,
    ) -> CurvatureOperator:
        """Capture ``batch`` and return the :class:`CurvatureOperator` of this kind.

        Args:
            model: the network; ``model(*X)`` must return the output f ``[m, *out]``.
            loss_fn: a supported loss module (see :mod:`curvlib.curvatures.losses`).
            batch: ``(X, y)``.
            generator: the random source of ``fisher`` target sampling.
            registry: a :class:`curvlib.plugins.Registry` (default: freshly loaded).
        """
        with torch.enable_grad(), self.capturing(model, loss_fn, batch, generator=generator, registry=registry,
                                                 verify=verify, gradient=gradient) as state:
            split_batch(batch).call(model)  # the capture's own forward pass
        return state.operator

    @contextlib.contextmanager
    def capturing(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        batch: Any,
        *,
        generator: torch.Generator | None = None,
        registry: Any = None,
        verify: bool = True,
        gradient: bool = True,
    ) -> Iterator[_HookedPass]:
        """What :meth:`build` returns, from the caller's own forward pass inside the block.

        The caller calls ``model`` once on ``batch`` in the block (its training forward); at
        the exit the columns are back-propagated through that graph (retained, so the caller's
        ``loss.backward()`` follows) and the yielded object's ``operator`` is the
        :class:`CurvatureOperator` — the one :meth:`build` gives for the same batch and
        generator state, one forward pass cheaper.
        """
        registry = _registry(registry)
        loss_model = loss_model_for(loss_fn)
        with hooked_pass(model, loss_model, batch, registry, verify=verify, gradient=gradient,
                         own_forward=True) as state:
            yield state
        with torch.enable_grad():
            state.operator = self._operator(loss_model, state.result, generator)

    @contextlib.contextmanager
    def capturing_backward(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        batch: Any,
        *,
        registry: Any = None,
        verify: bool = True,
        gradient: bool = True,
    ) -> Iterator[_HookedPass]:
        """:meth:`capturing` without a backward pass of its own: the kind's one column per
        sample is the caller's own ``loss.backward()``, read by hooks on the recorded outputs.

        Only for a kind whose column is the gradient of the loss at the data targets
        (``empirical_fisher``).  The yielded object's ``finish()``, called after the caller's
        backward, returns the :class:`CurvatureOperator` — the one :meth:`capturing` gives, to
        rounding — or ``None`` when the caller's backward cannot stand for the column: it did not
        run, ran more than once, or its gradient at the network output is not a multiple of the
        column, ∇_f ℓ_b(y_b)/√k (a loss with other terms of the output, a scaled loss as AMP's).
        The caller then captures the batch with a pass of its own.
        """
        registry = _registry(registry)
        loss_model = loss_model_for(loss_fn)
        with hooked_pass(model, loss_model, batch, registry, verify=verify, gradient=gradient,
                         own_forward=True) as state:
            yield state
        cap = state.result
        tensors = [cap.output, *distinct_outputs(uc for per_layer in cap.uses for per_adapter in per_layer
                                                 for uc in per_adapter)]
        seen: list[list[torch.Tensor]] = [[] for _ in tensors]
        handles = [t.register_hook(lambda grad, i=i: seen[i].append(grad.detach())) for i, t in enumerate(tensors)
                   if t.requires_grad]

        def finish() -> CurvatureOperator | None:
            for h in handles:
                h.remove()
            if not seen[0] or any(len(g) > 1 for g in seen):
                return None
            with torch.enable_grad():
                columns, scale, _ = self._columns(loss_model, cap, None)
            r, got = columns.get(0).detach(), seen[0][0]
            alpha = _multiple(r, got)
            if alpha is None:
                return None
            grads = {id(t): (g[0] * alpha if g else torch.zeros_like(t)) for t, g in zip(tensors, seen)}
            stats = cap.statistics([[[uc.columns([grads[id(t)] for t in uc.outputs]).unsqueeze(1) for uc in per_adapter]
                                     for per_adapter in per_layer] for per_layer in cap.uses], scale)
            return CurvatureOperator(cap.layers, list(cap.excluded), stats, kind=self.kind, loss=cap.loss,
                                     gradient=cap.gradient, sampled_targets=None)

        state.finish = finish

    def _operator(self, loss_model: LossModel, cap: CapturedBatch,
                  generator: torch.Generator | None) -> CurvatureOperator:
        columns, scale, samples = self._columns(loss_model, cap, generator)
        flat = [u for per_adapter in cap.uses for u in per_adapter]
        g = backpropagate_columns(cap.output, flat, columns.count, columns.get)
        grouped, k = [], 0
        for per_adapter in cap.uses:
            grouped.append(g[k : k + len(per_adapter)])
            k += len(per_adapter)
        stats = cap.statistics(grouped, scale)
        return CurvatureOperator(
            cap.layers,
            list(cap.excluded),
            stats,
            kind=self.kind,
            loss=cap.loss,
            gradient=cap.gradient,
            sampled_targets=samples,
        )


class FisherCurvature(StatisticsCurvature):
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


class EmpiricalFisherCurvature(StatisticsCurvature):
    """``empirical_fisher`` (2.85): per-sample gradients at the data targets, divided by √k; scale 1/m."""

    kind = "empirical_fisher"
    options_model = EmpiricalFisherOptions

    def _columns(self, loss_model, cap, generator):
        return loss_model.gradient_columns(cap.output, [cap.target]), 1.0 / cap.num_samples, None


class GGNCurvature(StatisticsCurvature):
    """``ggn``: (1/m) Σ_b J_bᵀ ∇²_f ℓ_b J_b (2.89) from the columns of a square root of the
    loss Hessian w.r.t. the output (one backward pass per output entry / class); scale 1/m."""

    kind = "ggn"
    options_model = GGNOptions

    def _columns(self, loss_model, cap, generator):
        return loss_model.ggn_columns(cap.output, cap.target), 1.0 / cap.num_samples, None


class HessianCurvature(BuiltinCurvature):
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
        verify: bool = True,
        gradient: bool = True,
    ) -> HessianOperator:
        """Capture ``batch`` once (layers, loss checks, gradient) and return the :class:`HessianOperator`."""
        registry = _registry(registry)
        loss_model = loss_model_for(loss_fn)
        cap = capture_batch(model, loss_model, batch, registry, verify=verify, gradient=gradient)
        return HessianOperator(
            cap.layers,
            list(cap.excluded),
            model=model,
            loss_model=loss_model,
            inputs=cap.inputs,
            input_kwargs=cap.kwargs,
            target=cap.target,
            num_samples=cap.num_samples,
            loss=cap.loss,
            gradient=None if cap.gradient is None else [g.detach() for g in cap.gradient],
        )


def _registry(registry: Any) -> Any:
    return registry if registry is not None else load_registry()


BUILTIN_KINDS: Sequence[tuple[str, type, type[StrictModel]]] = (
    ("fisher", FisherCurvature, FisherOptions),
    ("empirical_fisher", EmpiricalFisherCurvature, EmpiricalFisherOptions),
    ("ggn", GGNCurvature, GGNOptions),
    ("hessian", HessianCurvature, HessianOptions),
)
