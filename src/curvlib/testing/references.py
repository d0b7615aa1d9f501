"""Dense float64 ground truth, computed another way than curvlib computes it (DESIGN.md §6).

Nothing here calls the code under test: per-sample gradients and Jacobians come from
``torch.func`` (``functional_call`` + ``vmap`` + ``grad``/``jacrev``), Hessians from
``torch.func.hessian``, Kronecker products from ``torch.kron``, the rearrangement Z of
Def. 3.3 from explicit index loops, and the mapping between a module's ``weight``/``bias``
and curvlib's flat vector is written out again from DESIGN.md §1:

    W̄ = [W, b] ``[g_dim, a_dim]``,   the layer's flat vector is vec(W̄) (columns stacked),
    W = weight ``[d_out, d_in]`` (Linear), weight.reshape(c_out, -1) (Conv2d),
    W = weight.transpose(0, 1).reshape(c_out, -1) (ConvTranspose2d, stored [c_in, c_out, k_h, k_w]).

The flat vector of a model is the concatenation of the layers' vec(W̄) in the order of
``op.layers`` (any object with a ``layers`` attribute of ``LayerBlock``-like entries:
``name``, ``module``, ``has_bias``, ``a_dim``, ``g_dim``, ``slice``).

Sections:

- mapping: :func:`vec`, :func:`unvec`, :func:`weight_to_matrix`, :func:`matrix_to_weight`,
  :func:`trainable_names`, :func:`flatten`, :func:`unflatten`, :func:`current_vector`;
- per-sample quantities: :func:`per_sample_grads_dict`, :func:`per_sample_grads`,
  :func:`per_sample_jacobians`, :func:`per_sample_output_hessians`, :func:`loss_gradient`;
- dense curvature matrices in curvlib's flat order: :func:`dense_empirical_fisher` (2.85),
  :func:`dense_fisher` (2.84, at given sampled targets), :func:`dense_ggn` (2.89),
  :func:`dense_hessian`; :func:`k_factor` (the per-sample loss convention of
  :mod:`curvlib.curvatures.losses`);
- dense curvature matrices in torch's parameter layout, over an explicit list of parameter
  tensors (each once, tied or not; the concatenation of p.reshape(-1) in list order; inputs
  a tensor or a tuple of tensors): :func:`dense_ggn_params`,
  :func:`dense_empirical_fisher_params`, :func:`dense_fisher_params`,
  :func:`dense_hessian_params`, with :func:`per_sample_grads_params`,
  :func:`per_sample_jacobians_params`, :func:`flatten_params`, :func:`unflatten_params`;
- Kronecker algebra: :func:`kron_sum_dense`, :func:`rearrange_dense` (Z of Def. 3.3 by
  loops), :func:`position_pairs` (the ∞-norm band on N-D positions by coordinate loops),
  :func:`dense_block` (F_ii from :class:`~curvlib.curvatures.statistics.LayerStatistics`,
  every use, geometry and orientation, (3.18), (3.28)), :func:`dense_kfac_factors`
  ((3.19), (3.29), expand/reduce), :func:`dense_tikhonov_solve`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlib.curvatures.objective import Objective

__all__ = [
    "DT",
    "current_vector",
    "dense_block",
    "dense_empirical_fisher",
    "dense_empirical_fisher_params",
    "dense_fisher",
    "dense_fisher_params",
    "dense_ggn",
    "dense_ggn_params",
    "dense_hessian",
    "dense_hessian_params",
    "dense_kfac_factors",
    "dense_tikhonov_solve",
    "dense_two_level_residual",
    "flatten",
    "flatten_params",
    "k_factor",
    "kron_sum_dense",
    "loss_gradient",
    "matrix_to_weight",
    "per_sample_grads",
    "per_sample_grads_dict",
    "per_sample_grads_params",
    "per_sample_jacobians",
    "per_sample_jacobians_params",
    "per_sample_output_hessians",
    "position_pairs",
    "rearrange_dense",
    "trainable_names",
    "unflatten",
    "unflatten_params",
    "unvec",
    "vec",
    "weight_to_matrix",
]

DT = torch.float64


# --------------------------------------------------------------------------- mapping
def vec(X: torch.Tensor) -> torch.Tensor:
    """Column-major vec (Def. 3.2): ``[..., r, c]`` -> ``[..., r·c]``, entry i + r·j = X[i, j]."""
    return X.mT.reshape(*X.shape[:-2], X.shape[-1] * X.shape[-2])


def unvec(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`vec`: ``[..., rows·cols]`` -> ``[..., rows, cols]``."""
    return x.reshape(*x.shape[:-1], cols, rows).mT


