"""NaturalGradient trains modern networks with every Kronecker approximator.

A transformer language model (tied embedding/output head, LayerNorm, causal self-attention,
both ``batch_first`` layouts), a ResNet with BatchNorm in training mode, and a model mixing
Conv1d/Conv3d/grouped/depthwise convolutions, a tied embedding with ``padding_idx`` and
four kinds of norm layers (:mod:`curvlib.testing.models`): every trainable parameter is
preconditioned (``excluded`` is empty) and a few steps on one batch lower its loss, with
KFAC (expand and reduce), KFAC-corrected, KPSVD, deflation and Lanczos.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from curvlib.optim import NaturalGradient
from curvlib.testing.models import tiny_mixed_model, tiny_resnet, tiny_transformer_lm

MODELS = {
    "lm": lambda: tiny_transformer_lm(m=8),
    "lm_seq_first": lambda: tiny_transformer_lm(batch_first=False, m=8),
    "resnet": lambda: tiny_resnet(m=8),
    "mixed": lambda: tiny_mixed_model(m=8),
}
APPROXIMATORS = {
    "kfac": {"kind": "kfac"},
    "kfac_reduce": {"kind": "kfac", "weight_sharing": "reduce"},
    "kfac_corrected": {"kind": "kfac_corrected"},
    "kpsvd": {"kind": "kpsvd"},
    "deflation": {"kind": "deflation"},
    "lanczos": {"kind": "lanczos"},
}


def _cases():
    for model in MODELS:
        for approx in APPROXIMATORS:
            yield pytest.param(model, approx, id=f"{model}-{approx}")


def _loss(case) -> float:
    with torch.no_grad():
        out = case.model(*case.X) if isinstance(case.X, tuple) else case.model(case.X)
        return float(case.loss_fn(out, case.y))


def _train(case, config, steps: int = 4) -> tuple[NaturalGradient, float, float]:
    """``steps`` natural-gradient steps on the case's one batch: (optimizer, loss before, loss after)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BatchNorm coupling
        opt = NaturalGradient(case.model, case.loss_fn, config, lr=0.2, kl_clip=1e-2,
                              generator=torch.Generator().manual_seed(0))
        before = _loss(case)
        for _ in range(steps):
            opt.zero_grad()
            out = case.model(*case.X) if isinstance(case.X, tuple) else case.model(case.X)
            case.loss_fn(out, case.y).backward()
            opt.step(batch=(case.X, case.y))
        return opt, before, _loss(case)


@pytest.mark.parametrize(("model", "approx"), list(_cases()))
def test_natural_gradient_lowers_the_loss(model, approx):
    case = MODELS[model]()
    if model == "resnet":
        case.model.train()  # BatchNorm with the batch's statistics (coupled samples, warned)
    config = {"approximator": APPROXIMATORS[approx], "damping": {"kind": "heuristic", "value": 1e-2}}
    opt, before, after = _train(case, config)
    assert opt.preconditioner.excluded == []
    assert {id(p) for p in opt.preconditioner.params()} == {id(p) for p in case.model.parameters()}
    assert after < before, f"{model} with {approx}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("coarse", [{"coarse_space": {"kind": "nicolaides"}},
                                    {"coarse_space": {"kind": "spectral"}, "coarse_mode": "previous"}], ids=["nicolaides", "spectral-previous"])
@pytest.mark.parametrize("model", list(MODELS))
def test_two_level_natural_gradient_lowers_the_loss(model, coarse):
    """A two-level KFAC (§4) over the same blocks: the coarse space spans every layer type."""
    case = MODELS[model]()
    config = {"approximator": {"kind": "kfac"}, "damping": {"kind": "heuristic", "value": 1e-2}, **coarse}
    opt, before, after = _train(case, config)
    assert opt.preconditioner.excluded == [] and after < before, f"{model}: loss {before:.4f} -> {after:.4f}"
