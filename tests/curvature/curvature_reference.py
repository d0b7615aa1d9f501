"""Independent dense float64 references for the curvature tests (torch.func only).

The weight/bias <-> flat-vector mapping here is written out again, from DESIGN.md §1,
without calling the adapters: W̄ = [W, b], vec stacks columns, W = weight (Linear),
weight.reshape(c_out, -1) (Conv2d), weight.transpose(0, 1).reshape(c_out, -1)
(ConvTranspose2d, weight stored [c_in, c_out, k_h, k_w]).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

DT = torch.float64


# -- the independent mapping -------------------------------------------------------------
def weight_to_matrix(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """w ``[B, *weight.shape]`` -> W ``[B, g, in]``."""
    B = w.shape[0]
    if isinstance(module, nn.ConvTranspose2d):
        return w.transpose(1, 2).reshape(B, w.shape[2], -1)
    return w.reshape(B, w.shape[1], -1)


def matrix_to_weight(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """W ``[g, in]`` -> a tensor shaped like ``module.weight``."""
    if isinstance(module, nn.ConvTranspose2d):
        c_in, c_out, kh, kw = module.weight.shape
        return W.reshape(c_out, c_in, kh, kw).transpose(0, 1)
    return W.reshape(module.weight.shape)


def trainable_names(op) -> list[str]:
    names = []
    for L in op.layers:
        names.append(f"{L.name}.weight" if L.name else "weight")
        if L.has_bias:
            names.append(f"{L.name}.bias" if L.name else "bias")
    return names


def flatten(op, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """{name: [B, *shape]} -> ``[B, p]`` in curvlib order (vec(W̄) per layer, columns stacked)."""
    cols = []
    for L in op.layers:
        pre = f"{L.name}." if L.name else ""
        W = weight_to_matrix(L.module, tensors[pre + "weight"])
        if L.has_bias:
            W = torch.cat([W, tensors[pre + "bias"].unsqueeze(-1)], dim=-1)
        cols.append(W.transpose(1, 2).reshape(W.shape[0], -1))
    return torch.cat(cols, dim=1)


def unflatten(op, v: torch.Tensor) -> dict[str, torch.Tensor]:
    """``[p]`` -> {name: tensor shaped like the parameter}."""
    out = {}
    for L in op.layers:
        pre = f"{L.name}." if L.name else ""
        Wbar = v[L.slice].reshape(L.a_dim, L.g_dim).T
        n_in = L.a_dim - int(L.has_bias)
        out[pre + "weight"] = matrix_to_weight(L.module, Wbar[:, :n_in])
        if L.has_bias:
            out[pre + "bias"] = Wbar[:, -1]
    return out


def current_vector(op, model: nn.Module) -> torch.Tensor:
    params = dict(model.named_parameters())
    return flatten(op, {n: params[n].detach().unsqueeze(0) for n in trainable_names(op)})[0]


# -- per-sample quantities ------------------------------------------------------------------
def _split(model: nn.Module, op):
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    sub = {n: params[n] for n in trainable_names(op)}
    return params, buffers, sub


def per_sample_grads_dict(model: nn.Module, op, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> dict:
    """∇_θ ℓ_b(y_b) for each sample, ℓ_b = loss_fn on the one-sample batch: {name: [m, *shape]}."""
    params, buffers, sub = _split(model, op)

    def ell(s, x, y):
        out = functional_call(model, {**params, **s, **buffers}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    return vmap(grad(ell), in_dims=(None, 0, 0))(sub, X, Y)


def per_sample_grads(model: nn.Module, op, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """∇_θ ℓ_b(y_b) for each sample in curvlib order: ``[m, p]``."""
    return flatten(op, per_sample_grads_dict(model, op, loss_fn, X, Y))


def per_sample_jacobians(model: nn.Module, op, X: torch.Tensor) -> torch.Tensor:
    """J_b = ∂f_b/∂θ: ``[m, c, p]``."""
    params, buffers, sub = _split(model, op)

    def f(s, x):
        return functional_call(model, {**params, **s, **buffers}, (x.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(sub, X)
    m, c = X.shape[0], next(iter(jac.values())).shape[1]
    flat = flatten(op, {n: t.reshape(m * c, *t.shape[2:]) for n, t in jac.items()})
    return flat.reshape(m, c, -1)


def per_sample_output_hessians(loss_fn: nn.Module, outputs: torch.Tensor, Y: torch.Tensor, link=None) -> torch.Tensor:
    """∇²_f ℓ_b at f_b (after ``link`` if given): ``[m, c, c]``."""
    shape = outputs.shape[1:]

    def ell(f, y):
        z = f.reshape(1, *shape)
        if link is not None:
            z = link(z)
        return loss_fn(z, y.unsqueeze(0))

    return vmap(hessian(ell))(outputs.detach().reshape(outputs.shape[0], -1), Y)


def dense_hessian(model: nn.Module, op, loss_fn: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """∇²_θ (1/m) Σ_b ℓ_b w.r.t. the flat curvlib vector: ``[p, p]``."""
    params, buffers, _ = _split(model, op)
    m = X.shape[0]

    def L(v):
        out = functional_call(model, {**params, **unflatten(op, v), **buffers}, (X,))
        val = loss_fn(out, Y)
        return val if loss_fn.reduction == "mean" else val / m

    return hessian(L)(current_vector(op, model))


def k_factor(loss_fn: nn.Module, c: int) -> float:
    """ℓ_b = k·NLL_b: CE 1; MSE 2 (sum) or 2/c (mean); BCE 1 (sum) or 1/c (mean)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return 1.0
    if isinstance(loss_fn, nn.MSELoss):
        return 2.0 if loss_fn.reduction == "sum" else 2.0 / c
    return 1.0 if loss_fn.reduction == "sum" else 1.0 / c


