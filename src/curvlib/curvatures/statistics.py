"""The one representation of a layer block's per-sample statistics, and the products it defines.

Every family (curvature operators, approximators, dampings through their blocks, coarse
spaces) consumes :class:`LayerStatistics`; nothing guesses a layer's kind from tensor
shapes.  A layer block has a matrix W̄ ``[d_g, d_a]`` (DESIGN.md §1) and one or more
**uses** (:class:`Use`): each use u is the weight applied at the positions of a
:class:`~curvlib.linalg.geometry.Geometry` — none, a sequence, an N-D grid — with

* activation rows ā_{u,b,t} (:class:`~curvlib.linalg.rows.Rows`, dense or one-hot)
  ``[m, T_u, d_a]``, and
* back-propagated columns g_{u,b,c,t} ``[m, c, T_u, d_g]`` (one per Monte Carlo target or
  column of a square root of the loss Hessian, the loss's batch reduction undone).

A layer called once on ``[m, d_in]`` has one use without positions; a convolution one use
on its output grid; a Linear layer on tokens ``[m, T, d]`` one use on a sequence; a
module called k times in one forward k uses; a weight tied between an embedding and an
output layer one use per module, the embedding's **transposed** (its own matrix is the
transpose of W̄, and its rows/columns swap roles: ā is ``[m, T, d_g]`` and g
``[m, c, T, d_a]``).  The per-(sample b, column c) gradient of the block is

    D_{b,c} = Σ_u P_u( Σ_t g_{u,b,c,t} ā_{u,b,t}ᵀ )   ``[d_g, d_a]``,   P_u = id or transpose   (3.27)

and the exact sampled block is F_ii = scale · Σ_{b,c} vec(D_{b,c}) vec(D_{b,c})ᵀ (3.18),
(3.28) = scale · J_i J_iᵀ with J_i = [vec(D_1) … vec(D_n)] ``[p_i, n]``, n = m·c pairs
ordered b-major.  The products of this module — :meth:`LayerStatistics.jt`,
:meth:`~LayerStatistics.j`, :meth:`~LayerStatistics.gram`,
:meth:`~LayerStatistics.pair_gradients` — are the only implementation of J_i, J_iᵀ,
J_iᵀJ_i and D_n in curvlib (the curvature operators and the exact block delegate here).

The weight-sharing setting of Eschenhagen et al. (2023) — KFAC-expand or KFAC-reduce —
is not stored: it is an argument of the functions that combine positions
(:mod:`curvlib.curvatures.factors`), so the same captured statistics serve both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.operator import finite_screen, host_values
from curvlib.linalg.rows import Rows, as_rows

__all__ = ["LayerStatistics", "Use"]


@dataclass(frozen=True)
class Use:
    """One use of a layer's weight (module docstring).

    Attributes:
        a: activation rows ``[m, T, d]`` (d = d_a, or d_g when ``transposed``).
        g: back-propagated columns ``[m, c, T, d']`` (d' = d_g, or d_a when ``transposed``).
        geometry: the positions, ``geometry.T == T``.
        transposed: the use's matrix Σ_t g ā ᵀ enters W̄ transposed.
    """

    a: Rows
    g: torch.Tensor
    geometry: Geometry
    transposed: bool = False

    def __post_init__(self) -> None:
        a = as_rows(self.a)
        object.__setattr__(self, "a", a)
        g = self.g
        if not isinstance(g, torch.Tensor) or g.ndim != 4:
            raise ShapeError(f"Use: expected g [m, c, T, d_g], got {list(getattr(g, 'shape', ()))}")
        m, T, _ = a.shape
        if g.shape[0] != m or g.shape[2] != T or T != self.geometry.T:
            raise ShapeError(
                f"Use: expected a [m, T, d_a] and g [m, c, T, d_g] with the same m and T = {self.geometry.T} positions "
                f"of {self.geometry}; got a {list(a.shape)} and g {list(g.shape)}"
            )
        if not g.is_floating_point() or g.dtype != a.dtype or g.device != a.device:
            raise DTypeDeviceError(
                f"Use: expected floating statistics of one dtype and device; a is {a.dtype} on {a.device}, "
                f"g is {g.dtype} on {g.device}"
            )

    @property
    def T(self) -> int:
        return self.a.T

    @property
    def dims(self) -> tuple[int, int]:
        """``(d_a, d_g)`` of the block this use belongs to."""
        da, dg = self.a.dim, self.g.shape[-1]
        return (dg, da) if self.transposed else (da, dg)

    def select(self, b0: int, b1: int) -> Use:
        return Use(self.a.select(b0, b1), self.g[b0:b1], self.geometry, self.transposed)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Use:
        return Use(self.a.to(dtype, device), self.g.to(device=device, dtype=dtype), self.geometry, self.transposed)

    def state_dict(self) -> dict[str, Any]:
        geo = self.geometry
        return {
            "a": self.a.state_dict(),
            "g": self.g,
            "geometry": {"kind": geo.kind, "shape": tuple(geo.shape), "kernel": None if geo.kernel is None else tuple(geo.kernel)},
            "transposed": bool(self.transposed),
        }

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> Use:
        geo = data["geometry"]
        geometry = Geometry(geo["kind"], tuple(geo["shape"]), None if geo["kernel"] is None else tuple(geo["kernel"]))
        return cls(Rows.from_state_dict(data["a"]), data["g"], geometry, bool(data["transposed"]))


class LayerStatistics:
    """The per-sample statistics of one layer block (module docstring).

    Build it from one use::

        LayerStatistics(a, g, scale, geometry)     # a [m, T, d_a] (tensor or Rows), g [m, c, T, d_g]
        LayerStatistics(a, g, scale)               # no positions: a [m, d_a], g [m, c, d_g] also accepted

    or from several: ``LayerStatistics(uses=[Use(...), ...], scale=...)``.

    Args:
        a, g, geometry: the single use (``geometry`` default: none; the keywords
            ``spatial_shape=(H, W)`` and ``kernel_size`` give a 2-D grid).  Without
            positions the position axis of ``a`` and ``g`` may be omitted.
        scale: the factor in front of the sum: ``1/(m·S)`` for ``fisher`` with S samples,
            ``1/m`` for ``empirical_fisher`` and ``ggn``.
        has_bias: whether W̄'s last column is a bias (ā carries a trailing 1).
        uses: the uses, all with the same m and c, dtype and device, and block dims.

    Attributes:
        uses: tuple of :class:`Use`.
        scale, has_bias: as given.
        a_dim, g_dim: d_a and d_g of W̄ ``[d_g, d_a]``.
    """

    __slots__ = ("uses", "scale", "has_bias", "a_dim", "g_dim", "_nonfinite")

    def __init__(
        self,
        a: Rows | torch.Tensor | None = None,
        g: torch.Tensor | None = None,
        scale: float | None = None,
        geometry: Geometry | None = None,
        has_bias: bool = True,
        *,
        uses: Iterable[Use] | None = None,
        spatial_shape: tuple[int, ...] | None = None,
        kernel_size: tuple[int, ...] | None = None,
    ) -> None:
        if scale is None:
            raise ConfigError("LayerStatistics: expected a scale")
        if uses is None:
            if a is None or g is None:
                raise ShapeError("LayerStatistics: expected either a and g (one use) or uses=[...]")
            if geometry is None:
                geometry = Geometry.none() if spatial_shape is None else Geometry.grid(tuple(spatial_shape), kernel_size)
            if geometry.kind == "none" and isinstance(a, torch.Tensor) and a.ndim == 2:
                a = a.unsqueeze(1)  # no positions: the position axis may be omitted
            if geometry.kind == "none" and isinstance(g, torch.Tensor) and g.ndim == 3:
                g = g.unsqueeze(2)
            uses = (Use(as_rows(a) if isinstance(a, torch.Tensor) else a, g, geometry),)
        else:
            if a is not None or g is not None or geometry is not None or spatial_shape is not None:
                raise ShapeError("LayerStatistics: give either a, g, geometry (one use) or uses=[...], not both")
            uses = tuple(uses)
        if not uses:
            raise ShapeError("LayerStatistics: expected at least one use")
        first = uses[0]
        a_dim, g_dim = first.dims
        for k, u in enumerate(uses):
            if not isinstance(u, Use):
                raise ShapeError(f"LayerStatistics: use {k} is a {type(u).__name__}, expected a Use")
            if u.dims != (a_dim, g_dim):
                raise ShapeError(f"LayerStatistics: use {k} has block dims (d_a, d_g) = {u.dims}, use 0 {(a_dim, g_dim)}")
            if u.g.shape[:2] != first.g.shape[:2]:
                raise ShapeError(
                    f"LayerStatistics: use {k} has (m, c) = {tuple(u.g.shape[:2])}, use 0 {tuple(first.g.shape[:2])}"
                )
            if u.g.dtype != first.g.dtype or u.g.device != first.g.device:
                raise DTypeDeviceError(f"LayerStatistics: use {k} is {u.g.dtype} on {u.g.device}, use 0 {first.g.dtype} on {first.g.device}")
        object.__setattr__(self, "uses", uses)
        object.__setattr__(self, "scale", float(scale))
        object.__setattr__(self, "has_bias", bool(has_bias))
        object.__setattr__(self, "a_dim", int(a_dim))
        object.__setattr__(self, "g_dim", int(g_dim))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"LayerStatistics is immutable; use replace(...) instead of setting {name!r}")

    def __reduce__(self):
        return (_rebuild, (self.uses, self.scale, self.has_bias))

    def replace(self, **changes: Any) -> LayerStatistics:
        """A copy with fields changed: ``scale``, ``has_bias``, ``uses``, or — for one use —
        ``a``, ``g``, ``geometry``."""
        single = {k: changes.pop(k) for k in ("a", "g", "geometry") if k in changes}
        uses = changes.pop("uses", self.uses)
        if single:
            u = self._single("replace")
            uses = (Use(single.get("a", u.a), single.get("g", u.g), single.get("geometry", u.geometry), u.transposed),)
        if changes.keys() - {"scale", "has_bias"}:
            raise ConfigError(f"LayerStatistics.replace: unknown fields {sorted(changes.keys() - {'scale', 'has_bias'})}")
        return LayerStatistics(uses=uses, scale=changes.get("scale", self.scale), has_bias=changes.get("has_bias", self.has_bias))

    # -- description -----------------------------------------------------------------------------
    @property
    def m(self) -> int:
        return int(self.uses[0].g.shape[0])

    @property
    def c(self) -> int:
        """Back-propagated columns per sample."""
        return int(self.uses[0].g.shape[1])

    @property
    def num_pairs(self) -> int:
        """n = m·c, the columns of J_i."""
        return self.m * self.c

    @property
    def p(self) -> int:
        return self.a_dim * self.g_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.uses[0].g.dtype

    @property
    def device(self) -> torch.device:
        return self.uses[0].g.device

    def _single(self, what: str) -> Use:
        if len(self.uses) != 1:
            raise ShapeError(f"LayerStatistics.{what}: this block has {len(self.uses)} uses; iterate over .uses")
        return self.uses[0]

    @property
    def geometry(self) -> Geometry:
        """The positions of the single use (raises for several uses)."""
        return self._single("geometry").geometry

    @property
    def T(self) -> int:
        """The positions of the single use (raises for several uses)."""
        return self._single("T").T

    @property
    def a(self) -> torch.Tensor:
        """The single use's activation rows as a tensor ``[m, T, d_a]`` (raises for several uses)."""
        return self._single("a").a.dense()

    @property
    def g(self) -> torch.Tensor:
        """The single use's columns ``[m, c, T, d_g]`` (raises for several uses)."""
        return self._single("g").g

    def __repr__(self) -> str:
        uses = ", ".join(f"{u.geometry}{' transposed' if u.transposed else ''}" for u in self.uses)
        return (
            f"LayerStatistics(d_a={self.a_dim}, d_g={self.g_dim}, m={self.m}, c={self.c}, scale={self.scale:g}, "
            f"uses=[{uses}], dtype={self.dtype})"
        )

    # -- copies -------------------------------------------------------------------------------
    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LayerStatistics:
        return LayerStatistics(uses=[u.to(dtype, device) for u in self.uses], scale=self.scale, has_bias=self.has_bias)

    def num_nonfinite(self) -> tuple[int, int]:
        """(non-finite entries of the rows, of the columns), summed over uses (counted once:
        the statistics are immutable, and the preconditioner and the approximator both ask)."""
        try:
            return self._nonfinite
        except AttributeError:
            return self._counted(bool(self._screen()))

    @staticmethod
    def num_nonfinite_all(stats: Sequence[LayerStatistics]) -> list[tuple[int, int]]:
        """:meth:`num_nonfinite` of several statistics (a network's layers), their screens read
        in one host synchronisation (each a device → host wait on a GPU)."""
        todo = [st for st in stats if not hasattr(st, "_nonfinite")]
        if todo:
            for st, ok in zip(todo, host_values([st._screen() for st in todo])):
                st._counted(ok)
        return [st.num_nonfinite() for st in stats]

    def _screen(self) -> torch.Tensor:
        return finite_screen([t for u in self.uses for t in (*u.a.stored_values, u.g)])

    def _counted(self, screened_finite: bool) -> tuple[int, int]:
        if screened_finite:
            counts = (0, 0)
        else:  # the screen may be a false alarm: count exactly
            counts = (sum(u.a.num_nonfinite() for u in self.uses),
                      sum(int((~torch.isfinite(u.g)).sum()) for u in self.uses))
        object.__setattr__(self, "_nonfinite", counts)
        return counts

    def state_dict(self) -> dict[str, Any]:
        """Plain containers (``torch.load(weights_only=True)`` compatible)."""
        return {"uses": [u.state_dict() for u in self.uses], "scale": self.scale, "has_bias": self.has_bias}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> LayerStatistics:
        return cls(uses=[Use.from_state_dict(u) for u in data["uses"]], scale=float(data["scale"]), has_bias=bool(data["has_bias"]))

    # -- J_i, J_iᵀ, J_iᵀJ_i, D_n (appendix 4.A.2, 4.B) ---------------------------------------------
    def jt(self, U: torch.Tensor) -> torch.Tensor:
        """J_iᵀ U: ``[p_i, k]`` -> ``[n, k]``, (J_iᵀu)_n = Σ_u Σ_t g_{u,n,t}ᵀ P_u(MAT(u)) ā_{u,b,t} (4.62); no ``scale``."""
        k = U.shape[1]
        X = U.T.reshape(k, self.a_dim, self.g_dim).transpose(1, 2)  # MAT of each column [k, d_g, d_a]
        out = None
        for use in self.uses:
            Xu = X.transpose(1, 2) if use.transposed else X
            m, c, T, dg = use.g.shape
            XA = use.a.apply(Xu)  # X ā_{b,t} [k, m, T, d_g]
            G = use.g.reshape(m, c, T * dg)
            if k == 1:  # a product and a sum beat m tiny batched GEMMs
                val = (G * XA.reshape(m, 1, T * dg)).sum(-1).reshape(m * c, 1)
            else:
                val = torch.bmm(G, XA.reshape(k, m, T * dg).permute(1, 2, 0)).reshape(m * c, k)
            out = val if out is None else out + val
        return out

    def j(self, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """J_i W: ``[n, k]`` -> ``[p_i, k]`` (written into ``out`` if given); no ``scale``.

        MAT(J_i w) = Σ_u P_u(Σ_{b,c,t} w_{b,c} g_{u,b,c,t} ā_{u,b,t}ᵀ) (4.71): w_{b,c} weights
        every position t of its own (sample, column) pair (DESIGN.md §10)."""
        k = W.shape[1]
        res = None
        for use in self.uses:
            m, c, T, dg = use.g.shape
            G = use.g.reshape(m, c, T * dg)
            # weight each (sample, column) pair by its own w_{b,c} and sum the columns of each sample
            if k == 1:
                Gw = (G * W.reshape(m, c, 1)).sum(1).reshape(m, T, dg)
            else:
                Gw = torch.bmm(G.transpose(1, 2), W.reshape(m, c, k)).reshape(m, T, dg * k)
            if not use.transposed:
                # rows of [p_i, k] are (α, γ) pairs: view(d_a, d_g·k) = Σ ā ⊗ Gw, one GEMM, no transpose copy
                target = out.view(self.a_dim, self.g_dim * k) if (out is not None and res is None) else None
                val = use.a.outer(Gw.reshape(m, T, dg * k), out=target).reshape(self.p, k)
            else:
                # own rows ā ``[d_g]``, own columns g ``[d_a]``: entry (α, γ) = Σ g_α ā_γ
                Gk = Gw.reshape(m, T, dg, k).transpose(2, 3).reshape(m, T, k * dg)
                val = use.a.outer(Gk).reshape(self.g_dim, k, self.a_dim).permute(2, 0, 1).reshape(self.p, k)
            res = val if res is None else res + val
        if out is None or res.requires_grad:
            return res
        if res.data_ptr() != out.data_ptr():
            out.copy_(res)
        return out

    def jt_matrix(self, X: torch.Tensor) -> torch.Tensor:
        """J_iᵀ vec(X) in matrix form: ``[k, d_g, d_a]`` -> ``[k, n]``."""
        return self.jt(X.transpose(1, 2).reshape(X.shape[0], -1).T).T

    def j_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """MAT(J_i w) in matrix form: ``[k, n]`` -> ``[k, d_g, d_a]``."""
        k = w.shape[0]
        return self.j(w.T).reshape(self.a_dim, self.g_dim, k).permute(2, 1, 0)

    def pair_gradients(self, b0: int = 0, b1: int | None = None) -> torch.Tensor:
        """D_n for the pairs of samples b0 … b1 − 1: ``[(b1 − b0)·c, d_g, d_a]`` (dense, n·p_i entries)."""
        b1 = self.m if b1 is None else b1
        D = None
        for use in self.uses:
            part = use.select(b0, b1)
            Du = part.a.sample_outer(part.g)  # [mb, c, own d_g, own d_a]
            if use.transposed:
                Du = Du.transpose(-1, -2)
            D = Du if D is None else D + Du
        return D.reshape(-1, self.g_dim, self.a_dim)

    def pair_gradient_chunks(self, max_numbers: int = 1 << 22) -> Iterator[torch.Tensor]:
        """:meth:`pair_gradients` of consecutive chunks of samples, each of at most ``max_numbers``
        entries (at least one sample): ``[n_chunk, d_g, d_a]`` in sample order."""
        step = max(1, max_numbers // max(1, self.c * self.p))
        for b0 in range(0, self.m, step):
            yield self.pair_gradients(b0, min(b0 + step, self.m))

    @property
    def rank_one_pairs(self) -> bool:
        """Every per-pair gradient is an outer product, D_n = g_n ā_bᵀ: one untransposed use
        without positions (:meth:`pair_rows` gives the two sides)."""
        return len(self.uses) == 1 and self.uses[0].T == 1 and not self.uses[0].transposed

    def pair_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ā rows ``[n, d_a]``, g rows ``[n, d_g]``), pair n = (b, c) b-major, with D_n = g_n ā_nᵀ
        (ā_b repeated for each column c); only for :attr:`rank_one_pairs` statistics."""
        if not self.rank_one_pairs:
            raise ShapeError("LayerStatistics.pair_rows: the per-pair gradients are not outer products (several uses, "
                             "positions or a transposed use); use pair_gradients")
        (use,) = self.uses
        m, c = self.m, self.c
        a = use.a.dense().reshape(m, self.a_dim).repeat_interleave(c, dim=0)
        return a, use.g.reshape(m * c, self.g_dim)

    def pair_vectors(self, b0: int = 0, b1: int | None = None) -> torch.Tensor:
        """vec(D_n)ᵀ as rows: ``[(b1 − b0)·c, p_i]`` (the rows of J_iᵀ)."""
        D = self.pair_gradients(b0, b1)
        return D.transpose(1, 2).reshape(D.shape[0], -1)

    def gram(self, other: LayerStatistics | None = None) -> torch.Tensor:
        """J_iᵀ J'_i ``[n, n']``: the inner products ⟨D_n, D'_n'⟩ (4.78)–(4.79); no ``scale``.

        One use without positions on both sides: (ā_bᵀā'_b')(g_nᵀg'_n'), a Hadamard product of
        two Gram matrices, O(n n' (d_a + d_g)).  Otherwise the D_n are formed
        (n·p_i memory) and multiplied, O(n·T·p_i + n n' p_i).
        """
        other = self if other is None else other
        if (self.a_dim, self.g_dim) != (other.a_dim, other.g_dim):
            raise ShapeError(
                f"LayerStatistics.gram: blocks of different shapes (d_a, d_g) = {(self.a_dim, self.g_dim)} and "
                f"{(other.a_dim, other.g_dim)}"
            )
        if self.rank_one_pairs and other.rank_one_pairs:
            u1, u2 = self.uses[0], other.uses[0]
            c1, c2 = u1.g.shape[1], u2.g.shape[1]
            Ka = u1.a.cross(u2.a)[:, 0, :, 0].repeat_interleave(c1, 0).repeat_interleave(c2, 1)
            return (u1.g.reshape(-1, self.g_dim) @ u2.g.reshape(-1, self.g_dim).T) * Ka
        D1 = self.pair_vectors()
        D2 = D1 if other is self else other.pair_vectors()
        return D1 @ D2.T


def _rebuild(uses: Sequence[Use], scale: float, has_bias: bool) -> LayerStatistics:
    return LayerStatistics(uses=uses, scale=scale, has_bias=has_bias)

