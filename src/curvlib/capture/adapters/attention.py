"""``nn.MultiheadAttention``: the packed q/k/v input projection as one Linear-like block.

The module applies its projections functionally (``F.multi_head_attention_forward``), so
no forward hook of a submodule sees them: its ``out_proj`` (an ``nn.Linear``) is never
called as a module, and ``in_proj_weight`` is a bare parameter.  During capture the adapter
therefore replaces the module's forward by :meth:`MultiheadAttentionAdapter.forward_with_capture`,
which computes the same function (masks, ``is_causal``, ``key_padding_mask``,
``add_bias_kv``, ``add_zero_attn``, dropout, ``need_weights``, ``batch_first`` either way)
with the projections written out:

* the input projection [q; k; v] = W_in x + b_in is the block of this adapter, W̄ =
  [in_proj_weight, in_proj_bias] ``[3E, E+1]``.  In self-attention (query, key and value
  the same tensor, as in ``nn.TransformerEncoderLayer``) it is one Linear use on the
  sequence, g = [∂q; ∂k; ∂v]; with different query and key/value (cross-attention) each
  distinct input is its own use, its g zero on the rows of the other projections;
* ``out_proj`` is called as a module, so the ``linear`` adapter captures it as the
  separate Linear layer it is.

Outside capture the module runs torch's own implementation.  Not supported (excluded with
the reason): separate q/k/v weights (``kdim``/``vdim`` ≠ ``embed_dim``); ``bias_k``/``bias_v``
of ``add_bias_kv=True`` are left out of the curvature (they are still used in the forward).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from curvlib.capture.adapters.base import UseCapture
from curvlib.capture.adapters.linear import AffineAdapter
from curvlib.errors import ShapeError, UnsupportedLayerError
from curvlib.linalg.geometry import Geometry

__all__ = ["MultiheadAttentionAdapter"]


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask (True = not allowed) as an additive float mask (−inf), as torch does."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class MultiheadAttentionAdapter(AffineAdapter):
    """``nn.MultiheadAttention``: W̄ = [in_proj_weight, in_proj_bias] ``[3E, E+1]`` (module docstring)."""

    module_types = (nn.MultiheadAttention,)
    capture_via = "forward"

    @classmethod
    def _trainable(cls, module: nn.Module) -> bool:
        w = getattr(module, "in_proj_weight", None)
        return isinstance(w, torch.Tensor) and w.requires_grad

    @classmethod
    def excluded_parameters(cls, module: nn.Module, *, name: str = "") -> dict[str, str]:
        out = {}
        for pname in ("bias_k", "bias_v"):
            p = getattr(module, pname, None)
            if isinstance(p, torch.Tensor) and p.requires_grad:
                out[pname] = f"added key/value bias of MultiheadAttention {name!r} (add_bias_kv=True) is not adapted"
        b, w = getattr(module, "in_proj_bias", None), getattr(module, "in_proj_weight", None)
        if isinstance(b, torch.Tensor) and b.requires_grad and not (isinstance(w, torch.Tensor) and w.requires_grad):
            out["in_proj_bias"] = f"in_proj_bias of MultiheadAttention {name!r} whose in_proj_weight is frozen"
        return out

    def _check_module(self) -> None:
        if not self.module._qkv_same_embed_dim:
            raise UnsupportedLayerError(
                f"{self._label()}: kdim/vdim ≠ embed_dim (separate q/k/v projection weights) is not supported"
            )
        super()._check_module()

    @property
    def has_bias(self) -> bool:
        b = self.module.in_proj_bias
        return isinstance(b, torch.Tensor) and b.requires_grad

    def params(self) -> list[torch.Tensor]:
        mod = self.module
        return [mod.in_proj_weight, mod.in_proj_bias] if self.has_bias else [mod.in_proj_weight]

    @property
    def in_features(self) -> int:
        return int(self.module.embed_dim)

    @property
    def g_dim(self) -> int:
        return 3 * int(self.module.embed_dim)

    def _weight_to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    # -- the forward ----------------------------------------------------------------------------
    def _uses(self, inputs: Sequence[torch.Tensor], projections: Sequence[torch.Tensor]) -> list[UseCapture]:
        """One use per distinct input tensor among (query, key, value)."""
        E = self.in_features
        groups: list[tuple[torch.Tensor, list[int]]] = []
        for j, x in enumerate(inputs):
            for x0, idx in groups:
                if x is x0:
                    idx.append(j)
                    break
            else:
                groups.append((x, [j]))
        uses = []
        for x, idx in groups:
            xd = x.detach()
            m, T = xd.shape[:2]
            outs = tuple(projections[j] for j in idx)

            def columns(grads: Sequence[torch.Tensor], idx=idx, m=m, T=T) -> torch.Tensor:
                parts = [grads[idx.index(j)] if j in idx else grads[0].new_zeros(m, T, E) for j in range(3)]
                return torch.cat(parts, dim=-1)

            uses.append(UseCapture(self._rows(xd), outs, Geometry.sequence(T), columns))
        return uses

    def forward_with_capture(
        self,
        report: Callable[[list[UseCapture]], None],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward`` with the input projection reported as uses."""
        mod = self.module
        if query.dim() != 3:
            raise ShapeError(f"{self._label()}: expected batched inputs (3 axes), got a query of shape {list(query.shape)}")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch's MultiheadAttention)")
        # batch first, keeping identities (self-attention passes one tensor three times)
        seen: dict[int, torch.Tensor] = {}
        q_in, k_in, v_in = (
            seen.setdefault(id(t), t if mod.batch_first else t.transpose(0, 1)) for t in (query, key, value)
        )
        m, L, E = q_in.shape
        H = mod.num_heads
        hd = E // H
        W, b = mod.in_proj_weight, mod.in_proj_bias
        bq, bk, bv = b.split(E) if b is not None else (None, None, None)
        Wq, Wk, Wv = W.split(E)
        q, k, v = F.linear(q_in, Wq, bq), F.linear(k_in, Wk, bk), F.linear(v_in, Wv, bv)
        report(self._uses((q_in, k_in, v_in), (q, k, v)))

        kpm = _float_mask(key_padding_mask, q.dtype)
        am = _float_mask(attn_mask, q.dtype)
        if mod.bias_k is not None and mod.bias_v is not None:
            k = torch.cat([k, mod.bias_k.reshape(1, 1, E).expand(m, 1, E)], dim=1)
            v = torch.cat([v, mod.bias_v.reshape(1, 1, E).expand(m, 1, E)], dim=1)
            am = None if am is None else F.pad(am, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        q = q.reshape(m, L, H, hd).transpose(1, 2)
        k = k.reshape(m, -1, H, hd).transpose(1, 2)
        v = v.reshape(m, -1, H, hd).transpose(1, 2)
        if mod.add_zero_attn:
            k = torch.cat([k, k.new_zeros(m, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(m, H, 1, hd)], dim=2)
            am = None if am is None else F.pad(am, (0, 1))
            kpm = None if kpm is None else F.pad(kpm, (0, 1))
        S = k.shape[2]
        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)  # [m, H, L, S]
        if is_causal and key_padding_mask is None and not need_weights:
            # torch drops attn_mask for the is_causal hint here (scaled_dot_product_attention's causal mask)
            causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        else:
            if am is not None:
                scores = scores + (am.reshape(m, H, L, S) if am.dim() == 3 else am)
            if kpm is not None:
                scores = scores + kpm.reshape(m, 1, 1, S)
        weights = torch.softmax(scores, dim=-1)
        if mod.training and mod.dropout > 0.0:
            weights = F.dropout(weights, p=mod.dropout)
        out = (weights @ v).transpose(1, 2).reshape(m, L, E)
        out = mod.out_proj(out)  # a module call: the out_proj's own adapter sees it
        if not mod.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, (weights.mean(dim=1) if average_attn_weights else weights)
