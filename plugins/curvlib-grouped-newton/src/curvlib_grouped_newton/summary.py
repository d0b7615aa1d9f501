"""Summaries of the derivatives of the loss over a partition (seed 004 §3, §4.1, appendix A).

With a direction u ``[p]`` (curvlib's flat order), groups g_1 … g_S and u_s = u on g_s,
zero elsewhere (the columns of U = R₀ᵀ, :mod:`curvlib_grouped_newton.coarse`):

    ḡ_s  = u_sᵀ ∇L                    ``[S]``     order 1
    H̄_st = u_sᵀ ∇²L u_t = ∇²L[u_s, u_t]   ``[S, S]``  order 2, H̄ = UᵀHU        (§4.1, (1))
    D̄_s  = ∇³L[u_s, u_s, u_s]         ``[S]``     order 3, the diagonal used in §4.2

all computed exactly, without forming H, by the recursion of appendix A (Pearlmutter's
trick applied repeatedly): with the gradient kept in the graph,

    q_s(θ) = ∇L(θ)ᵀu_s,   ∇q_s = H u_s,   c_s(θ) = (H(θ)u_s)ᵀu_s,   ∇c_s ᵀu_s = D̄_s,

so row s of H̄ is R₀(H u_s) and D̄_s one more backward pass.  Cost: one forward pass, one
backward pass with ``create_graph``, then per group one Hessian-vector product (double
backward; with ``create_graph`` when D̄ is wanted) and, for D̄, one third-order backward
pass: S + S products, as counted in §4.1 / Table 1.

The loss is the user's ``loss_fn(model(X), y)`` (for ``reduction="mean"`` this is the
function curvlib's ``hessian`` curvature differentiates, so H̄ equals
``exact_coarse_operator(F_hessian, basis, 0)``; with ``"sum"`` everything here is of the
summed loss).  curvlib's ``hessian`` curvature provides the layout: the adapted layers, the
flat vector and its conversions, the checks of the loss and the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import curvlib
from curvlib.coarse import CoarseBasis, CoarseContext, Partition
from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError

from curvlib_grouped_newton.coarse import GroupedDirectionCoarseSpace, GroupedDirectionOptions
from curvlib_grouped_newton.partition import GroupsSpec, resolve_partition

__all__ = ["GroupedSummary", "directional_derivatives", "grouped_summary", "hessian_layout", "split_batch"]


@dataclass(frozen=True)
class GroupedSummary:
    """The derivatives of L summarized over S groups along u (module docstring).

    Attributes:
        loss: L at θ (0-d, detached).
        g_bar: ḡ ``[S]``.
        H_bar: H̄ = UᵀHU ``[S, S]`` (symmetrized).
        D_bar: D̄ ``[S]``, or ``None`` when not computed.
        basis: the coarse basis R₀ᵀ = U = diag(u_1 … u_S) ``[p, S]``.
        direction: u ``[p]`` (flat curvlib order).
        curvature: the ``hessian`` curvature operator that gave the layout.

    Shapes use the dtype and device of the model's parameters.
    """

    loss: torch.Tensor
    g_bar: torch.Tensor
    H_bar: torch.Tensor
    D_bar: torch.Tensor | None
    basis: CoarseBasis
    direction: torch.Tensor
    curvature: Any

    @property
    def partition(self) -> Partition:
        return self.basis.partition

    @property
    def num_groups(self) -> int:
        return self.basis.N


def split_batch(batch: Any) -> tuple[tuple[torch.Tensor, ...], Any]:
    """``(X, y)`` -> (the model's positional inputs, the target), as ``curvlib.curvature`` reads a batch."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ShapeError(f"expected batch=(X, y) with X a tensor or a tuple of tensors, got {type(batch).__name__}")
    X, y = batch
    return (tuple(X) if isinstance(X, (tuple, list)) else (X,)), y


def hessian_layout(model: nn.Module, loss_fn: nn.Module, batch: Any, *, registry: Any = None) -> Any:
    """curvlib's ``hessian`` curvature of ``model`` on ``batch``: the adapted layers, the flat
    vector (``params()``, ``params_to_vector``, ``vector_to_params``) and exact products H·v."""
    return curvlib.curvature("hessian", model, loss_fn, batch, registry=registry)


def _zeros_for_none(tensors: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if t is None else t for t, p in zip(tensors, params)]


def directional_derivatives(
    objective: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    params_to_vector: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    make_basis: Callable[[torch.Tensor], CoarseBasis],
    *,
    third_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, CoarseBasis]:
    """ḡ, H̄ and D̄ of ``objective`` along the columns of a coarse basis (appendix A recursion).

    Args:
        objective: ``() -> L`` (a scalar in the graph of ``params``).
        params: the parameters θ (as tensors shaped like their module's).
        params_to_vector: tensors shaped like ``params`` -> the flat vector ``[p]``
            (differentiable: it is applied to tensors in the graph).
        make_basis: ∇L ``[p]`` (detached) -> the coarse basis U ``[p, S]``, one column per group.
        third_order: compute D̄ (the Hessian-vector products then keep their graph).

    Returns:
        ``(L, ∇L [p], ḡ [S], H̄ [S, S], D̄ [S] or None, basis)``, all detached.
    """
    with torch.enable_grad():
        L = objective()
        if not isinstance(L, torch.Tensor) or L.ndim != 0:
            raise ShapeError(f"grouped Newton: the loss must be a scalar tensor, got {getattr(L, 'shape', type(L))}")
        grads = _zeros_for_none(torch.autograd.grad(L, params, create_graph=True, allow_unused=True), params)
        g = params_to_vector(grads)  # [p], in the graph
        basis = make_basis(g.detach())
        for V in basis.columns:
            if V.shape[1] != 1:
                raise ShapeError(f"grouped Newton: expected one column per group, got a group with {V.shape[1]}")
        S = basis.N
        g_bar = basis.restrict(g.detach())
        H_bar = g.new_zeros(S, S)
        D_bar = g.new_zeros(S) if third_order else None
        e = g.new_zeros(S)
        for s in range(S):
            if not bool(basis.columns[s].abs().max() > 0):
                continue  # u_s = 0: a zero row of H̄, D̄_s = 0
            e.zero_()
            e[s] = 1
            u_s = basis.prolong(e)  # [p]: u on group s, zero elsewhere
            q = (g * u_s).sum()  # q_s = ∇Lᵀu_s
            if not q.requires_grad:
                continue  # L is linear along u_s: H u_s = 0, D̄_s = 0
            hv = _zeros_for_none(
                torch.autograd.grad(q, params, create_graph=third_order, retain_graph=True, allow_unused=True), params
            )
            hv = params_to_vector(hv)  # H u_s [p]
            H_bar[s] = basis.restrict(hv.detach())
            if third_order:
                c = (hv * u_s).sum()  # c_s = u_sᵀ H u_s
                if c.requires_grad:
                    d3 = _zeros_for_none(torch.autograd.grad(c, params, retain_graph=True, allow_unused=True), params)
                    D_bar[s] = (params_to_vector(d3).detach() * u_s).sum()  # ∇c_sᵀu_s = ∇³L[u_s, u_s, u_s]
    H_bar = 0.5 * (H_bar + H_bar.T)
    return L.detach(), g.detach(), g_bar, H_bar, D_bar, basis


def _as_flat(direction: Any, curvature: Any) -> torch.Tensor:
    if isinstance(direction, (list, tuple)):
        return curvature.params_to_vector([t.detach() for t in direction])
    if not isinstance(direction, torch.Tensor) or direction.shape != (curvature.p,):
        raise ShapeError(f"grouped Newton: direction must be a flat vector [{curvature.p}] or tensors shaped like "
                         f"the parameters, got {type(direction).__name__} {list(getattr(direction, 'shape', []))}")
    if direction.dtype != curvature.dtype or direction.device != curvature.device:
        raise DTypeDeviceError(f"grouped Newton: the model is {curvature.dtype} on {curvature.device}, the direction "
                               f"is {direction.dtype} on {direction.device}")
    return direction.detach()


def grouped_summary(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: Any,
    *,
    direction: torch.Tensor | Sequence[torch.Tensor] | None = None,
    groups: GroupsSpec | Partition = None,
    third_order: bool = True,
    curvature: Any = None,
    registry: Any = None,
) -> GroupedSummary:
    """ḡ, H̄ = UᵀHU and D̄ of ``loss_fn(model(X), y)`` on ``batch`` (module docstring).

    Example::

        s = grouped_summary(model, nn.MSELoss(), (X, y))          # u = ∇L, one group per tensor
        s.H_bar                                                     # [S, S]
        s.D_bar                                                     # [S]

    Args:
        model: the network (its Linear/Conv2d/ConvTranspose2d modules, or those of layer
            plugins, carry the parameters; see :func:`curvlib.curvature`).
        loss_fn: a loss module curvlib supports.
        batch: ``(X, y)``.
        direction: u, flat ``[p]`` in curvlib order or tensors shaped like
            ``curvature.params()``; ``None``: the gradient ∇L of this batch.
        groups: the partition (:func:`~curvlib_grouped_newton.partition.resolve_partition`;
            default one group per parameter tensor).
        third_order: compute D̄ too.
        curvature: a ``hessian`` curvature operator of the same model to take the layout
            from (default: built on ``batch``).
        registry: the plugin registry used to build the curvature.

    Raises:
        ConfigError: the model has trainable parameters no layer adapter covers (the
            method would leave them untouched), or a bad ``groups``.
    """
    F = curvature if curvature is not None else hessian_layout(model, loss_fn, batch, registry=registry)
    if F.excluded:
        raise ConfigError(
            "grouped Newton: the parameters " + ", ".join(F.excluded) + " are not covered by a layer adapter; "
            "freeze them (requires_grad=False) or register a layer plugin for their modules"
        )
    part = resolve_partition(groups, F)
    space = GroupedDirectionCoarseSpace(GroupedDirectionOptions(direction="input"))
    fixed = None if direction is None else _as_flat(direction, F)
    inputs, target = split_batch(batch)

    def make_basis(grad: torch.Tensor) -> CoarseBasis:
        u = grad if fixed is None else fixed
        return space.basis(CoarseContext(F, 0.0, None, part, u=u))

    loss, _, g_bar, H_bar, D_bar, basis = directional_derivatives(
        lambda: loss_fn(model(*inputs), target), F.params(), F.params_to_vector, make_basis, third_order=third_order
    )
    u = basis.prolong(torch.ones(basis.N, dtype=basis.dtype, device=basis.device))
    return GroupedSummary(loss, g_bar, H_bar, D_bar, basis, u, F)
