"""Capture of per-sample layer statistics during one forward pass.

:func:`capture_forward` is a context manager that makes every adapter see each call of its
module (removed in ``finally``, even when the forward raises):

* adapters with ``capture_via = "hook"`` share one forward hook per module (the groups of a
  grouped convolution, for instance); the hook records each adapter's uses of the call
  (activations computed at once from the input, so a later in-place change of the input
  cannot alter them, and the module output, kept in the autograd graph) and hands the
  rest of the network ``output.clone()``: an in-place operation downstream
  (``nn.ReLU(inplace=True)``) then changes the clone, and ∂(·)/∂output stays the gradient
  with respect to the pre-activation;
* adapters with ``capture_via = "forward"`` replace the module's forward by theirs for the
  duration (``nn.MultiheadAttention``, whose projections bypass module calls).

A module called several times records one set of uses per call.  Every use's rows must
have the batch's m samples on their first axis (a module that puts the batch elsewhere
raises a :class:`~curvlib.errors.ShapeError` naming it).

Back-propagated columns then come from plain ``torch.autograd.grad`` calls on the recorded
output tensors (no backward hooks): :func:`backpropagate_columns` back-propagates c columns
r_c through the network output f and gives every use g_{b,c} = J_bᵀ r_{b,c} — per sample
b, because a network without batch coupling makes ∂(Σ_b r_bᵀ f_b)/∂s_b depend on sample b
only.  Cost: one backward pass per column (c in all), memory ``O(m·c·T·d_g)`` per use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from curvlib.capture.adapters.base import LayerAdapter, UseCapture
from curvlib.errors import ShapeError, UnsupportedLayerError

__all__ = ["ForwardRecord", "backpropagate_columns", "capture_forward", "check_samples_independent", "distinct_outputs"]


@dataclass
class ForwardRecord:
    """What :func:`capture_forward` recorded: the uses of every adapter, in call order.

    Attributes:
        adapters: the adapters, in the order given.
        batch_size: m, checked against every use's rows (``None``: not checked).
        uses: one list of :class:`UseCapture` per adapter.
    """

    adapters: Sequence[LayerAdapter]
    batch_size: int | None = None
    uses: list[list[UseCapture]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.uses = [[] for _ in self.adapters]

    def add(self, i: int, uses: Sequence[UseCapture]) -> None:
        ad = self.adapters[i]
        for u in uses:
            if self.batch_size is not None and u.rows.m != self.batch_size:
                raise ShapeError(
                    f"{ad._label()}: its input has {u.rows.m} entries on the batch axis {ad.batch_dim}, the batch has "
                    f"{self.batch_size} samples; per-sample curvature needs the samples on that axis of every adapted "
                    "layer.  A layer applied to an input without the batch axis (a positional embedding on "
                    "torch.arange(T)) mixes the samples' gradients: give it the batch axis "
                    "(pos(torch.arange(T).expand(m, T))); a model that moves the batch axis by hand (a sequence-first "
                    "transformer built from plain layers) is not supported"
                )
        self.uses[i].extend(uses)



def _make_hook(record: ForwardRecord, indices: Sequence[int]) -> Callable:
    def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            ad = record.adapters[indices[0]]
            raise UnsupportedLayerError(f"{ad._label()}: expected a tensor output, got {type(output).__name__}")
        for i in indices:
            record.add(i, record.adapters[i].capture(args, kwargs, output))
        return output.clone()

    return hook


class _ForwardPatch:
    """Replaces ``module.forward`` by an adapter's capturing forward; ``remove()`` restores it."""

    def __init__(self, adapter: LayerAdapter, record: ForwardRecord, i: int) -> None:
        self.module = adapter.module
        self._had = "forward" in self.module.__dict__
        self._old = self.module.__dict__.get("forward")
        self.module.forward = functools.partial(adapter.forward_with_capture, functools.partial(record.add, i))

    def remove(self) -> None:
        if self._had:
            self.module.forward = self._old
        else:
            del self.module.forward


@contextmanager
def capture_forward(adapters: Sequence[LayerAdapter], batch_size: int | None = None) -> Iterator[ForwardRecord]:
    """Make every adapter record its module's calls during one forward pass.

    Usage::

        with capture_forward(adapters, batch_size=m) as record:
            f = model(X)
        # record.uses[i]: the uses of adapter i

    The hooks (and replaced forwards) are removed when the block exits, also when the
    forward raises.
    """
    record = ForwardRecord(adapters, batch_size)
    by_module: dict[int, tuple[torch.nn.Module, list[int]]] = {}
    handles: list[Any] = []
    try:
        for i, ad in enumerate(adapters):
            if ad.capture_via == "forward":
                handles.append(_ForwardPatch(ad, record, i))
            else:
                by_module.setdefault(id(ad.module), (ad.module, []))[1].append(i)
        for module, indices in by_module.values():
            handles.append(module.register_forward_hook(_make_hook(record, indices), with_kwargs=True))
        yield record
    finally:
        for h in handles:
            h.remove()


