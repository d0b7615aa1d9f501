"""The activation side of layer statistics: one row ā_{b,t} ``[d]`` per sample b and position t.

Every consumer of layer statistics (KFAC factors, Z-products, the Jacobian products of the
curvature operators, the exact block) touches the activations only through the
operations of :class:`Rows`, so a structured activation needs no special case anywhere:

* :class:`DenseRows` holds a tensor ``[m, T, d]`` (Linear inputs, unfolded conv patches);
* :class:`OneHotRows` holds token indices ``[m, T]`` of one-hot rows of width d (an
  embedding's input: ā_{b,t} = e_{idx}); a negative index is an all-zero row (an
  embedding's ``padding_idx``, which gets no gradient).  The one-hot matrix ``[m, T, d]``
  is never formed (:meth:`Rows.dense` excepted): its products are gathers and scatters,
  and Σ ā āᵀ is diagonal (token counts).

=====================  ===========================  =================================
method                 computes                     shapes
=====================  ===========================  =================================
``gram(w)``            Σ_{b,t} w_{k,b,t} ā āᵀ        ``w [k, m, T]`` -> ``[k, d, d]``
``apply(X)``           X ā_{b,t}                     ``X [k, r, d]`` -> ``[k, m, T, r]``
``outer(G)``           Σ_{b,t} ā_{b,t} G_{b,t}ᵀ      ``G [m, T, r]`` -> ``[d, r]``
``sample_outer(G)``    Σ_t G_{b,c,t} ā_{b,t}ᵀ        ``G [m, c, T, r]`` -> ``[m, c, r, d]``
``quadratic(U)``       ā_{b,t}ᵀ U_k ā_{b,t}          ``U [k, d, d]`` -> ``[k, m, T]``
``cross(other)``       ā_{b,t}ᵀ ā'_{b',t'}           -> ``[m, T, m', T']``
``position_sum()``     Σ_t ā_{b,t}                   -> :class:`DenseRows` ``[m, 1, d]``
=====================  ===========================  =================================
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError

__all__ = ["DenseRows", "OneHotRows", "Rows", "as_rows"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: a symmetric product narrower than this is one GEMM (symmetrized); a wider one is split in two
#: (measured at n = 512 rows on one CPU thread: 192 ran fastest of 128–384 on the MNIST
#: auto-encoders' widths 251–1001)
SYMMETRIC_BLOCKS_FROM = 192


def split_symmetric(t: torch.Tensor, d: int) -> bool:
    """Whether a symmetric product or quadratic form of width ``d`` on ``t``'s device is split
    in blocks (:func:`symmetric_product`): from :data:`SYMMETRIC_BLOCKS_FROM` on, on the CPU
    only.  The blocking was measured on the CPU, where it saves multiply-adds at the price of a
    few block copies; on an accelerator each block is a kernel launch (15 GEMMs, 8
    symmetrizations and the copies for d = 1000 instead of one GEMM and one symmetrization),
    and at these widths the launches cost more than the multiply-adds they save."""
    return d >= SYMMETRIC_BLOCKS_FROM and t.device.type == "cpu"


def symmetric_product(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """L @ R for a product known to be symmetric (Lᵀ = D R for a diagonal D): ``L [..., d, n]``,
    ``R [n, d]`` -> ``[..., d, d]``, **exactly** symmetric (Mᵢⱼ = Mⱼᵢ bitwise).

    torch has no SYRK.  With d split in two, the block above the diagonal is a GEMM, the one
    below is its transpose, and the two diagonal blocks are symmetric products again, down to
    blocks narrower than :data:`SYMMETRIC_BLOCKS_FROM`, each one GEMM made symmetric as
    (M + Mᵀ)/2: 5/8 of one GEMM's multiply-adds at two levels (d = 785: 4.7 ms against 5.7 ms
    for one level and a symmetrization of the whole, n = 512, one CPU thread).  On an
    accelerator it is one GEMM made symmetric (:func:`split_symmetric`).  Callers need no
    symmetrization of their own.
    """
    d = R.shape[1]
    if not split_symmetric(R, d):
        M = L @ R
        return (M + M.mT).mul_(0.5)
    h = d // 2
    top = L[..., :h, :]
    upper = top @ R[:, h:]
    out = torch.empty(*L.shape[:-2], d, d, dtype=upper.dtype, device=upper.device)
    out[..., :h, :h] = symmetric_product(top, R[:, :h])
    out[..., :h, h:] = upper
    out[..., h:, :h] = upper.mT
    out[..., h:, h:] = symmetric_product(L[..., h:, :], R[:, h:])
    return out


class Rows(abc.ABC):
    """Activation rows ā_{b,t} ``[d]`` of m samples at T positions (module docstring)."""

    # -- description ---------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int, int]:
        """``(m, T, d)``."""

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    @property
    def m(self) -> int:
        return self.shape[0]

    @property
    def T(self) -> int:
        return self.shape[1]

    @property
    def dim(self) -> int:
        return self.shape[2]

    #: :meth:`gram` without weights is exactly symmetric (bitwise); its consumers then need no
    #: symmetrization of their own (:func:`curvlib.curvatures.factors.kfac_factors`)
    exact_symmetric_gram: bool = False

    # -- products ------------------------------------------------------------------------------
    @abc.abstractmethod
    def dense(self) -> torch.Tensor:
        """The rows as a tensor ``[m, T, d]``."""

    @abc.abstractmethod
    def gram(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_{b,t} ā āᵀ ``[d, d]``, or Σ_{b,t} w_{k,b,t} ā āᵀ ``[k, d, d]`` for ``weights [k, m, T]``."""

    @abc.abstractmethod
    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """X_k ā_{b,t} for every row: ``X [k, r, d]`` -> ``[k, m, T, r]``."""

    @abc.abstractmethod
    def outer(self, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Σ_{b,t} ā_{b,t} G_{b,t}ᵀ: ``G [m, T, r]`` -> ``[d, r]`` (written into ``out`` if given)."""

    @abc.abstractmethod
    def sample_outer(self, G: torch.Tensor) -> torch.Tensor:
        """Per sample and column, Σ_t G_{b,c,t} ā_{b,t}ᵀ: ``G [m, c, T, r]`` -> ``[m, c, r, d]``."""

    @abc.abstractmethod
    def quadratic(self, U: torch.Tensor) -> torch.Tensor:
        """ā_{b,t}ᵀ U_k ā_{b,t}: ``U [k, d, d]`` -> ``[k, m, T]``."""

    @abc.abstractmethod
    def cross(self, other: Rows) -> torch.Tensor:
        """ā_{b,t}ᵀ ā'_{b',t'}: ``[m, T, m', T']``."""

    @abc.abstractmethod
    def position_sum(self) -> DenseRows:
        """Σ_t ā_{b,t}: ``[m, 1, d]``."""

    # -- copies ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def select(self, b0: int, b1: int) -> Rows:
        """The rows of samples b0 … b1 − 1."""

    @abc.abstractmethod
    def pad(self, before: int, after: int) -> Rows:
        """Rows of width ``before + d + after``: ā padded with zeros on both sides."""

    @abc.abstractmethod
    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Rows: ...

    @abc.abstractmethod
    def num_nonfinite(self) -> int:
        """How many entries are NaN or ±inf (one host synchronisation)."""

    @property
    @abc.abstractmethod
    def stored_values(self) -> list[torch.Tensor]:
        """The floating-point tensors the rows are stored in (those that can hold non-finite entries)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Plain containers (``torch.load(weights_only=True)`` compatible)."""

    @staticmethod
    def from_state_dict(data: Mapping[str, Any]) -> Rows:
        """Inverse of :meth:`state_dict` for either kind of rows."""
        kind = data.get("type")
        if kind == "dense":
            return DenseRows(data["a"])
        if kind == "one_hot":
            return OneHotRows(data["index"], int(data["dim"]), dtype=getattr(torch, str(data["dtype"])))
        raise ConfigError(f"Rows.from_state_dict: unknown rows type {kind!r}; expected 'dense' or 'one_hot'")

    def __repr__(self) -> str:
        m, T, d = self.shape
        return f"{type(self).__name__}(m={m}, T={T}, d={d}, dtype={self.dtype})"


class DenseRows(Rows):
    """Rows held as a tensor ``a [m, T, d]``.

    Args:
        a: ``[m, T, d]``, floating point.
    """

    exact_symmetric_gram = True  # symmetric_product

    def __init__(self, a: torch.Tensor) -> None:
        if not isinstance(a, torch.Tensor) or a.ndim != 3:
            raise ShapeError(f"DenseRows: expected a tensor [m, T, d], got {getattr(a, 'shape', type(a).__name__)}")
        if not a.is_floating_point():
            raise DTypeDeviceError(f"DenseRows: expected floating-point rows, got {a.dtype}")
        self.a = a

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.a.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def _flat(self) -> torch.Tensor:
        return self.a.reshape(-1, self.a.shape[-1])

    def dense(self) -> torch.Tensor:
        return self.a

    def gram(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        a2 = self._flat()
        if weights is None:
            return symmetric_product(a2.T, a2)
        return (a2.T * weights.reshape(weights.shape[0], 1, -1)) @ a2

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        m, T, _ = self.shape
        return torch.matmul(self._flat(), X.transpose(-1, -2)).reshape(X.shape[0], m, T, X.shape[-2])

    def outer(self, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        G2 = G.reshape(-1, G.shape[-1])
        a2 = self._flat()
        if out is None or G2.requires_grad or a2.requires_grad:
            return a2.T @ G2
        return torch.mm(a2.T, G2, out=out)

    def sample_outer(self, G: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bctr,btd->bcrd", G, self.a)

    def quadratic(self, U: torch.Tensor) -> torch.Tensor:
        m, T, d = self.shape
        a2 = self._flat()
        return ((a2 @ U) * a2).sum(-1).reshape(U.shape[0], m, T)

    def cross(self, other: Rows) -> torch.Tensor:
        if isinstance(other, OneHotRows):
            return other.cross(self).permute(2, 3, 0, 1)
        return torch.einsum("bta,dua->btdu", self.a, other.dense())

    def position_sum(self) -> DenseRows:
        return DenseRows(self.a.sum(1, keepdim=True))

    def select(self, b0: int, b1: int) -> DenseRows:
        return DenseRows(self.a[b0:b1])

    def pad(self, before: int, after: int) -> DenseRows:
        return self if before == after == 0 else DenseRows(F.pad(self.a, (int(before), int(after))))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> DenseRows:
        return DenseRows(self.a.to(device=device, dtype=dtype))

    def num_nonfinite(self) -> int:
        return int((~torch.isfinite(self.a)).sum())

    @property
    def stored_values(self) -> list[torch.Tensor]:
        return [self.a]

    def state_dict(self) -> dict[str, Any]:
        return {"type": "dense", "a": self.a}


class OneHotRows(Rows):
    """One-hot rows ā_{b,t} = e_{index[b, t]} of width ``dim`` (all zero for a negative index).

    Args:
        index: ``[m, T]`` integer indices in [0, dim) or negative (a zero row).
        dim: d, the width of a row (an embedding's number of tokens).
        dtype: the floating dtype of every product.
    """

    exact_symmetric_gram = True  # diagonal

    def __init__(self, index: torch.Tensor, dim: int, *, dtype: torch.dtype) -> None:
        if not isinstance(index, torch.Tensor) or index.ndim != 2 or index.is_floating_point() or index.is_complex():
            raise ShapeError(f"OneHotRows: expected integer indices [m, T], got {getattr(index, 'dtype', None)} "
                             f"{list(getattr(index, 'shape', ()))}")
        if not dtype.is_floating_point:
            raise DTypeDeviceError(f"OneHotRows: expected a floating dtype, got {dtype}")
        dim = int(dim)
        if index.numel() and int(index.max()) >= dim:
            raise ShapeError(f"OneHotRows: indices must be < dim = {dim}, got {int(index.max())}")
        self.index = index.long()
        self.width = dim
        self._dtype = dtype
        self._valid = self.index >= 0
        self._safe = self.index.clamp_min(0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.index.shape[0], self.index.shape[1], self.width)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.index.device

    def _mask(self) -> torch.Tensor:
        return self._valid.to(self._dtype)

    def dense(self) -> torch.Tensor:
        out = torch.zeros(*self.index.shape, self.width, dtype=self._dtype, device=self.device)
        return out.scatter_(-1, self._safe.unsqueeze(-1), self._mask().unsqueeze(-1))

    def gram(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        idx = self._safe.reshape(-1)
        if weights is None:
            counts = torch.zeros(self.width, dtype=self._dtype, device=self.device)
            counts.index_add_(0, idx, self._mask().reshape(-1))
            return torch.diag(counts)
        w = weights.reshape(weights.shape[0], -1) * self._mask().reshape(1, -1)
        diag = torch.zeros(weights.shape[0], self.width, dtype=self._dtype, device=self.device)
        diag.index_add_(1, idx, w)
        return torch.diag_embed(diag)

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        cols = X[:, :, self._safe]  # [k, r, m, T]
        return cols.permute(0, 2, 3, 1) * self._mask()[None, :, :, None]

    def outer(self, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        G2 = G.reshape(-1, G.shape[-1]) * self._mask().reshape(-1, 1)
        res = G2.new_zeros(self.width, G2.shape[1]) if out is None else out.zero_()
        return res.index_add_(0, self._safe.reshape(-1), G2)

    def sample_outer(self, G: torch.Tensor) -> torch.Tensor:
        m, c, T, r = G.shape
        Gt = (G * self._mask()[:, None, :, None]).permute(0, 1, 3, 2)  # [m, c, r, T]
        out = G.new_zeros(m, c, r, self.width)
        index = self._safe[:, None, None, :].expand(m, c, r, T)
        return out.scatter_add_(3, index, Gt.contiguous())

    def quadratic(self, U: torch.Tensor) -> torch.Tensor:
        diag = U.diagonal(dim1=-2, dim2=-1)  # [k, d]
        return diag[:, self._safe] * self._mask()[None]

    def cross(self, other: Rows) -> torch.Tensor:
        if isinstance(other, OneHotRows):
            same = self.index[:, :, None, None] == other.index[None, None, :, :]
            both = self._valid[:, :, None, None] & other._valid[None, None, :, :]
            return (same & both).to(self._dtype)
        d = other.dense()  # [m', T', d]: ā_{b,t}ᵀ ā'_{b',t'} = ā'_{b',t'}[index[b, t]]
        return d[:, :, self._safe].permute(2, 3, 0, 1) * self._mask()[:, :, None, None]

    def position_sum(self) -> DenseRows:
        out = torch.zeros(self.index.shape[0], self.width, dtype=self._dtype, device=self.device)
        out.scatter_add_(1, self._safe, self._mask())
        return DenseRows(out.unsqueeze(1))

    def select(self, b0: int, b1: int) -> OneHotRows:
        return OneHotRows(self.index[b0:b1], self.width, dtype=self._dtype)

    def pad(self, before: int, after: int) -> OneHotRows:
        idx = torch.where(self._valid, self.index + int(before), self.index)
        return OneHotRows(idx, self.width + int(before) + int(after), dtype=self._dtype)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> OneHotRows:
        return OneHotRows(self.index.to(device=device), self.width, dtype=self._dtype if dtype is None else dtype)

    def num_nonfinite(self) -> int:
        return 0

    @property
    def stored_values(self) -> list[torch.Tensor]:
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"type": "one_hot", "index": self.index, "dim": self.width, "dtype": _dtype_name(self._dtype)}


def as_rows(a: Rows | torch.Tensor) -> Rows:
    """``a`` as :class:`Rows`: a tensor ``[m, T, d]`` becomes :class:`DenseRows`."""
    return a if isinstance(a, Rows) else DenseRows(a)