def weight_to_matrix(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A batch of weights ``[B, *weight.shape]`` -> W ``[B, g_dim, in_features]`` (one group)."""
    B = w.shape[0]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return w.transpose(1, 2).reshape(B, w.shape[2], -1)
    return w.reshape(B, w.shape[1], -1)


def matrix_to_weight(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """W ``[g_dim, in_features]`` -> a tensor shaped like ``module.weight`` (one group)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        c_in, c_out, *k = module.weight.shape
        return W.reshape(c_out, c_in, *k).transpose(0, 1)
    return W.reshape(module.weight.shape)


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _block_parts(L: Any) -> tuple[str, list[tuple[str, slice | None]]]:
    """The qualified parameter names (and row slices) of a block, from DESIGN.md §1 written
    out per module type: ``(prefix, [(name, rows), ...])``.  Groups of a grouped convolution
    are the blocks ``"<module>:group<j>"``."""
    mod = L.module
    mname, _, group = L.name.partition(":group")
    pre = f"{mname}." if mname else ""
    if isinstance(mod, _NORMS):
        return pre, [(n, None) for n in ("weight", "bias") if getattr(mod, n, None) is not None and getattr(mod, n).requires_grad]
    if isinstance(mod, nn.Embedding):
        return pre, [("weight", None)]
    if isinstance(mod, nn.MultiheadAttention):
        return pre, [("in_proj_weight", None)] + ([("in_proj_bias", None)] if L.has_bias else [])
    if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1:
        j, G = int(group), mod.groups
        c_out, c_in = mod.out_channels // G, mod.in_channels // G
        rows_w = slice(j * c_in, (j + 1) * c_in) if mod.transposed else slice(j * c_out, (j + 1) * c_out)
        return pre, [("weight", rows_w)] + ([("bias", slice(j * c_out, (j + 1) * c_out))] if L.has_bias else [])
    return pre, [("weight", None)] + ([("bias", None)] if L.has_bias else [])


def _block_matrix(L: Any, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """W̄ ``[B, g_dim, a_dim]`` of one block from ``{qualified name: [B, *shape]}``."""
    pre, parts = _block_parts(L)
    T = [tensors[pre + n] if sl is None else tensors[pre + n][:, sl] for n, sl in parts]
    B = T[0].shape[0]
    mod = L.module
    if isinstance(mod, _NORMS):  # W̄ = [γ; β], one column
        return torch.cat([t.reshape(B, -1) for t in T], dim=1).unsqueeze(-1)
    if isinstance(mod, nn.Embedding):  # W̄ = weightᵀ
        return T[0].transpose(1, 2)
    W = weight_to_matrix(mod, T[0])
    if len(T) > 1:
        W = torch.cat([W, T[1].unsqueeze(-1)], dim=-1)
    return W


def trainable_names(op: Any) -> list[str]:
    """Qualified parameter names of ``op.layers`` in flat order (each once)."""
    names: list[str] = []
    for L in op.layers:
        pre, parts = _block_parts(L)
        for n, _ in parts:
            if pre + n not in names:
                names.append(pre + n)
    return names


def flatten(op: Any, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``{qualified name: [B, *shape]}`` -> ``[B, p]`` in curvlib's flat order."""
    cols = []
    for L in op.layers:
        W = _block_matrix(L, tensors)
        cols.append(W.transpose(1, 2).reshape(W.shape[0], -1))
    return torch.cat(cols, dim=1)


def unflatten(op: Any, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """A flat vector ``[p]`` -> ``{qualified name: tensor shaped like the parameter}``."""
    params = dict(op_model_params(op))
    out: dict[str, torch.Tensor] = {}
    for L in op.layers:
        Wbar = v[L.slice].reshape(L.a_dim, L.g_dim).T
        pre, parts = _block_parts(L)
        mod = L.module
        if isinstance(mod, _NORMS):
            k = 0
            for n, _ in parts:
                size = params[pre + n].numel()
                out[pre + n] = Wbar[k : k + size, 0].reshape(params[pre + n].shape)
                k += size
            continue
        if isinstance(mod, nn.Embedding):
            out[pre + "weight"] = Wbar.T
            continue
        (wname, wsl), *rest = parts
        full_w = params[pre + wname]
        n_in = L.a_dim - int(bool(rest))
        if wsl is None:
            out[pre + wname] = Wbar[:, :n_in].reshape(full_w.shape) if isinstance(mod, nn.MultiheadAttention) else matrix_to_weight(mod, Wbar[:, :n_in])
        else:
            piece_shape = full_w[wsl].shape
            w = out.setdefault(pre + wname, torch.zeros_like(full_w, dtype=v.dtype))
            if mod.transposed:
                c_in_g, c_out_g, *k = piece_shape
                w[wsl] = Wbar[:, :n_in].reshape(c_out_g, c_in_g, *k).transpose(0, 1)
            else:
                w[wsl] = Wbar[:, :n_in].reshape(piece_shape)
        if rest:
            (bname, bsl), = rest
            if bsl is None:
                out[pre + bname] = Wbar[:, -1]
            else:
                b = out.setdefault(pre + bname, torch.zeros_like(params[pre + bname], dtype=v.dtype))
                b[bsl] = Wbar[:, -1]
    return out


def op_model_params(op: Any) -> dict[str, torch.Tensor]:
    """``{qualified name: parameter}`` of the model the blocks of ``op`` belong to (from the
    blocks' modules; names as :func:`trainable_names` writes them)."""
    out = {}
    for L in op.layers:
        pre, parts = _block_parts(L)
        for n, _ in parts:
            out[pre + n] = getattr(L.module, n)
    return out


def current_vector(op: Any, model: nn.Module) -> torch.Tensor:
    """The model's current parameters as the flat vector ``[p]``."""
    params = dict(model.named_parameters())
    return flatten(op, {n: params[n].detach().unsqueeze(0) for n in trainable_names(op)})[0]


# --------------------------------------------------------------------------- per-sample quantities
def _split(model: nn.Module, op: Any):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    sub = {n: params[n] for n in trainable_names(op)}
    return params, buffers, sub


def per_sample_grads_dict(model: nn.Module, op: Any, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> dict:
    """∇_θ ℓ_b(y_b) of every sample, ℓ_b = ``loss_fn`` on the one-sample batch (b):
    ``{qualified name: [m, *shape]}`` (only the parameters of ``op.layers``)."""
    params, buffers, sub = _split(model, op)

    def ell(s, x, y):
        out = functional_call(model, {**params, **s, **buffers}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(ell), in_dims=(None, 0, 0))(sub, X, Y)


def per_sample_grads(model: nn.Module, op: Any, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """∇_θ ℓ_b(y_b) of every sample in curvlib's flat order: ``[m, p]``."""
    return flatten(op, per_sample_grads_dict(model, op, loss_fn, X, Y))


def per_sample_jacobians(model: nn.Module, op: Any, X: torch.Tensor) -> torch.Tensor:
    """J_b = ∂f_b/∂θ of the flattened output f_b ``[c]``: ``[m, c, p]``."""
    params, buffers, sub = _split(model, op)

    def f(s, x):
        return functional_call(model, {**params, **s, **buffers}, (x.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(sub, X)
    m, c = X.shape[0], next(iter(jac.values())).shape[1]
    flat = flatten(op, {n: t.reshape(m * c, *t.shape[2:]) for n, t in jac.items()})
    return flat.reshape(m, c, -1)


def per_sample_output_hessians(
    loss_fn: nn.Module, outputs: torch.Tensor, Y: torch.Tensor, link: Callable | None = None
) -> torch.Tensor:
    """∇²_f ℓ_b at f_b (composed with ``link`` if given, e.g. a sigmoid before ``nn.BCELoss``):
    ``[m, c, c]`` for outputs ``[m, *out]`` with c = prod(out).

    ℓ_b is ``loss_fn`` on the one-sample batch b, the per-sample loss of every supported loss
    (for K-dimensional cross-entropy, logits ``[m, C, *d]`` and targets ``[m, *d]``, "mean"
    averages over the D positions of the sample: ℓ_b = (1/D) Σ_pos CE).
    """
    shape = outputs.shape[1:]

    def ell(f, y):
        z = f.reshape(1, *shape)
        if link is not None:
            z = link(z)
        return loss_fn(z, y.unsqueeze(0))

    return vmap(hessian(ell))(outputs.detach().reshape(outputs.shape[0], -1), Y)


def loss_gradient(model: nn.Module, op: Any, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """∇_θ of ``loss_fn(model(X), Y)`` (the batch loss as the user computes it): ``[p]``."""
    params, buffers, _ = _split(model, op)

    def L(v):
        return loss_fn(functional_call(model, {**params, **unflatten(op, v), **buffers}, (X,)), Y)

    return grad(L)(current_vector(op, model))


def k_factor(loss_fn: nn.Module, c: int | Sequence[int]) -> float:
    """k with ℓ_b = k·NLL_b, the per-sample loss convention of :mod:`curvlib.curvatures.losses`:
    an :class:`~curvlib.Objective` 1; cross-entropy 1 (reduction "sum") or 1/D ("mean", D = prod(d) positions of logits
    ``[m, C, *d]``); MSE 2 ("sum") or 2/c ("mean"); BCE 1 ("sum") or 1/c ("mean").

    Args:
        c: the per-sample output shape (``(C, *d)`` for cross-entropy), or the number of
            outputs per sample c = prod(out); an int means one position (D = 1) for
            cross-entropy.
    """
    shape = (int(c),) if isinstance(c, int) else tuple(int(n) for n in c)
    if isinstance(loss_fn, Objective):  # no likelihood to rescale: ℓ_b as the user defines it
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        positions = math.prod(shape[1:])
        return 1.0 if loss_fn.reduction == "sum" else 1.0 / positions
    outputs = math.prod(shape)
    if isinstance(loss_fn, nn.MSELoss):
        return 2.0 if loss_fn.reduction == "sum" else 2.0 / outputs
    return 1.0 if loss_fn.reduction == "sum" else 1.0 / outputs


def _output_shape(model: nn.Module, X: torch.Tensor) -> tuple[int, ...]:
    """The per-sample output shape ``out`` of ``model`` (outputs ``[m, *out]``)."""
    with torch.no_grad():
        return tuple(model(X[:1]).shape[1:])


# --------------------------------------------------------------------------- dense curvature
def dense_empirical_fisher(model: nn.Module, op: Any, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """(1/m) Σ_b (1/k) ∇ℓ_b(y_b) ∇ℓ_b(y_b)ᵀ ``[p, p]`` (2.85), k = :func:`k_factor`."""
    k = k_factor(loss_fn, _output_shape(model, X))
    G = per_sample_grads(model, op, loss_fn, X, Y)
    return G.T @ G / (X.shape[0] * k)


def dense_fisher(
    model: nn.Module, op: Any, loss_fn: nn.Module, X: torch.Tensor, sampled_targets: torch.Tensor
) -> torch.Tensor:
    """The Monte Carlo Fisher (2.84) at given targets: (1/(m·S)) Σ_{b,s} (1/k) ∇ℓ_b(ŷ_{b,s}) ∇ℓ_b(ŷ_{b,s})ᵀ.

    Args:
        sampled_targets: ``[m, S, ...]``, draw s of sample b at ``[b, s]`` (a ``fisher``
            operator keeps its draws in ``sampled_targets``).
    """
    m, S = sampled_targets.shape[:2]
    k = k_factor(loss_fn, _output_shape(model, X))
    out = 0
    for s in range(S):
        G = per_sample_grads(model, op, loss_fn, X, sampled_targets[:, s])
        out = out + G.T @ G
    return out / (m * S * k)


def dense_ggn(
    model: nn.Module, op: Any, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor, link: Callable | None = None
) -> torch.Tensor:
    """(1/m) Σ_b J_bᵀ ∇²_f ℓ_b J_b ``[p, p]`` (2.89).

    With ``link`` (a loss on probabilities, ``nn.BCELoss`` after ``nn.Sigmoid``) pass the
    model *without* its final link as ``model``: the GGN is taken w.r.t. the logits.
    """
    J = per_sample_jacobians(model, op, X)
    with torch.no_grad():
        out = model(X)
    H = per_sample_output_hessians(loss_fn, out, Y, link=link)
    return torch.einsum("bcp,bcd,bdq->pq", J, H, J) / X.shape[0]


def dense_hessian(model: nn.Module, op: Any, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """∇²_θ (1/m) Σ_b ℓ_b w.r.t. the flat vector ``[p, p]`` (the "mean" loss; a "sum" loss divided by m)."""
    params, buffers, _ = _split(model, op)
    m = X.shape[0]

    def L(v):
        out = functional_call(model, {**params, **unflatten(op, v), **buffers}, (X,))
        val = loss_fn(out, Y)
        return val if loss_fn.reduction == "mean" else val / m

    return hessian(L)(current_vector(op, model))


# --------------------------------------------------------------------------- torch's parameter layout
# Dense curvature over an explicit list of parameter tensors (objects of ``model.parameters()``),
# flattened as torch lays them out: the concatenation of p.reshape(-1) in list order.  The listed
# tensors are substituted by identity under every name they have (a tied weight is one object
# with several names), so each use of a tied weight contributes to its one slice.  Derivatives
# are reverse-mode only: torch's embedding backward treats an ``nn.Embedding``'s padding row as
# a constant, which forward-mode AD (jacfwd) does not; reverse-over-reverse matches autograd.
# Attention runs on the math backend of ``scaled_dot_product_attention`` (composite ops): the
# fused CPU kernel has no double backward and no vmap batching rule.
Inputs = torch.Tensor | Sequence[torch.Tensor]


def _as_inputs(X: Inputs) -> tuple[torch.Tensor, ...]:
    return tuple(X) if isinstance(X, (tuple, list)) else (X,)


def flatten_params(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Tensors shaped like a parameter list -> torch's flat layout ``[p]`` (p.reshape(-1) concatenated)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_params(v: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``[p]`` in torch's flat layout -> tensors shaped like ``params``."""
    sizes = [q.numel() for q in params]
    if v.shape != (sum(sizes),):
        raise ValueError(f"unflatten_params: expected a vector [{sum(sizes)}], got {list(v.shape)}")
    return [t.reshape(q.shape) for t, q in zip(v.split(sizes), params)]


def _functional_model(model: nn.Module, params: Sequence[torch.Tensor]) -> Callable:
    """``call(ps, inputs)``: ``model(*inputs)`` with ``params[i]`` replaced by ``ps[i]`` under
    every name it has; the other parameters (detached) and the buffers as they are.

    Raises:
        ValueError: a tensor of ``params`` is not a parameter of ``model``, or is listed twice.
    """
    named = list(model.named_parameters(remove_duplicate=False))
    owned = {id(p) for _, p in named}
    index: dict[int, int] = {}
    for i, q in enumerate(params):
        if id(q) not in owned:
            raise ValueError(f"params[{i}] (shape {list(q.shape)}) is not a parameter of {type(model).__name__}")
        if id(q) in index:
            raise ValueError(f"params[{i}] is params[{index[id(q)]}] again: list each parameter (tied or not) once")
        index[id(q)] = i
    fixed = {n: p.detach() for n, p in named if id(p) not in index}
    substituted = [(n, index[id(p)]) for n, p in named if id(p) in index]
    buffers = dict(model.named_buffers(remove_duplicate=False))

    def call(ps: Sequence[torch.Tensor], inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        state = {**fixed, **{n: ps[i] for n, i in substituted}, **buffers}
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(model, state, inputs, tie_weights=False, strict=True)

    return call


def _detached(params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(q.detach() for q in params)


def _per_sample_loss(model: nn.Module, params: Sequence[torch.Tensor], loss_fn: nn.Module) -> Callable:
    """``ell(ps, xs, y)`` = ℓ_b: ``loss_fn`` on the one-sample batch of the unbatched inputs ``xs``
    and target ``y`` (the per-sample convention of :mod:`curvlib.curvatures.losses`)."""
    call = _functional_model(model, params)

    def ell(ps, xs, y):
        return loss_fn(call(ps, tuple(x.unsqueeze(0) for x in xs)), y.unsqueeze(0))

    return ell


def per_sample_grads_params(
    model: nn.Module, params: Sequence[torch.Tensor], loss_fn: nn.Module, X: Inputs, Y: torch.Tensor
) -> torch.Tensor:
    """∇_θ ℓ_b(y_b) of every sample in torch's flat layout of ``params``: ``[m, p]``.

    ℓ_b = ``loss_fn`` on the one-sample batch b (one sample of every input tensor of ``X``).
    """
    inputs = _as_inputs(X)
    grads = vmap(grad(_per_sample_loss(model, params, loss_fn)), in_dims=(None, 0, 0))(_detached(params), inputs, Y)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)


def per_sample_jacobians_params(model: nn.Module, params: Sequence[torch.Tensor], X: Inputs) -> torch.Tensor:
    """J_b = ∂f_b/∂θ of the flattened output f_b ``[c]`` (c = prod(out) for outputs ``[m, *out]``)
    in torch's flat layout of ``params``: ``[m, c, p]``."""
    call = _functional_model(model, params)
    inputs = _as_inputs(X)

    def f(ps, xs):
        return call(ps, tuple(x.unsqueeze(0) for x in xs)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(_detached(params), inputs)
    return torch.cat([t.reshape(t.shape[0], t.shape[1], -1) for t in jac], dim=2)


def _outputs(model: nn.Module, X: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*_as_inputs(X))


def dense_ggn_params(
    model: nn.Module, params: Sequence[torch.Tensor], loss_fn: nn.Module, X: Inputs, Y: torch.Tensor
) -> torch.Tensor:
    """(1/m) Σ_b J_bᵀ ∇²_f ℓ_b J_b ``[p, p]`` (2.89) in torch's flat layout of ``params``.

    J_b from :func:`per_sample_jacobians_params`, ∇²_f ℓ_b ``[c, c]`` from
    :func:`per_sample_output_hessians` (``torch.func.hessian`` of the one-sample loss).
    """
    J = per_sample_jacobians_params(model, params, X)
    H = per_sample_output_hessians(loss_fn, _outputs(model, X), Y)
    return torch.einsum("bcp,bcd,bdq->pq", J, H, J) / J.shape[0]


def dense_empirical_fisher_params(
    model: nn.Module, params: Sequence[torch.Tensor], loss_fn: nn.Module, X: Inputs, Y: torch.Tensor
) -> torch.Tensor:
    """(1/m) Σ_b (1/k) ∇ℓ_b(y_b) ∇ℓ_b(y_b)ᵀ ``[p, p]`` (2.85) in torch's flat layout of
    ``params``; k = :func:`k_factor` of the per-sample output shape."""
    k = k_factor(loss_fn, tuple(_outputs(model, X).shape[1:]))
    G = per_sample_grads_params(model, params, loss_fn, X, Y)
    return G.T @ G / (G.shape[0] * k)


def dense_fisher_params(
    model: nn.Module, params: Sequence[torch.Tensor], loss_fn: nn.Module, X: Inputs, sampled_targets: torch.Tensor
) -> torch.Tensor:
    """The Monte Carlo Fisher (2.84) at given targets in torch's flat layout of ``params``:
    (1/(m·S)) Σ_{b,s} (1/k) ∇ℓ_b(ŷ_{b,s}) ∇ℓ_b(ŷ_{b,s})ᵀ ``[p, p]``.

    Args:
        sampled_targets: ``[m, S, ...]``, draw s of sample b at ``[b, s]`` (cross-entropy
            ``[m, S, *d]``; a ``fisher`` operator keeps its draws in ``sampled_targets``).
    """
    m, S = sampled_targets.shape[:2]
    k = k_factor(loss_fn, tuple(_outputs(model, X).shape[1:]))
    out = 0
    for s in range(S):
        G = per_sample_grads_params(model, params, loss_fn, X, sampled_targets[:, s])
        out = out + G.T @ G
    return out / (m * S * k)


def dense_hessian_params(
    model: nn.Module, params: Sequence[torch.Tensor], loss_fn: nn.Module, X: Inputs, Y: torch.Tensor
) -> torch.Tensor:
    """∇²_θ (1/m) Σ_b ℓ_b ``[p, p]`` in torch's flat layout of ``params`` (the "mean" loss; a
    "sum" loss divided by m) on the whole batch.

    Row i is e_iᵀ ∇²L, one reverse-over-reverse product (``torch.func.vjp`` of
    ``torch.func.grad``) per basis vector, in a Python loop: under ``vmap`` (``jacrev(jacrev)``,
    ``hessian``) torch 2.13 returns wrong mixed second derivatives of ``F.layer_norm`` (weight ×
    input block, an asymmetric "Hessian").
    """
    call = _functional_model(model, params)
    inputs = _as_inputs(X)
    m = int(Y.shape[0])

    def L(theta):
        val = loss_fn(call(unflatten_params(theta, params), inputs), Y)
        return val if loss_fn.reduction == "mean" else val / m

    theta = flatten_params(_detached(params))
    _, row = vjp(grad(L), theta)
    eye = torch.eye(theta.numel(), dtype=theta.dtype, device=theta.device)
    return torch.stack([row(e)[0] for e in eye])


# --------------------------------------------------------------------------- Kronecker algebra
def kron_sum_dense(terms: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Σ_k A_k ⊗ B_k with ``torch.kron``: A_k ``[d_a, d_a]``, B_k ``[d_b, d_b]`` -> ``[d_a·d_b, d_a·d_b]``."""
    out = None
    for A, B in terms:
        t = torch.kron(A, B)
        out = t if out is None else out + t
    if out is None:
        raise ValueError("kron_sum_dense: expected at least one term")
    return out


def rearrange_dense(M: torch.Tensor, d_a: int, d_b: int) -> torch.Tensor:
    """Z(M) of Def. 3.3 by explicit index loops: ``[d_a·d_b, d_a·d_b]`` -> ``[d_a², d_b²]``.

    M's block (i, j) (rows i·d_b …, columns j·d_b …) is the d_b × d_b matrix M_ij; row
    i + d_a·j of Z(M) is vec(M_ij)ᵀ, so that Z(R ⊗ S) = vec(R) vec(S)ᵀ (Thm 3.14).
    O(d_a² d_b²) Python steps: small matrices only.
    """
    if M.shape != (d_a * d_b, d_a * d_b):
        raise ValueError(f"rearrange_dense: expected M [{d_a * d_b}, {d_a * d_b}], got {list(M.shape)}")
    Z = M.new_zeros(d_a * d_a, d_b * d_b)
    for i in range(d_a):
        for j in range(d_a):
            for k in range(d_b):
                for l in range(d_b):
                    Z[i + d_a * j, k + d_b * l] = M[i * d_b + k, j * d_b + l]
    return Z


def position_pairs(shape: tuple[int, ...], radius: int | None) -> torch.Tensor:
    """0/1 mask ``[T, T]`` of the position pairs with max_j |i_j − i'_j| ≤ radius on the N-D
    grid ``shape`` (row-major, the last axis fastest); all pairs for ``radius=None``.
    Written with explicit coordinate loops (``()`` is one position)."""
    import itertools

    coords = list(itertools.product(*[range(int(n)) for n in shape]))
    T = len(coords)
    mask = torch.zeros(T, T, dtype=DT)
    for t, p in enumerate(coords):
        for u, q in enumerate(coords):
            if radius is None or max((abs(x - y) for x, y in zip(p, q)), default=0) <= radius:
                mask[t, u] = 1.0
    return mask


def _use_vectors(use: Any) -> torch.Tensor:
    """Per (sample, column, position) vectors vec(P(g āᵀ)) of one use, float64 CPU: ``[m, c, T, p]``.

    Untransposed: vec(g āᵀ) = ā ⊗ g; transposed (the use's matrix enters W̄ transposed):
    vec(ā gᵀ) = g ⊗ ā (``torch.kron`` order, column-major vec)."""
    a = use.a.dense().detach().to("cpu", DT)
    g = use.g.detach().to("cpu", DT)
    m, c, T, _ = g.shape
    first, second = (g, a) if use.transposed else (a, g)  # kron(first, second) per (b, c, t)
    rows = []
    for b in range(m):
        for j in range(c):
            for t in range(T):
                f = first[b, j, t] if use.transposed else first[b, t]
                s2 = second[b, t] if use.transposed else second[b, j, t]
                rows.append(torch.kron(f, s2))
    return torch.stack(rows).reshape(m, c, T, -1)


def dense_block(stats: Any, radius: int | None = None) -> torch.Tensor:
    """The sampled layer block from its statistics (float64, CPU), ``[p_i, p_i]``:

        F_ii = scale · Σ_b Σ_c Σ_{(u,t),(u',t')} x_{u,b,c,t} x_{u',b,c,t'}ᵀ,   x = vec(P_u(g āᵀ))   (3.18), (3.28)

    over every pair of (use, position) for ``radius=None`` (the exact block), and for an
    int radius only the pairs of one use with ‖t − t'‖∞ ≤ radius on its grid (3.35) — the
    banded block the Z-operators of the expand setting fit.
    """
    vecs = [_use_vectors(u) for u in stats.uses]
    m, c = vecs[0].shape[:2]
    p = stats.a_dim * stats.g_dim
    F = torch.zeros(p, p, dtype=DT)
    for b in range(m):
        for j in range(c):
            if radius is None:
                x = torch.cat([v[b, j] for v in vecs]).sum(0)  # vec(D_{b,c})
                F += torch.outer(x, x)
                continue
            for u, v in zip(stats.uses, vecs):
                X = v[b, j]  # [T, p]
                F += X.T @ position_pairs(u.geometry.shape, radius) @ X
    return float(stats.scale) * F


def dense_kfac_factors(stats: Any, weight_sharing: str = "expand") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """KFAC factors by explicit sums of outer products (float64, CPU), one term per
    orientation of the uses (untransposed first), (3.19), (3.29), Eschenhagen et al. (2023):

    * expand:  A = (1/m) Σ_b Σ_{u,t} ā ā ᵀ,   G = (scale/T) Σ_{b,c,u,t} g gᵀ,  T = Σ_u T_u;
    * reduce:  â_b = (1/T) Σ_{u,t} ā_{u,b,t}, ĝ_{b,c} = Σ_{u,t} g_{u,b,c,t},
               A = (1/m) Σ_b â â ᵀ,  G = scale Σ_{b,c} ĝ ĝᵀ;

    a transposed group's term has its factors swapped (G ⊗ A in W̄'s order).
    """
    terms = []
    for transposed in (False, True):
        group = [u for u in stats.uses if u.transposed == transposed]
        if not group:
            continue
        a = [u.a.dense().detach().to("cpu", DT) for u in group]
        g = [u.g.detach().to("cpu", DT) for u in group]
        m, T = a[0].shape[0], sum(x.shape[1] for x in a)
        if weight_sharing == "expand":
            A = sum((x[..., :, None] * x[..., None, :]).sum((0, 1)) for x in a) / m
            G = sum((y[..., :, None] * y[..., None, :]).sum((0, 1, 2)) for y in g) * (float(stats.scale) / T)
        else:
            ah = sum(x.sum(1) for x in a) / T  # [m, d]
            gh = sum(y.sum(2) for y in g)  # [m, c, d']
            A = (ah[:, :, None] * ah[:, None, :]).sum(0) / m
            G = (gh[..., :, None] * gh[..., None, :]).sum((0, 1)) * float(stats.scale)
        terms.append((G, A) if transposed else (A, G))
    if stats.uses[0].transposed:
        terms.reverse()
    return terms


def dense_tikhonov_solve(M: torch.Tensor, X: torch.Tensor, lam: float) -> torch.Tensor:
    """MAT((M + λI)⁻¹ vec(X)) by ``torch.linalg.solve``: M ``[p, p]``, X ``[..., d_g, d_a]``."""
    d_g, d_a = X.shape[-2:]
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    y = torch.linalg.solve(M + lam * eye, vec(X).unsqueeze(-1)).squeeze(-1)
    return unvec(y, d_g, d_a)


def dense_two_level_residual(F_dense: torch.Tensor, M_dense: torch.Tensor, g: torch.Tensor, lam: float,
                             slices: Sequence[slice], mode: str = "multiplicative") -> torch.Tensor:
    """The two-level direction (4.11)–(4.17) (``mode="multiplicative"``) or (4.19)
    (``"additive"``) with the residual coarse space (4.34), densely: V_j = (M r)[slice j], the
    rows outside every slice zero in R₀ᵀ (those coordinates one-level)."""
    eye = torch.eye(F_dense.shape[0], dtype=F_dense.dtype, device=F_dense.device)
    Fb = F_dense + lam * eye
    zeta = M_dense @ g
    r = g - Fb @ zeta
    w = M_dense @ r
    R0T = torch.zeros(F_dense.shape[0], len(slices), dtype=F_dense.dtype, device=F_dense.device)
    for j, sl in enumerate(slices):
        R0T[sl, j] = w[sl]
    Fc = R0T.T @ Fb @ R0T
    rhs = R0T.T @ (r if mode == "multiplicative" else g)
    return zeta + R0T @ torch.linalg.solve(Fc, rhs)