# -- models ---------------------------------------------------------------------------------
class SkipNet(nn.Module):
    """Not a Sequential: a branch, a skip connection, attributes declared out of call order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 3)
        self.skip = nn.Linear(4, 3, bias=False)
        self.body = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x))) + self.skip(x)


def mlp(out: int = 3, final=None) -> nn.Module:
    layers = [nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, out)]
    if final is not None:
        layers.append(final)
    return nn.Sequential(*layers)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    )


def conv_autoencoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 1, 1),
    )


def bn_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def make_case(name: str, m: int = 5, seed: int = 0):
    """``(model, loss_fn, X, y, link)`` for a named case; ``link`` is the output map of a model
    whose loss is on probabilities (``nn.BCELoss`` after ``nn.Sigmoid``), else None."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    arch, loss_name, red = name.split("-")
    link = None
    if arch == "mlp":
        model = mlp(final=nn.Sigmoid() if loss_name == "bce" else None)
        X = torch.randn(m, 4, generator=g, dtype=DT)
        link = torch.sigmoid if loss_name == "bce" else None
    elif arch == "cnn":
        model = small_cnn()
        X = torch.randn(m, 2, 6, 6, generator=g, dtype=DT)
    elif arch == "convae":
        model = conv_autoencoder()
        X = torch.rand(m, 1, 6, 6, generator=g, dtype=DT)
    elif arch == "bn":
        model = bn_model()
        X = torch.randn(m, 4, generator=g, dtype=DT)
    elif arch == "skip":
        model = SkipNet()
        X = torch.randn(m, 4, generator=g, dtype=DT)
    else:
        raise KeyError(arch)
    model = model.to(DT)
    if arch == "bn":
        with torch.no_grad():  # non-trivial running statistics, then eval mode
            model[1].running_mean.normal_(generator=g)
            model[1].running_var.uniform_(0.5, 2.0, generator=g)
        model.eval()
    with torch.no_grad():
        out = model(X)
    if loss_name == "ce":
        loss_fn = nn.CrossEntropyLoss(reduction=red)
        y = torch.randint(0, out.shape[1], (m,), generator=g)
    elif loss_name == "mse":
        loss_fn = nn.MSELoss(reduction=red)
        y = torch.randn(out.shape, generator=g, dtype=DT)
    elif loss_name == "bcelogits":
        loss_fn = nn.BCEWithLogitsLoss(reduction=red)
        y = torch.rand(out.shape, generator=g, dtype=DT)
    elif loss_name == "bce":
        loss_fn = nn.BCELoss(reduction=red)
        y = (torch.rand(out.shape, generator=g, dtype=DT) > 0.5).to(DT)
    else:
        raise KeyError(loss_name)
    return model, loss_fn, X, y, link


CASES = [
    "mlp-ce-mean",
    "mlp-ce-sum",
    "mlp-mse-mean",
    "mlp-mse-sum",
    "mlp-bcelogits-mean",
    "mlp-bcelogits-sum",
    "mlp-bce-mean",
    "mlp-bce-sum",
    "cnn-ce-mean",
    "convae-mse-mean",
    "convae-bcelogits-sum",
    "bn-ce-mean",
    "skip-mse-sum",
]
