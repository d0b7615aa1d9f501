"""Interoperability with torch's parameter layout (what curvlinops, BackPACK and ASDL use).

curvlib's flat vector stacks, layer by layer, the column-major vec of W̄ = [W, b]
(DESIGN.md §1); torch's flat vector concatenates ``p.flatten()`` (row-major) of each
parameter in a list order — by default the order of the operator's own ``params()``.  The
two are related by a permutation P (no arithmetic), returned as an operator:

    P = curvlib.curvatures.interop.torch_order(F)          # curvlib flat -> torch flat
    F_torch = curvlib.curvatures.interop.in_torch_order(F)  # P F Pᵀ, lazy
    F_torch @ torch.cat([g.flatten() for g in grads])     # as curvlinops would compute it

:func:`weight_bias_blocks` and :func:`separate_weight_and_bias` give the weight / bias view of
a layer's block and of its KFAC factors (curvlinops' ``separate_weight_and_bias=True``): with
ā = [a; 1], A = E[ā āᵀ] = [[A_aa, A_a1], [A_1a, A_11]], the weight block is A_aa ⊗ G and
the bias block A_11 · G (A_11 = 1 for KFAC-expand of a Linear layer); their coupling
A_a1 ⊗ G is what the separate view drops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from curvlib.capture.layout import BlocksLayout, LayerBlock
from curvlib.errors import ConfigError, ShapeError
from curvlib.linalg import LinearOperator, PermutationOperator, ProductOperator, SubmatrixOperator

__all__ = ["in_torch_order", "separate_weight_and_bias", "torch_order", "weight_bias_blocks", "weight_bias_slices"]


def torch_order(op: LinearOperator, params: Sequence[torch.Tensor] | None = None) -> PermutationOperator:
    """P ``[p, p]`` mapping ``op``'s flat curvlib vector to torch's flat order.

    Args:
        op: an operator over a model's parameters (it has a list ``layout``: a curvature
            operator, an approximation, an inverse, a preconditioner).
        params: the torch order: the same parameters as ``op.params()`` (each once), in any
            order; default ``op.layout``'s order.

    Returns:
        P with ``P @ x_curvlib = torch.cat([t.flatten() for t in tensors])`` where ``tensors``
        is ``x_curvlib`` in list form, reordered like ``params``; ``P.T`` maps back.

    Raises:
        ConfigError: ``op`` has no list layout, or ``params`` is not a reordering of its parameters.
    """
    layout = op.layout
    if not isinstance(layout, BlocksLayout):
        raise ConfigError(f"torch_order: {type(op).__name__} is not an operator over a model's parameters "
                          "(its layout is not a BlocksLayout)")
    p = op.shape[1]
    # the layout only moves entries, so pushing the indices through it gives the permutation
    # (float64 holds every index up to 2⁵³ exactly)
    pieces = layout.to_tensors(torch.arange(p, dtype=torch.float64, device=op.device), "torch_order")
    if params is not None:
        own_params = layout.params()
        if len(params) != len(own_params):
            raise ConfigError(f"torch_order: expected the operator's {len(pieces)} parameters in some order, "
                              f"got {len(params)}")
        where = {id(q): k for k, q in enumerate(own_params)}
        try:
            pieces = [pieces[where[id(q)]] for q in params]
        except KeyError:
            raise ConfigError("torch_order: params contains a tensor the operator does not cover") from None
        if len({id(q) for q in params}) != len(params):
            raise ConfigError("torch_order: params lists a tensor twice")
    index = torch.cat([t.flatten() for t in pieces]).round().long()
    return PermutationOperator(index, dtype=op.dtype, device=op.device)


def in_torch_order(op: LinearOperator, params: Sequence[torch.Tensor] | None = None) -> LinearOperator:
    """P·op·Pᵀ: ``op`` acting on vectors in torch's flat order (lazy; see :func:`torch_order`)."""
    P = torch_order(op, params)
    return ProductOperator(ProductOperator(P, op), P.adjoint())


def weight_bias_slices(layer: LayerBlock) -> tuple[slice, slice]:
    """The rows of W and of b inside layer block ``layer`` ``[p_i]`` (relative to the block).

    vec stacks the columns of W̄ = [W, b] ``[d_g, d_a]``, so the first (d_a − 1)·d_g entries
    are vec(W) and the last d_g are b.

    Raises:
        ShapeError: the layer has no bias column.
    """
    if not layer.has_bias:
        raise ShapeError(f"layer {layer.name!r} ({layer.kind}) has no bias column in W̄")
    w = (layer.a_dim - 1) * layer.g_dim
    return slice(0, w), slice(w, layer.p_i)


def weight_bias_blocks(op: LinearOperator, layer: LayerBlock) -> dict[str, LinearOperator]:
    """The weight and bias diagonal blocks of ``op`` for one layer, as operators.

    Args:
        op: an operator over the layers' flat vector (``layer`` is one of ``op``'s layers).
        layer: the layer (``F.layers[i]``).

    Returns:
        ``{"weight": [p_W, p_W], "bias": [d_g, d_g]}``, p_W = (d_a − 1)·d_g; vectors in vec(W)
        (column-major) and b order.
    """
    ws, bs = weight_bias_slices(layer)
    base = layer.slice.start
    shift = lambda s: slice(base + s.start, base + s.stop)  # noqa: E731 - relative -> flat rows
    return {"weight": SubmatrixOperator(op, shift(ws), shift(ws)), "bias": SubmatrixOperator(op, shift(bs), shift(bs))}


def separate_weight_and_bias(layer: LayerBlock, A: torch.Tensor, G: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """KFAC factors of the weight and of the bias separately (module docstring).

    Args:
        layer: the layer whose factors these are (must have a bias column).
        A: ``[d_a, d_a]`` the activation factor of ā = [a; 1].
        G: ``[d_g, d_g]``.

    Returns:
        ``{"weight": (A_aa [d_a−1, d_a−1], G), "bias": (A_11 [1, 1], G)}``.
    """
    weight_bias_slices(layer)  # checks the bias column
    if A.shape != (layer.a_dim, layer.a_dim) or G.shape != (layer.g_dim, layer.g_dim):
        raise ShapeError(f"separate_weight_and_bias: expected A [{layer.a_dim}, {layer.a_dim}] and G "
                         f"[{layer.g_dim}, {layer.g_dim}] for layer {layer.name!r}, got {list(A.shape)} and {list(G.shape)}")
    d = layer.a_dim - 1
    return {"weight": (A[:d, :d], G), "bias": (A[d:, d:], G)}
