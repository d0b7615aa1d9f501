"""The network modules of the benchmark problems that are more than a stack of layers.

* :class:`CharTransformer` — a decoder-only (GPT-style) character-level transformer
  language model with tied input and output embeddings (problem ``char_lm``);
* :class:`ResidualBlock` — the basic block of a ResNet, with batch normalization
  (problem ``mnist_resnet``).

The problems build these on the ``meta`` device and initialize them with
:func:`curvlib.bench.problems.init_module`, so nothing here draws random numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from curvlib.errors import ConfigError, ShapeError

__all__ = ["CharTransformer", "ResidualBlock"]


def _embedding(n: int, d: int) -> nn.Embedding:
    """``nn.Embedding(n, d)``; built on the ``meta`` device, without its N(0, 1) draw.

    On ``meta`` that draw runs through torch's reference implementation, whose first use
    imports ``torch._dynamo`` (seconds); the benchmark draws every parameter afterwards
    (:func:`~curvlib.bench.problems.init_module`), so there is nothing to draw.
    """
    if torch.get_default_device().type == "meta":
        return nn.Embedding(n, d, _weight=torch.empty(n, d))
    return nn.Embedding(n, d)


class CharTransformer(nn.Module):
    """A decoder-only transformer language model over ``V`` token ids.

    ``tokens [B, T]`` → token embedding ``[B, T, d]`` + learned position embedding of the
    positions ``[B, T]`` → ``n_layers`` pre-norm blocks (``nn.TransformerEncoderLayer`` with
    ``norm_first=True``: ``h + SelfAttention(LayerNorm(h))`` then ``h + MLP(LayerNorm(h))``,
    the MLP ``d → d_ff → d`` with GELU, no dropout), each attending causally (position
    ``t`` sees positions ``≤ t``) → final ``LayerNorm`` → output head ``Linear(d, V,
    bias=False)`` whose weight **is** the token embedding's (tied: one ``[V, d]``
    parameter) → logits.

    The logits are returned as ``[B, V, T]`` — classes on dim 1, the batch on dim 0 — so
    ``nn.CrossEntropyLoss()(logits, next_tokens [B, T])`` takes them directly and gives
    the mean loss per token (curvlib's loss convention: batch first, classes second).

    Args:
        vocab_size: ``V``.
        max_len: the longest sequence ``T`` (rows of the position embedding).
        d_model: ``d``; a multiple of ``n_heads``.
        n_heads: attention heads.
        n_layers: transformer blocks.
        d_ff: hidden width of each block's MLP.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_heads: int, n_layers: int, d_ff: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"CharTransformer: d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.max_len = max_len
        self.token_embedding = _embedding(vocab_size, d_model)
        self.position_embedding = _embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied: the same [V, d] parameter

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens [B, T]`` int64 → logits ``[B, V, T]`` (``T ≤ max_len``)."""
        if tokens.ndim != 2 or tokens.dtype != torch.int64:
            raise ShapeError(f"CharTransformer: expected int64 token ids [B, T], got {tokens.dtype} "
                             f"{tuple(tokens.shape)}")
        B, T = tokens.shape
        if T > self.max_len:
            raise ShapeError(f"CharTransformer: sequences of at most {self.max_len} tokens, got T = {T}")
        # the positions [B, T] carry the batch axis: position_embedding(arange(T)) [T, d]
        # broadcast over the batch would sum the samples' gradients before curvature capture
        # (per-sample statistics) sees them
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        h = self.token_embedding(tokens) + self.position_embedding(positions)  # [B, T, d]
        # additive causal mask [T, T]: -inf above the diagonal (a future position)
        mask = torch.full((T, T), float("-inf"), device=tokens.device, dtype=h.dtype).triu(1)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h)).transpose(1, 2)  # [B, T, V] -> [B, V, T]


class ResidualBlock(nn.Module):
    """The basic ResNet block (He et al. 2016) with batch normalization.

    ``x [B, c_in, H, W]`` → ``ReLU(BN(conv3×3(ReLU(BN(conv3×3/s(x))))) + shortcut(x))``
    ``[B, c_out, H/s, W/s]``; the shortcut is the identity when the shape is unchanged,
    else a 1×1 convolution with stride ``s`` and a batch norm. The convolutions have no
    bias: the batch norm after each cancels one (its gradient would be identically zero).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, c_in, H, W]`` → ``[B, c_out, ⌈H/s⌉, ⌈W/s⌉]``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))
