"""Small float64 networks with the layer types of a modern model, each with a loss and a batch.

Every builder returns a :class:`ModelCase` (model, loss, inputs X, targets y) whose parameters
and data are drawn from a ``torch.Generator`` seeded by ``seed`` (no global RNG), small enough
that a dense ``[p, p]`` curvature matrix is cheap (p ≤ ~1300):

- :func:`tiny_transformer_lm`: a character-level decoder-only language model — token and
  learned positional ``nn.Embedding``, causal ``nn.TransformerEncoderLayer`` blocks
  (``nn.MultiheadAttention``, MLP, ``nn.LayerNorm``), a final ``nn.LayerNorm`` and an output
  head tied to the token embedding; logits ``[m, V, T]`` for K-dimensional cross-entropy with
  next-token targets ``[m, T]``;
- :func:`tiny_resnet`: Conv2d stem + ``nn.BatchNorm2d`` + ReLU, residual blocks (identity and
  strided 1×1-conv shortcuts), global average pooling, a Linear head;
- :func:`tiny_mixed_model`: one model over four inputs (tokens, a 1-D signal, a 3-D volume,
  an image) with ``nn.Conv1d``, ``nn.Conv3d``, a grouped and a depthwise ``nn.Conv2d``, an
  ``nn.Embedding`` with ``padding_idx`` tied to an output head with a bias,
  ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d``/``2d`` and ``nn.RMSNorm``.

Models with BatchNorm are returned in ``eval()`` mode (running statistics, no coupling of
the samples) with non-trivial running statistics; the language model has no dropout
(``dropout=0.0``) and stays in training mode, so ``nn.TransformerEncoderLayer`` never takes
its inference fast path.  Every parameter is trainable and every module is called in the
forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from curvlib.bench.models import ResidualBlock

__all__ = [
    "ModelCase",
    "TinyMixedModel",
    "TinyResNet",
    "TinyTransformerLM",
    "tiny_mixed_model",
    "tiny_resnet",
    "tiny_transformer_lm",
]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


@dataclass
class ModelCase:
    """A small model, its loss and one batch.

    Attributes:
        name: what the builder built (e.g. ``"transformer_lm"``).
        model: the network, float64, weights drawn from ``seed``.
        loss_fn: ``nn.CrossEntropyLoss`` (reduction as requested).
        X: the input tensor, or a tuple of input tensors (``model(*X)``), batch axis first.
        y: the targets: class indices ``[m]`` or ``[m, *d]`` (K-dimensional cross-entropy).
        seed: the seed the weights and data were drawn from.
    """

    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: torch.Tensor | tuple[torch.Tensor, ...]
    y: torch.Tensor
    seed: int

    @property
    def batch(self) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
        """``(X, y)``, as :func:`curvlib.curvature` takes it."""
        return self.X, self.y

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The positional inputs of the model: ``X`` as a tuple."""
        return self.X if isinstance(self.X, tuple) else (self.X,)

    @property
    def num_samples(self) -> int:
        return int(self.y.shape[0])

    def output(self) -> torch.Tensor:
        """``model(*inputs)`` without a graph."""
        with torch.no_grad():
            return self.model(*self.inputs)

    def __repr__(self) -> str:
        shapes = [list(x.shape) for x in self.inputs]
        p = sum(q.numel() for q in self.model.parameters())
        return f"ModelCase({self.name!r}, inputs={shapes}, y={list(self.y.shape)}, p={p}, seed={self.seed})"


