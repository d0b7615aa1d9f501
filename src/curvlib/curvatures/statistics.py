"""The per-layer statistics a curvature operator captures and approximators consume."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LayerStatistics"]


@dataclass(frozen=True)
class LayerStatistics:
    """Per-sample quantities of one layer block.

    The exact (sampled) block they define is

        F_ii = scale · Σ_b Σ_c Σ_{t,t'} ā_{b,t} ā_{b,t'}ᵀ ⊗ g_{b,c,t} g_{b,c,t'}ᵀ      (3.18), (3.28)

    (for a Linear layer there is one position, T = 1).

    Attributes:
        a: activations ā (with a trailing 1 when the layer has a bias).
            Linear: ``[m, d_a]``; conv: ``[m, T, d_a]`` (unfolded patches, T positions
            in row-major order t = row·W_out + col).
        g: pre-activation gradients, one per back-propagated column c (an MC target
            sample, or a column of a square root of the loss Hessian), with the loss's
            batch reduction undone.  Linear: ``[m, c, d_g]``; conv: ``[m, c, T, d_g]``.
        scale: the factor in front of the sum: ``1/(m·S)`` for ``fisher`` with S
            samples, ``1/m`` for ``empirical_fisher`` and ``ggn``.
        spatial_shape: ``(H_out, W_out)`` of a conv layer's output; ``None`` for Linear.
        kernel_size: ``(k_h, k_w)`` of a conv layer (default band radius); ``None`` for Linear.
        has_bias: whether ā carries the trailing 1.
    """

    a: torch.Tensor
    g: torch.Tensor
    scale: float
    spatial_shape: tuple[int, int] | None = None
    kernel_size: tuple[int, int] | None = None
    has_bias: bool = True

    @property
    def is_conv(self) -> bool:
        return self.spatial_shape is not None

    @property
    def m(self) -> int:
        return self.a.shape[0]

    @property
    def c(self) -> int:
        return self.g.shape[1]

    @property
    def T(self) -> int:
        return self.a.shape[1] if self.is_conv else 1

    @property
    def a_dim(self) -> int:
        return self.a.shape[-1]

    @property
    def g_dim(self) -> int:
        return self.g.shape[-1]
