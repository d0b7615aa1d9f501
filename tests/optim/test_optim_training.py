"""NaturalGradient in a real training loop: the training loss of a small auto-encoder on the
real 8×8 digits goes down, the factors change across refreshes, and (with CUDA) everything
stays on the device."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from curvlib.bench.problems import PROBLEMS
from curvlib.optim import NaturalGradient
from curvlib.plugins import load_registry


@pytest.fixture(scope="module")
def registry():
    return load_registry(external=False)


def _full_loss(problem, model):
    X = problem.dataset.X_train
    with torch.no_grad():
        return float(problem.loss_fn(model(X), problem.targets(X, problem.dataset.y_train)))


def test_autoencoder_training_loss_decreases_on_real_digits(registry):
    """A measured property: 30 steps of KFAC natural gradient on the digits auto-encoder
    (64-16-4-16-64, BCE on real 8×8 digits) lower the full training loss, and by more
    than 30 steps of SGD with the same learning rate and momentum."""
    problem = PROBLEMS["digits_autoencoder"](small=True)
    cfg = {"approximator": "kfac", "damping": {"kind": "heuristic", "value": 1e-2}, "update_every": 2,
           "invert_every": 4, "ema": 0.95}
    results = {}
    for name in ("natural_gradient", "sgd"):
        model = problem.model_fn(0)
        if name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        else:
            opt = NaturalGradient(model, problem.loss_fn, cfg, lr=0.1, momentum=0.9, kl_clip=1e-2,
                                  registry=registry, generator=torch.Generator().manual_seed(0))
        start = _full_loss(problem, model)
        g = torch.Generator().manual_seed(0)
        batches = [b for _ in range(3) for b in problem.batches(g, drop_last=True)][:30]
        factors = []
        for X, y in batches:
            opt.zero_grad()
            problem.loss_fn(model(X), y).backward()
            if name == "sgd":
                opt.step()
            else:
                opt.step(batch=(X, y))
                factors.append(opt.preconditioner.approximation[0].terms[0][1].clone())
        results[name] = (start, _full_loss(problem, model))
        if name == "natural_gradient":
            pre = opt.preconditioner
            assert pre.num_refreshes == 15 and pre.num_inversions == 8
            # the factors moved at every refresh (steps 0, 2, 4, ...) and only then
            for k in range(1, len(factors)):
                assert torch.equal(factors[k], factors[k - 1]) == (k % 2 == 1), k
    start, end = results["natural_gradient"]
    assert end < 0.75 * start, results
    assert end < results["sgd"][1], results


@pytest.mark.cuda
def test_a_few_steps_on_cuda_stay_on_the_device(registry):
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).to(device)
    loss_fn = nn.CrossEntropyLoss()
    cfg = {"approximator": "kfac_corrected", "coarse_space": "residual", "update_every": 1, "invert_every": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = NaturalGradient(model, loss_fn, cfg, lr=0.05, momentum=0.9, kl_clip=1e-2, fallback="adam",
                              registry=registry)
        assert opt.preconditioner.generator.device.type == "cuda"
        for _ in range(3):
            X = torch.randn(16, 6, generator=g).to(device)
            y = torch.randint(0, 4, (16,), generator=g).to(device)
            opt.zero_grad()
            loss_fn(model(X), y).backward()
            opt.step(batch=(X, y))
    pre = opt.preconditioner
    for p in model.parameters():
        assert p.device.type == "cuda" and torch.isfinite(p).all()
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                assert v.device.type == "cuda"
    for fit in pre.approximation.fits:
        for A, B in fit.terms:
            assert A.device.type == "cuda" and B.device.type == "cuda"
    assert opt.last_kl_scale.device.type == "cuda"
    d = pre.apply(torch.randn(pre.p, device=device))
    assert d.device.type == "cuda"
    state = opt.state_dict()
    opt.load_state_dict(state)