def _init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Draw every parameter from ``generator`` (no global RNG), in ``model.parameters()`` order.

    Weights of layers ~ N(0, 1/fan_in) (as :mod:`curvlib.testing.strategies` does); the
    affine parameters of normalisation layers are weight 1 + 0.2·N(0, 1), bias 0.2·N(0, 1),
    so the normalised features neither vanish nor stay at the identity; BatchNorm running
    statistics get a mean 0.5·N(0, 1) and a variance U(0.5, 2).  An embedding's padding
    row is zero, as ``nn.Embedding`` initialises it (torch treats it as a constant).
    """
    norm_params = {id(p) for mod in model.modules() if isinstance(mod, _NORMS) for p in mod.parameters(recurse=False)}
    norm_weights = {
        id(mod.weight) for mod in model.modules() if isinstance(mod, _NORMS) and getattr(mod, "weight", None) is not None
    }
    with torch.no_grad():
        for p in model.parameters():
            z = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            if id(p) in norm_weights:
                p.copy_(1.0 + 0.2 * z)
            elif id(p) in norm_params:
                p.copy_(0.2 * z)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                p.copy_(z / math.sqrt(max(fan_in, 1)))
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(0.5 * torch.randn(n, generator=generator, dtype=mod.running_mean.dtype))
                mod.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator, dtype=mod.running_var.dtype))
            if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
                mod.weight[mod.padding_idx].zero_()
    return model


# --------------------------------------------------------------------------- language model
class TinyTransformerLM(nn.Module):
    """A decoder-only language model: tokens ``[m, T]`` (long) -> logits ``[m, V, T]``.

    h = tok(x) + pos(0..T−1) ``[m, T, d]`` (the positions ``[m, T]``, with the batch axis);
    ``num_layers`` causal
    ``nn.TransformerEncoderLayer(d, nhead, dim_ff, dropout=0)`` blocks (on ``[T, m, d]`` when
    ``batch_first=False``); a final ``nn.LayerNorm``; ``head = nn.Linear(d, V, bias=False)``
    whose weight is ``tok.weight`` when ``tied``.  The logits are returned with the classes on
    axis 1, the layout ``nn.CrossEntropyLoss`` takes for targets ``[m, T]``.
    """

    def __init__(
        self,
        vocab: int,
        max_len: int,
        d: int,
        nhead: int,
        dim_ff: int,
        num_layers: int,
        *,
        batch_first: bool = True,
        tied: bool = True,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, nhead, dim_ff, dropout=0.0, batch_first=batch_first) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``[m, T]`` -> logits ``[m, V, T]``."""
        m, T = tokens.shape
        # positions with the batch axis: pos(arange(T)) [T, d] broadcast over the batch would
        # sum the samples' gradients before any hook on ``pos`` sees them
        positions = torch.arange(T, device=tokens.device).expand(m, T)
        h = self.tok(tokens) + self.pos(positions)  # [m, T, d]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=h.device, dtype=h.dtype)
        if not self.batch_first:
            h = h.transpose(0, 1)  # [T, m, d]
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(self.norm(h)).transpose(1, 2)  # [m, T, V] -> [m, V, T]


