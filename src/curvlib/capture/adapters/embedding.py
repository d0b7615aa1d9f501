"""``nn.Embedding``: a Linear layer on one-hot inputs, W̄ = weightᵀ ``[embedding_dim, num_embeddings]``.

Looking up token v is multiplying weightᵀ by the one-hot vector e_v, so an embedding is a
Linear layer without bias whose activation rows are one-hot: ā_t = e_{token_t}
(:class:`~curvlib.linalg.rows.OneHotRows` — never formed densely), g_t = ∂/∂y_t.  The
tokens of a sample are its positions (a sequence).  KFAC's A = (1/m)Σ ā āᵀ is then
diagonal: the token counts.  A ``padding_idx`` token gets no gradient in torch; its row is
all zero here (index −1).

Tied to an output layer (``head.weight = embedding.weight``), the embedding is a second use
of the head's weight, entering its W̄ transposed (:mod:`curvlib.capture.layout`).

Not supported (the module's parameters are excluded with the reason): ``max_norm`` (the
forward renormalizes rows of the weight in place), ``scale_grad_by_freq`` (gradients are
rescaled by in-batch token counts, so they are not per-sample) and ``sparse=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from curvlib.capture.adapters.base import LayerAdapter, UseCapture
from curvlib.errors import ShapeError, UnsupportedLayerError
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.rows import OneHotRows

__all__ = ["EmbeddingAdapter"]


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: W̄ = weightᵀ ``[d, V]``, ā_t = e_{token_t} (module docstring)."""

    module_types = (nn.Embedding,)

    def _check_module(self) -> None:
        super()._check_module()
        mod = self.module
        for flag, why in (
            (mod.max_norm is not None, "max_norm renormalizes rows of the weight in place during the forward"),
            (bool(mod.scale_grad_by_freq), "scale_grad_by_freq rescales gradients by in-batch token counts (not per sample)"),
            (bool(mod.sparse), "sparse=True gives sparse gradients"),
        ):
            if flag:
                raise UnsupportedLayerError(f"{self._label()}: {why}")

    def params(self) -> list[torch.Tensor]:
        return [self.module.weight]

    @property
    def a_dim(self) -> int:
        return int(self.module.num_embeddings)

    @property
    def g_dim(self) -> int:
        return int(self.module.embedding_dim)

    def _to_matrix(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        return pieces[0].T

    def _from_matrix(self, Wbar: torch.Tensor) -> list[torch.Tensor]:
        return [Wbar.T]

    def capture(self, args: tuple, kwargs: dict[str, Any], output: Any) -> list[UseCapture]:
        """token indices ``[*]`` with the samples on ``batch_dim`` -> one use: one-hot rows
        ``[m, T, V]`` (T the product of the other axes), g ``[m, T, d]``."""
        idx = args[0] if args else kwargs.get("input")
        if not isinstance(idx, torch.Tensor) or idx.is_floating_point() or idx.ndim < 1:
            raise ShapeError(f"{self._label()}: expected integer token indices [m, *positions], got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {list(getattr(idx, 'shape', ()))}")
        ib = self._batch_first(idx.detach())
        m = ib.shape[0]
        T, pos = self._positions(ib, 0)
        tokens = ib.reshape(m, T).long()
        if self.module.padding_idx is not None:
            tokens = torch.where(tokens == self.module.padding_idx, torch.full_like(tokens, -1), tokens)
        rows = OneHotRows(tokens, self.a_dim, dtype=self.module.weight.dtype)
        d = self.g_dim

        def columns(grads: Sequence[torch.Tensor]) -> torch.Tensor:
            return self._batch_first(grads[0], "output gradient").reshape(m, T, d)

        return [UseCapture(rows, (output,), Geometry.of_positions(pos), columns, self.batch_dim)]
