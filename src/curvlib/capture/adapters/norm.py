"""Affine parameters of normalization layers: ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm1d/2d/3d``.

A normalization layer computes y = x̂ ⊙ γ + β with x̂ the normalized input and γ, β one
value per feature (LayerNorm/RMSNorm: the normalized shape; GroupNorm/BatchNorm: the
channels).  Its per-sample gradient is

    ∂ℓ_b/∂γ = Σ_t (∂ℓ_b/∂y_t) ⊙ x̂_t,        ∂ℓ_b/∂β = Σ_t ∂ℓ_b/∂y_t

(t over every position and, for LayerNorm, nothing else), which is not an outer product
g āᵀ: x̂ differs per feature.  The block is small (2·C entries), so it is kept **exact**
through a documented structure: W̄ = [γ; β] is one column ``[g_dim, 1]`` (g_dim = C, or 2·C
with β), the activation rows are the constant ā = [1] (one position), and the "columns" g
are the per-sample gradients themselves.  Then the block F_ii = scale·Σ_n g_n g_nᵀ = 1 ⊗ G
is exactly what every approximator sees: KFAC's A = [1], G = F_ii (KFAC is exact), KPSVD
and the dampings treat it as the single Kronecker product it is.  Cost: G is
(2C)² — fine for the widths of norms (C ≤ a few thousand).

x̂ is computed from the module's input as the module does (its ``eps``; BatchNorm with the
batch's statistics in training mode — which couples the samples, see
:class:`~curvlib.capture.adapters.base.BatchCouplingWarning` — and the running statistics
in eval mode).  Only trainable γ/β enter W̄ (a frozen one is a constant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from curvlib.capture.adapters.base import LayerAdapter, UseCapture
from curvlib.errors import ShapeError, UnsupportedLayerError
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import DenseRows

__all__ = ["BatchNormAdapter", "GroupNormAdapter", "LayerNormAdapter", "NormAdapter", "RMSNormAdapter"]


class NormAdapter(LayerAdapter):
    """W̄ = [γ; β] ``[g_dim, 1]``, ā = [1], g = the per-sample gradient (module docstring).

    Subclasses implement :meth:`normalized` (x̂ from the batch-first input) and
    :meth:`feature_axes` (the axes of the batch-first output γ and β run over).
    """

    @classmethod
    def _trainable(cls, module: nn.Module) -> bool:
        return any(isinstance(p, torch.Tensor) and p.requires_grad for p in (getattr(module, "weight", None), getattr(module, "bias", None)))

    def params(self) -> list[torch.Tensor]:
        return [p for p in (getattr(self.module, "weight", None), getattr(self.module, "bias", None))
                if isinstance(p, torch.Tensor) and p.requires_grad]

    def _has(self, which: str) -> bool:
        p = getattr(self.module, which, None)
        return isinstance(p, torch.Tensor) and p.requires_grad

    @property
    def a_dim(self) -> int:
        return 1

    @property
    def g_dim(self) -> int:
        return sum(p.numel() for p in self.params())

    def _to_matrix(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in pieces]).unsqueeze(1)

    def _from_matrix(self, Wbar: torch.Tensor) -> list[torch.Tensor]:
        out, k = [], 0
        for shape in self.piece_shapes():
            n = math.prod(shape)
            out.append(Wbar[k : k + n, 0].reshape(shape))
            k += n
        return out

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ for the batch-first input ``x`` (same shape)."""
        raise NotImplementedError

    def feature_axes(self, ndim: int) -> tuple[int, ...]:
        """The axes of a batch-first tensor of ``ndim`` axes that γ and β run over."""
        raise NotImplementedError

    def capture(self, args: tuple, kwargs: dict[str, Any], output: Any) -> list[UseCapture]:
        """One use without positions: ā = [1], g_n = [Σ g ⊙ x̂; Σ g] ``[g_dim]``."""
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            raise ShapeError(f"{self._label()}: expected a tensor input and output")
        xb = self._batch_first(x.detach())
        xh = self.normalized(xb)
        m = xb.shape[0]
        feat = self.feature_axes(xb.ndim)
        others = [i for i in range(1, xb.ndim) if i not in feat]
        weight, bias = self._has("weight"), self._has("bias")

        def per_sample(t: torch.Tensor) -> torch.Tensor:  # [m, *] -> [m, C]
            t = t.sum(dim=others) if others else t
            return t.reshape(m, -1)

        def columns(grads: Sequence[torch.Tensor]) -> torch.Tensor:
            gy = self._batch_first(grads[0], "output gradient")
            parts = ([per_sample(gy * xh)] if weight else []) + ([per_sample(gy)] if bias else [])
            return torch.cat(parts, dim=1).unsqueeze(1)

        rows = DenseRows(xb.new_ones(m, 1, 1))
        return [UseCapture(rows, (output,), Geometry.none(), columns, self.batch_dim)]


class LayerNormAdapter(NormAdapter):
    """``nn.LayerNorm``: x̂ over the last ``len(normalized_shape)`` axes; γ, β over them."""

    module_types = (nn.LayerNorm,)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        mod = self.module
        return F.layer_norm(x, mod.normalized_shape, None, None, mod.eps)

    def feature_axes(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim - len(self.module.normalized_shape), ndim))


class RMSNormAdapter(NormAdapter):
    """``nn.RMSNorm``: x̂ = x / rms over the last ``len(normalized_shape)`` axes; γ over them."""

    module_types = (nn.RMSNorm,)

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        mod = self.module
        return F.rms_norm(x, mod.normalized_shape, None, mod.eps)

    def feature_axes(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim - len(self.module.normalized_shape), ndim))


class GroupNormAdapter(NormAdapter):
    """``nn.GroupNorm``: x̂ per sample and channel group; γ, β per channel (axis 1)."""

    module_types = (nn.GroupNorm,)

    def _check_module(self) -> None:
        super()._check_module()
        if self.batch_dim != 0:
            raise UnsupportedLayerError(f"{self._label()}: GroupNorm takes the samples on axis 0, not {self.batch_dim}")

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        mod = self.module
        return F.group_norm(x, mod.num_groups, None, None, mod.eps)

    def feature_axes(self, ndim: int) -> tuple[int, ...]:
        return (1,)


class BatchNormAdapter(NormAdapter):
    """``nn.BatchNorm1d/2d/3d``: x̂ with the batch's statistics in training mode (or without
    running statistics), the running statistics in eval mode; γ, β per channel (axis 1)."""

    module_types = (nn.modules.batchnorm._BatchNorm,)

    def _check_module(self) -> None:
        super()._check_module()
        if self.batch_dim != 0:
            raise UnsupportedLayerError(f"{self._label()}: BatchNorm takes the samples on axis 0, not {self.batch_dim}")

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        mod = self.module
        batch_stats = mod.training or (mod.running_mean is None and mod.running_var is None)
        shape = [1, -1] + [1] * (x.ndim - 2)
        if batch_stats:
            dims = [0, *range(2, x.ndim)]
            mean = x.mean(dim=dims, keepdim=True)
            var = x.var(dim=dims, unbiased=False, keepdim=True)
        else:
            mean, var = mod.running_mean.reshape(shape), mod.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + mod.eps)

    def feature_axes(self, ndim: int) -> tuple[int, ...]:
        return (1,)
