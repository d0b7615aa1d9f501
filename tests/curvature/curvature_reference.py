"""Independent dense float64 references for the curvature tests (torch.func only).

The weight/bias <-> flat-vector mapping here is written out again, from DESIGN.md §1,
without calling the adapters: W̄ = [W, b], vec stacks columns, W = weight (Linear),
weight.reshape(c_out, -1) (Conv2d), weight.transpose(0, 1).reshape(c_out, -1)
(ConvTranspose2d, weight stored [c_in, c_out, k_h, k_w]).
"""

from __future__ import annotations

import torch
from torch import nn

from curvlib.testing.references import (  # noqa: F401  (re-exported for the tests)
    DT,
    current_vector,
    dense_hessian,
    flatten,
    k_factor,
    matrix_to_weight,
    per_sample_grads,
    per_sample_grads_dict,
    per_sample_jacobians,
    per_sample_output_hessians,
    trainable_names,
    unflatten,
    weight_to_matrix,
)


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