def distinct_outputs(uses: Iterable[UseCapture]) -> list[torch.Tensor]:
    """The distinct output tensors of recorded uses, in order of first appearance (a tensor two
    uses share appears once)."""
    out: dict[int, torch.Tensor] = {}
    for u in uses:
        for t in u.outputs:
            out.setdefault(id(t), t)
    return list(out.values())


def backpropagate_columns(
    output: torch.Tensor,
    uses: Sequence[Sequence[UseCapture]],
    num_columns: int,
    column: Callable[[int], torch.Tensor],
) -> list[list[torch.Tensor]]:
    """Back-propagate ``num_columns`` columns from the network output to every use's outputs.

    Args:
        output: the network output f ``[m, *out]`` (in the graph).
        uses: the recorded uses, grouped as the caller likes (e.g. per adapter).
        num_columns: c.
        column: ``column(j)`` -> r_j ``[m, *out]``, the j-th column for every sample.

    Returns:
        the columns g ``[m, c, T, d_g]`` of every use, grouped like ``uses``; one backward
        pass per column.
    """
    tensors = distinct_outputs(u for group in uses for u in group)
    where = {id(t): k for k, t in enumerate(tensors)}
    gs: list[list[torch.Tensor | None]] = [[None] * len(group) for group in uses]
    for j in range(num_columns):
        r = column(j)
        grads = torch.autograd.grad(output, tensors, grad_outputs=r, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(tensors, grads)]
        for gi, group in enumerate(uses):
            for ui, u in enumerate(group):
                gj = u.columns([grads[where[id(t)]] for t in u.outputs])
                if gs[gi][ui] is None:
                    gs[gi][ui] = gj.new_empty((gj.shape[0], num_columns, *gj.shape[1:]))
                gs[gi][ui][:, j] = gj
    return gs  # type: ignore[return-value]


def check_samples_independent(
    output: torch.Tensor, record: ForwardRecord, *, generator_seed: int = 0
) -> None:
    """Verify that every recorded use holds per-sample quantities on its batch axis.

    One backward pass of a random column that is nonzero for sample 0 only: at every
    recorded output, the gradient must vanish exactly at the other samples.  It does not
    when a layer's input has no batch axis — a positional embedding on ``torch.arange(T)``,
    which a shape check cannot tell from a batch when T = m — or when the model combines
    samples before the layer; per-sample statistics of such a layer would be silently
    wrong, so this raises.  Cost: one backward pass to the recorded outputs.  Skipped for
    a batch of one sample.

    Raises:
        ShapeError: naming the first layer whose output gradient mixes samples.
    """
    m = output.shape[0] if output.ndim else 0
    if m < 2:
        return
    tensors, owners = [], []
    seen: set[int] = set()
    for ad, uses in zip(record.adapters, record.uses):
        for u in uses:
            for t in u.outputs:
                if id(t) not in seen and t.requires_grad:
                    seen.add(id(t))
                    tensors.append(t)
                    owners.append((ad, u.batch_dim))
    if not tensors:
        return
    gen = torch.Generator().manual_seed(generator_seed)
    r = torch.zeros_like(output)
    r[0] = torch.randn(output.shape[1:], generator=gen, dtype=torch.float64).to(dtype=output.dtype, device=output.device)
    grads = torch.autograd.grad(output, tensors, grad_outputs=r, retain_graph=True, allow_unused=True)
    for (ad, bd), gr in zip(owners, grads):
        if gr is None:
            continue
        g = gr.movedim(bd, 0) if bd else gr
        # a non-finite value (NaN·0 from a non-finite batch) proves nothing either way: the
        # non-finite statistics are the approximator's business, not a sharing error
        if g.shape[0] != m or bool((g[1:].ne(0) & torch.isfinite(g[1:])).any()):
            raise ShapeError(
                f"{ad._label()}: a backward pass from sample 0 reaches other samples at its output (axis {bd}), so its "
                "statistics would not be per sample.  Its input has no batch axis — e.g. a positional embedding on "
                "torch.arange(T): give it the batch axis, pos(torch.arange(T).expand(m, T)) — or the model combines "
                "samples before it"
            )
