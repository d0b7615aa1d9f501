"""Capture of per-sample layer statistics with forward hooks.

:func:`capture_forward` is a context manager that installs one forward hook per adapted
module (removed in ``finally``, even when the forward raises).  Each hook records

- the activations ā of the layer (computed at once from the module's input, so a later
  in-place change of that input cannot alter them), and
- the module's output s (the pre-activation), kept in the autograd graph.

The hook hands the rest of the network ``s.clone()`` instead of s: an in-place operation
downstream (``nn.ReLU(inplace=True)``) then changes the clone, and ∂(·)/∂s stays the
gradient with respect to the pre-activation.

Pre-activation gradients then come from plain ``torch.autograd.grad`` calls on the
recorded outputs (no backward hooks): :func:`backpropagate_columns` back-propagates c
"columns" r_c through the network output f and returns, per layer,
g_{b,c} = J_{s,b}ᵀ r_{b,c} — per sample b, because a network without batch coupling makes
∂(Σ_b r_bᵀ f_b)/∂s_b depend on sample b only.  Cost: one backward pass per column (c
passes in all), memory ``O(m·c·T·d_g)`` per layer for g.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from curvlib.capture.adapters import LayerAdapter
from curvlib.errors import UnsupportedLayerError

__all__ = ["ForwardRecord", "backpropagate_columns", "capture_forward", "weight_gradients"]


@dataclass
class ForwardRecord:
    """What :func:`capture_forward` recorded, one entry per adapter (in the adapters' order).

    Attributes:
        activations: ā per layer, ``[m, a_dim]`` (Linear) or ``[m, T, a_dim]`` (conv), detached;
            ``None`` for a module that was not called.
        outputs: the module outputs s (in the graph), ``None`` if not called.
        calls: how many times each module was called.
    """

    adapters: Sequence[LayerAdapter]
    activations: list[torch.Tensor | None] = field(default_factory=list)
    outputs: list[torch.Tensor | None] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.adapters)
        self.activations = [None] * n
        self.outputs = [None] * n
        self.calls = [0] * n

    def called(self) -> list[int]:
        """Indices of the adapters whose module was called in the forward."""
        return [i for i, c in enumerate(self.calls) if c > 0]


def _make_hook(record: ForwardRecord, i: int) -> Callable:
    adapter = record.adapters[i]

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if record.calls[i] > 0:
            raise UnsupportedLayerError(
                f"{type(module).__name__} layer {adapter.name!r} was called more than once in one forward pass "
                "(weight sharing); curvlib's per-layer statistics need each adapted module called once"
            )
        record.calls[i] += 1
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            raise UnsupportedLayerError(
                f"{type(module).__name__} layer {adapter.name!r}: expected a tensor input and a tensor output"
            )
        record.activations[i] = adapter.activations(args[0].detach(), output_shape=tuple(output.shape))
        record.outputs[i] = output
        return output.clone()

    return hook


@contextmanager
def capture_forward(adapters: Sequence[LayerAdapter]) -> Iterator[ForwardRecord]:
    """Install forward hooks on the adapters' modules for one forward pass.

    Usage::

        with capture_forward(adapters) as record:
            f = model(X)
        # record.activations[i], record.outputs[i]

    The hooks are removed when the block exits, also when the forward raises.
    """
    record = ForwardRecord(adapters)
    handles = []
    try:
        for i, ad in enumerate(adapters):
            handles.append(ad.module.register_forward_hook(_make_hook(record, i)))
        yield record
    finally:
        for h in handles:
            h.remove()


def backpropagate_columns(
    output: torch.Tensor,
    layer_outputs: Sequence[torch.Tensor],
    adapters: Sequence[LayerAdapter],
    num_columns: int,
    column: Callable[[int], torch.Tensor],
) -> list[torch.Tensor]:
    """Back-propagate ``num_columns`` columns from the network output to every layer output.

    Args:
        output: the network output f ``[m, *out]`` (in the graph).
        layer_outputs: the recorded module outputs s_i (in the graph).
        adapters: the matching adapters (turn ∂/∂s_i into g).
        num_columns: c.
        column: ``column(j)`` -> r_j ``[m, *out]``, the j-th column for every sample.

    Returns:
        one g per layer: Linear ``[m, c, d_g]``; conv ``[m, c, T, d_g]``, with
        g[b, j] = J_{s,b}ᵀ r_j[b].  One backward pass per column.
    """
    gs: list[torch.Tensor | None] = [None] * len(adapters)
    for j in range(num_columns):
        r = column(j)
        grads = torch.autograd.grad(output, list(layer_outputs), grad_outputs=r, retain_graph=True, allow_unused=True)
        for i, (ad, s, gr) in enumerate(zip(adapters, layer_outputs, grads)):
            gj = ad.pre_activation_grads(torch.zeros_like(s) if gr is None else gr)
            if gs[i] is None:
                gs[i] = gj.new_empty((gj.shape[0], num_columns, *gj.shape[1:]))
            gs[i][:, j] = gj
    return gs  # type: ignore[return-value]


def weight_gradients(
    loss: torch.Tensor,
    layer_outputs: Sequence[torch.Tensor],
    adapters: Sequence[LayerAdapter],
    activations: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """∇_{W̄_i} loss for every layer from one backward pass to the layer outputs.

    DW̄_i = Σ_{b,t} (∂loss/∂s_{b,t}) ā_{b,t}ᵀ (3.27).  Returns W̄-shaped ``[g_dim, a_dim]`` tensors.
    """
    grads = torch.autograd.grad(loss, list(layer_outputs), retain_graph=True, allow_unused=True)
    out = []
    for ad, s, gr, a in zip(adapters, layer_outputs, grads, activations):
        g = ad.pre_activation_grads(torch.zeros_like(s) if gr is None else gr)
        out.append(g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1]))
    return out
