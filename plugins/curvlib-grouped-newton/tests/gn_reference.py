"""Independent dense float64 references for the grouped-Newton tests.

Everything here works on torch's own flat parameter order (``torch.cat([p.reshape(-1) for
p in model.parameters()])``) through ``torch.func``; nothing goes through curvlib or the
plugin, so the tests compare two different routes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd

from curvlib.testing.strategies import load_profile

# curvlib's deterministic hypothesis profile, as curvlib's own suite runs the conformance
# kit (a plugin's conftest.py would do the same; this package keeps no conftest.py so that
# its test files never shadow curvlib's when both suites run in one session)
load_profile()


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread per test (restored afterwards): these problems are tiny, and on a
    shared 2-core machine OpenMP's spinning threads make them up to 100× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

F64 = torch.float64


def mlp(sizes: tuple[int, ...], *, seed: int, act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    """A float64 MLP ``sizes[0] → … → sizes[-1]`` with ``act`` between layers, weights from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b, bias=bias).to(F64)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen, dtype=F64) / math.sqrt(a))
            if bias:
                lin.bias.copy_(0.5 * torch.randn(b, generator=gen, dtype=F64))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def data(n: int, d_in: int, d_out: int, *, seed: int, kind: str = "regression") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[n, d_in]`` and targets: ``[n, d_out]`` reals, probabilities or class indices ``[n]``."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=gen, dtype=F64)
    if kind == "regression":
        y = torch.randn(n, d_out, generator=gen, dtype=F64)
    elif kind == "probabilities":
        y = torch.rand(n, d_out, generator=gen, dtype=F64)
    elif kind == "classes":
        y = torch.randint(0, d_out, (n,), generator=gen)
    else:
        raise ValueError(kind)
    return X, y


def names_and_shapes(model: nn.Module) -> tuple[list[str], list[torch.Size]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p.shape for _, p in named]


def flatten(model: nn.Module) -> torch.Tensor:
    """θ in torch order ``[p]``."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def unflatten(model: nn.Module, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    names, shapes = names_and_shapes(model)
    out, k = {}, 0
    for n, s in zip(names, shapes):
        size = math.prod(s)
        out[n] = theta[k:k + size].reshape(s)
        k += size
    return out


def loss_of_theta(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """``θ [p] -> L`` (torch order) through ``torch.func.functional_call``."""

    def f(theta: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, unflatten(model, theta), (X,)), y)

    return f


def dense_derivatives(model: nn.Module, loss_fn: nn.Module, X: torch.Tensor, y: torch.Tensor, *, third: bool = False):
    """(θ ``[p]``, ∇L ``[p]``, ∇²L ``[p, p]``, ∇³L ``[p, p, p]`` or None) in torch order, by ``torch.func``."""
    f = loss_of_theta(model, loss_fn, X, y)
    theta = flatten(model)
    g = grad(f)(theta)
    H = hessian(f)(theta)
    T = jacfwd(hessian(f))(theta) if third else None
    return theta, g, H, T


def group_slices(model: nn.Module, groups: list[list[str]]) -> list[torch.Tensor]:
    """Each group (a list of parameter names) as indices of the torch-order flat vector."""
    names, shapes = names_and_shapes(model)
    start, where = 0, {}
    for n, s in zip(names, shapes):
        where[n] = torch.arange(start, start + math.prod(s))
        start += math.prod(s)
    return [torch.cat([where[n] for n in grp]) for grp in groups]


def direction_matrix(u: torch.Tensor, index_groups: list[torch.Tensor]) -> torch.Tensor:
    """U ``[p, S]``: column s is u on group s, zero elsewhere (torch order)."""
    U = torch.zeros(u.shape[0], len(index_groups), dtype=u.dtype)
    for s, idx in enumerate(index_groups):
        U[idx, s] = u[idx]
    return U


def third_along(T: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """∇³L[v, v, v] from the dense tensor ``T [p, p, p]``."""
    return torch.einsum("ijk,i,j,k->", T, v, v, v)