def tiny_transformer_lm(
    batch_first: bool = True,
    tied: bool = True,
    *,
    vocab: int = 7,
    seq_len: int = 5,
    d: int = 8,
    nhead: int = 2,
    dim_ff: int = 12,
    num_layers: int = 2,
    m: int = 3,
    reduction: str = "mean",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ModelCase:
    """A :class:`TinyTransformerLM` on m random character sequences.

    The weights do not depend on ``batch_first`` (same seed, same values), so the two
    layouts compute the same function.  A sequence of ``seq_len + 1`` tokens is drawn per
    sample; X = its first ``seq_len`` tokens ``[m, T]``, y = the next tokens ``[m, T]``;
    ``loss_fn = nn.CrossEntropyLoss(reduction=reduction)`` on the logits ``[m, V, T]``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # the modules' own initialisation draws from the global RNG
        model = TinyTransformerLM(vocab, seq_len, d, nhead, dim_ff, num_layers, batch_first=batch_first, tied=tied)
    _init_parameters(model.to(dtype), gen)
    text = torch.randint(0, vocab, (m, seq_len + 1), generator=gen)
    return ModelCase(
        name="transformer_lm",
        model=model,
        loss_fn=nn.CrossEntropyLoss(reduction=reduction),
        X=text[:, :-1].contiguous(),
        y=text[:, 1:].contiguous(),
        seed=int(seed),
    )


# --------------------------------------------------------------------------- residual network
class TinyResNet(nn.Module):
    """images ``[m, c_in, H, W]`` -> logits ``[m, classes]``: stem conv(3×3) + BN + ReLU, an
    identity block at ``width`` channels, a strided block to ``2·width`` channels (1×1-conv
    shortcut) when ``downsample``, global average pooling, Linear head."""

    def __init__(self, c_in: int = 1, width: int = 4, classes: int = 5, *, downsample: bool = True) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks = [ResidualBlock(width, width, 1)]
        c_out = width
        if downsample:
            blocks.append(ResidualBlock(width, 2 * width, 2))
            c_out = 2 * width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_out, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))


def tiny_resnet(
    *,
    c_in: int = 1,
    width: int = 4,
    classes: int = 5,
    size: int = 8,
    downsample: bool = True,
    m: int = 3,
    reduction: str = "mean",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ModelCase:
    """A :class:`TinyResNet` in ``eval()`` mode on images ``[m, c_in, size, size]`` ~ N(0, 1),
    class targets ``[m]``, ``nn.CrossEntropyLoss(reduction=reduction)``."""
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # the modules' own initialisation draws from the global RNG
        model = TinyResNet(c_in, width, classes, downsample=downsample)
    _init_parameters(model.to(dtype), gen)
    model.eval()
    X = torch.randn(m, c_in, size, size, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (m,), generator=gen)
    return ModelCase("resnet", model, nn.CrossEntropyLoss(reduction=reduction), X, y, int(seed))


# --------------------------------------------------------------------------- mixed model
class TinyMixedModel(nn.Module):
    """Four inputs -> class logits ``[m, V]``:

    - tokens ``[m, T]`` (long, 0 = padding): ``emb`` (``padding_idx=0``) -> mean over T ->
      ``nn.RMSNorm`` -> ``[m, d]``;
    - signal ``[m, c, L]``: ``nn.Conv1d`` -> ``nn.BatchNorm1d`` -> tanh -> mean over L -> ``[m, 4]``;
    - volume ``[m, c, D, H, W]``: ``nn.Conv3d`` -> ``nn.GroupNorm(2, 4)`` -> tanh -> mean -> ``[m, 4]``;
    - image ``[m, c, H, W]``: grouped ``nn.Conv2d`` (groups=2) -> ``nn.BatchNorm2d`` -> tanh ->
      depthwise ``nn.Conv2d`` (groups=channels) -> tanh -> mean -> ``[m, 4]``;

    the features are concatenated, mixed by ``nn.Linear(d + 12, d)`` -> ``nn.LayerNorm`` ->
    tanh, and mapped to logits by ``head = nn.Linear(d, V)`` (with a bias) whose weight is
    ``emb.weight``.
    """

    def __init__(self, vocab: int = 6, d: int = 6, c: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.rms = nn.RMSNorm(d)
        self.conv1d = nn.Conv1d(c, 4, 3, padding=1)
        self.bn1d = nn.BatchNorm1d(4)
        self.conv3d = nn.Conv3d(c, 4, 2)
        self.gn = nn.GroupNorm(2, 4)
        self.grouped = nn.Conv2d(c, 4, 3, padding=1, groups=2)
        self.bn2d = nn.BatchNorm2d(4)
        self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.mix = nn.Linear(d + 12, d)
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.head.weight = self.emb.weight

    def forward(
        self, tokens: torch.Tensor, signal: torch.Tensor, volume: torch.Tensor, image: torch.Tensor
    ) -> torch.Tensor:
        """tokens ``[m, T]``, signal ``[m, c, L]``, volume ``[m, c, D, H, W]``, image
        ``[m, c, H, W]`` -> logits ``[m, V]``."""
        t = self.rms(self.emb(tokens).mean(1))  # [m, d]; pooled first: RMSNorm is singular at a zero padding row
        s = torch.tanh(self.bn1d(self.conv1d(signal))).mean(-1)  # [m, 4]
        v = torch.tanh(self.gn(self.conv3d(volume))).mean((-3, -2, -1))  # [m, 4]
        i = torch.tanh(self.depthwise(torch.tanh(self.bn2d(self.grouped(image))))).mean((-2, -1))  # [m, 4]
        h = torch.tanh(self.ln(self.mix(torch.cat([t, s, v, i], dim=1))))
        return self.head(h)


def tiny_mixed_model(
    *,
    vocab: int = 6,
    d: int = 6,
    c: int = 2,
    seq_len: int = 4,
    length: int = 6,
    volume: int = 3,
    image: int = 5,
    m: int = 3,
    reduction: str = "mean",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> ModelCase:
    """A :class:`TinyMixedModel` in ``eval()`` mode with X = (tokens ``[m, seq_len]``, signal
    ``[m, c, length]``, volume ``[m, c, volume, volume, volume]``, image ``[m, c, image, image]``)
    and class targets ``[m]`` in [0, vocab), ``nn.CrossEntropyLoss(reduction=reduction)``.

    Tokens are drawn from 1..vocab−1 and the last token of every other sample (samples 0, 2, …)
    is the padding token 0, so padding occurs in the batch but no sample is only padding.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # the modules' own initialisation draws from the global RNG
        model = TinyMixedModel(vocab, d, c)
    _init_parameters(model.to(dtype), gen)
    model.eval()
    tokens = torch.randint(1, vocab, (m, seq_len), generator=gen)
    tokens[::2, -1] = 0
    X = (
        tokens,
        torch.randn(m, c, length, generator=gen, dtype=dtype),
        torch.randn(m, c, volume, volume, volume, generator=gen, dtype=dtype),
        torch.randn(m, c, image, image, generator=gen, dtype=dtype),
    )
    y = torch.randint(0, vocab, (m,), generator=gen)
    return ModelCase("mixed", model, nn.CrossEntropyLoss(reduction=reduction), X, y, int(seed))
