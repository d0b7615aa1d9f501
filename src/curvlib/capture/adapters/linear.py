"""``nn.Linear`` on inputs ``[m, *positions, d_in]``: W̄ = [weight, bias] ``[d_out, d_in+1]``, ā = [x; 1].

A Linear layer applied to a batch of sequences (tokens, patches: ``[m, T, d_in]``, or any
number of leading position axes) shares its weight over the positions; they form the
use's geometry (a sequence for one axis, a grid for more).  Only trainable parameters
enter W̄: a bias with ``requires_grad=False`` is a constant and the layer is treated as
bias-free; a trainable bias of a frozen weight is excluded (a bias-only block is not
supported).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from curvlib.capture.adapters.base import LayerAdapter, UseCapture, append_one
from curvlib.errors import ShapeError
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import DenseRows

__all__ = ["AffineAdapter", "LinearAdapter"]


class AffineAdapter(LayerAdapter):
    """Shared parts of the layers with W̄ = [W, b] (Linear, convolutions): the trainable
    bias is W̄'s last column, and a frozen weight with a trainable bias is excluded."""

    @property
    def has_bias(self) -> bool:
        b = getattr(self.module, "bias", None)
        return isinstance(b, torch.Tensor) and b.requires_grad

    @classmethod
    def excluded_parameters(cls, module: nn.Module, *, name: str = "") -> dict[str, str]:
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(b, torch.Tensor) and b.requires_grad and not (isinstance(w, torch.Tensor) and w.requires_grad):
            return {"bias": f"bias of {type(module).__name__} {name!r} whose weight is frozen (a bias-only block is not supported)"}
        return {}

    def params(self) -> list[torch.Tensor]:
        return [self.module.weight, self.module.bias] if self.has_bias else [self.module.weight]

    @property
    @abc.abstractmethod
    def in_features(self) -> int:
        """Columns of W (d_in; c_in·prod(kernel)/groups for a convolution)."""

    @property
    def a_dim(self) -> int:
        return self.in_features + int(self.has_bias)

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _matrix_to_weight(self, W: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return W.reshape(shape)

    def _to_matrix(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        W = self._weight_to_matrix(pieces[0])
        if self.has_bias:
            W = torch.cat([W, pieces[1].reshape(-1, 1)], dim=1)
        return W

    def _from_matrix(self, Wbar: torch.Tensor) -> list[torch.Tensor]:
        shapes = self.piece_shapes()
        out = [self._matrix_to_weight(Wbar[:, : self.in_features], shapes[0])]
        if self.has_bias:
            out.append(Wbar[:, -1].reshape(shapes[1]))
        return out

    def _rows(self, a: torch.Tensor) -> DenseRows:
        """a ``[m, T, in_features]`` -> ā (with the trailing 1 when the layer has a bias)."""
        return DenseRows(append_one(a) if self.has_bias else a)


class LinearAdapter(AffineAdapter):
    """``nn.Linear``: W̄ = [weight, bias] ``[d_out, d_in+1]``, ā = [input; 1] at every position."""

    module_types = (nn.Linear,)

    @property
    def in_features(self) -> int:
        return int(self.module.weight.shape[1])

    @property
    def g_dim(self) -> int:
        return int(self.module.weight.shape[0])

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def capture(self, args: tuple, kwargs: dict[str, Any], output: Any) -> list[UseCapture]:
        """input ``[*, d_in]`` with the samples on ``batch_dim`` -> one use: ā ``[m, T, a_dim]``,
        T the product of the other leading axes (1 for ``[m, d_in]``)."""
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[-1] != self.in_features:
            raise ShapeError(
                f"{self._label()}: expected an input [m, *positions, {self.in_features}] with the samples on axis "
                f"{self.batch_dim}, got {list(getattr(x, 'shape', ()))}"
            )
        xb = self._batch_first(x.detach())
        m = xb.shape[0]
        T, pos = self._positions(xb, 1)
        rows = self._rows(xb.reshape(m, T, self.in_features))
        d_out = self.g_dim

        def columns(grads: Sequence[torch.Tensor]) -> torch.Tensor:
            return self._batch_first(grads[0], "output gradient").reshape(m, T, d_out)

        return [UseCapture(rows, (output,), Geometry.of_positions(pos), columns, self.batch_dim)]
