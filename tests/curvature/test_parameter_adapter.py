"""The ``parameter`` layer kind: architecture-free blocks for parameters no adapter covers.

Checked against routes that share nothing with the adapter's ``torch.func`` recomputation:
the dense float64 references of :mod:`curvlib.testing.references` for every curvature kind,
and per-sample gradients by loops of ``torch.autograd.grad`` on one-sample batches for
TNT's mode covariances.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvlib
from curvlib.approximators.tnt import mode_covariances
from curvlib.capture.adapters import ExcludedParametersWarning
from curvlib.capture.layout import current_uncovered, uncovered_parameters
from curvlib.errors import ConfigError, UnsupportedLayerError
from curvlib.optim import NaturalGradient
from curvlib.testing import assert_close
from curvlib.testing import references as ref
from curvlib.testing.distributed import train_steps

DT = torch.float64


class Scale(nn.Module):
    """x ⊙ s: a vector parameter."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(1 + 0.3 * torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class Bilinear(nn.Module):
    """tanh(x W): a matrix parameter used by ``@`` (no adapter), with a kwarg and an unbatched tensor argument."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(a, b) / a**0.5)

    def forward(self, x: torch.Tensor, shift: torch.Tensor, *, gain: float = 1.0) -> torch.Tensor:
        return torch.tanh(gain * (x @ self.W) + shift)


class Mix(nn.Module):
    """A Linear child plus its own order-3 parameter: y_bi = Σ_jk K_ijk x_bj x_bk (+ the child's output)."""

    def __init__(self, d: int, o: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, o)
        self.K = nn.Parameter(torch.randn(o, d, d) / d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.einsum("ijk,bj,bk->bi", self.K, x, x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(4, 5)
        self.scale = Scale(5)
        self.bil = Bilinear(5, 3)
        self.mix = Mix(3, 3)
        self.bias = nn.Parameter(0.1 * torch.randn(3))  # the model's own parameters
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bil(self.scale(self.l1(x)), torch.full((3,), 0.1, dtype=x.dtype), gain=0.9)
        return self.mix(h) / self.temperature + self.bias


OWN = {"scale.s": (5,), "bil.W": (5, 3), "mix.K": (3, 3, 3), "bias": (3,), "temperature": ()}


def _case(m: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    net = Net().to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    X = torch.randn(m, 4, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (m,), generator=gen)
    return net, X, y, nn.CrossEntropyLoss()


def test_default_leaves_them_to_the_fallback():
    net, X, y, loss_fn = _case()
    with pytest.warns(ExcludedParametersWarning):
        F = curvlib.curvature("ggn", net, loss_fn, batch=(X, y))
    assert sorted(F.excluded) == sorted(OWN)
    assert current_uncovered() == "fallback"


@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher", "hessian"])
def test_every_parameter_is_covered_and_products_equal_the_dense_reference(kind):
    net, X, y, loss_fn = _case()
    options = {"mc_samples": 2} if kind == "fisher" else {}
    with warnings.catch_warnings(), uncovered_parameters("per_sample"):
        warnings.simplefilter("error", ExcludedParametersWarning)
        F = curvlib.curvature(kind, net, loss_fn, batch=(X, y), generator=torch.Generator().manual_seed(0), **options)
    assert F.excluded == []
    assert {L.name: L.kind for L in F.layers if L.kind == "parameter"} == dict.fromkeys(OWN, "parameter")
    shapes = {L.name: (L.g_dim, L.a_dim) for L in F.layers}
    assert shapes["mix.K"] == (3, 9) and shapes["temperature"] == (1, 1) and shapes["bil.W"] == (5, 3)
    params = F.params()
    assert {id(q) for q in params} == {id(q) for q in net.parameters()} and len(params) == len(list(net.parameters()))
    args = (net, params, loss_fn, X)
    C = {"ggn": lambda: ref.dense_ggn_params(*args, y),
         "fisher": lambda: ref.dense_fisher_params(*args, F.sampled_targets),
         "empirical_fisher": lambda: ref.dense_empirical_fisher_params(*args, y),
         "hessian": lambda: ref.dense_hessian_params(*args, y)}[kind]()
    v = [torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=DT) for q in params]
    assert_close(ref.flatten_params(F @ v), C @ ref.flatten_params(v), rtol=1e-10, atol=1e-12)


def _loop_per_sample_grads(net, X, y, loss_fn, param):
    """∂ℓ_n/∂θ by autograd on one-sample batches ``[m, *θ.shape]``."""
    return torch.stack([torch.autograd.grad(loss_fn(net(X[n : n + 1]), y[n : n + 1]), param)[0]
                        for n in range(X.shape[0])])


@pytest.mark.parametrize("name", ["bil.W", "mix.K", "scale.s"])
def test_tnt_mode_covariances_of_a_parameter_block_equal_autograd_loops(name):
    net, X, y, loss_fn = _case(m=7, seed=3)
    with uncovered_parameters("per_sample"):
        F = curvlib.curvature("empirical_fisher", net, loss_fn, batch=(X, y))
    i = next(i for i, L in enumerate(F.layers) if L.name == name)
    L = F.layers[i]
    D = _loop_per_sample_grads(net, X, y, loss_fn, net.get_parameter(name)).reshape(-1, L.g_dim, L.a_dim)
    C_a, C_g, t = mode_covariances(F.statistics(i))
    m = X.shape[0]
    assert_close(C_g, torch.einsum("nga,nha->gh", D, D) / m)
    assert_close(C_a, torch.einsum("nga,ngb->ab", D, D) / m)
    assert_close(t, (D * D).sum() / m)


def test_dropout_in_training_mode_raises_naming_the_parameter():
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.s = nn.Parameter(torch.ones(3))
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.lin(self.drop(x) * self.s)

    net = Noisy().to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    with uncovered_parameters("per_sample"), pytest.raises(UnsupportedLayerError, match="parameter 's' of Noisy"):
        curvlib.curvature("ggn", net, nn.CrossEntropyLoss(), batch=(X, y))
    net.eval()  # deterministic: recomputation reproduces the forward
    with uncovered_parameters("per_sample"):
        F = curvlib.curvature("ggn", net, nn.CrossEntropyLoss(), batch=(X, y))
    assert F.excluded == []


def test_batch_statistics_are_detected_as_coupling():
    class Centred(nn.Module):  # subtracts the batch mean: the samples are coupled
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return (x - x.mean(0, keepdim=True)) * self.s

    net = nn.Sequential(nn.Linear(3, 3), Centred(), nn.Linear(3, 2)).to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    with uncovered_parameters("per_sample"), pytest.raises(UnsupportedLayerError, match="does not reproduce"):
        curvlib.curvature("ggn", net, nn.CrossEntropyLoss(), batch=(X, y), check_samples=False)


def test_a_parameter_registered_by_two_modules_stays_excluded_with_the_reason():
    a, b = Scale(3), Scale(3)
    b.s = a.s
    net = nn.Sequential(nn.Linear(2, 3), a, b, nn.Linear(3, 2)).to(DT)
    X, y = torch.randn(4, 2, dtype=DT), torch.randint(0, 2, (4,))
    with uncovered_parameters("per_sample"), pytest.warns(ExcludedParametersWarning, match="several modules"):
        F = curvlib.curvature("ggn", net, nn.CrossEntropyLoss(), batch=(X, y))
    assert F.excluded == ["1.s"]


def test_unknown_mode_is_refused():
    with pytest.raises(ConfigError, match="per_sample"), uncovered_parameters("all"):
        pass
    with pytest.raises(ConfigError, match="uncovered"):
        curvlib.PreconditionerConfig(uncovered="everything")


def test_a_data_operator_keeps_the_mode_it_was_built_under():
    net, X, y, loss_fn = _case(m=8)
    loader = [(X[:4], y[:4]), (X[4:], y[4:])]
    with uncovered_parameters("per_sample"):
        F = curvlib.curvature("ggn", net, loss_fn, data=loader)
        F1 = curvlib.curvature("ggn", net, loss_fn, batch=(X, y))
    v = [torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=DT) for q in F1.params()]
    assert F.excluded == [] and [L.name for L in F.layers] == [L.name for L in F1.layers]
    assert_close(ref.flatten_params(F @ v), ref.flatten_params(F1 @ v), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("approximator", ["tnt", "kfac", "kpsvd"])
def test_natural_gradient_trains_every_parameter_and_checkpoints_round_trip(approximator):
    def build():
        net, X, y, loss_fn = _case(m=32, seed=5)
        opt = NaturalGradient(net, loss_fn, {"approximator": approximator, "uncovered": "per_sample",
                                             "update_every": 1, "invert_every": 2}, lr=0.05, fallback="sgd")
        return net, X, y, loss_fn, opt

    net, X, y, loss_fn, opt = build()
    before = {n: q.detach().clone() for n, q in net.named_parameters()}
    losses = [train_steps(opt, net, loss_fn, [(X, y)], capture=bool(k % 2))[0] for k in range(6)]  # both loops
    assert losses[-1] < losses[0]
    assert opt.preconditioner.curvature.excluded == []
    assert all(not torch.equal(before[n], q) for n, q in net.named_parameters()), "a parameter was not updated"

    net2, X2, y2, _, opt2 = build()
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(opt.state_dict())
    train_steps(opt, net, loss_fn, [(X, y)])
    train_steps(opt2, net2, loss_fn, [(X2, y2)])
    for (n, q), q2 in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(q, q2), n


def test_a_module_called_twice_has_two_uses_and_stays_exact():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 4), nn.Linear(4, 2)
            self.gain = Scale(4)

        def forward(self, x):
            return self.l2(self.gain(torch.tanh(self.gain(self.l1(x)))))

    torch.manual_seed(6)
    net = Twice().to(DT)
    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    with uncovered_parameters("per_sample"):
        F = curvlib.curvature("ggn", net, loss_fn, batch=(X, y))
    i = next(i for i, L in enumerate(F.layers) if L.name == "gain.s")
    assert len(F.statistics(i).uses) == 2
    params = F.params()
    v = [torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=DT) for q in params]
    C = ref.dense_ggn_params(net, params, loss_fn, X, y)
    assert_close(ref.flatten_params(F @ v), C @ ref.flatten_params(v), rtol=1e-10, atol=1e-12)


def test_a_module_returning_a_tuple_is_refused_naming_the_parameter():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s, x

    class Net2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.pair, self.l2 = nn.Linear(3, 3), Pair(), nn.Linear(3, 2)

        def forward(self, x):
            return self.l2(self.pair(self.l1(x))[0])

    net = Net2().to(DT)
    X, y = torch.randn(4, 3, dtype=DT), torch.randint(0, 2, (4,))
    with uncovered_parameters("per_sample"), pytest.raises(UnsupportedLayerError, match="parameter 'pair.s' of Pair"):
        curvlib.curvature("ggn", net, nn.CrossEntropyLoss(), batch=(X, y))
    with pytest.warns(ExcludedParametersWarning):  # the default leaves it to the fallback
        F = curvlib.curvature("ggn", net, nn.CrossEntropyLoss(), batch=(X, y))
    assert F.excluded == ["pair.s"]
