"""Matrix-free products with the rearranged Fisher block Z(F) (Prop. 3.1, (3.31)–(3.36)).

For one *use* of a layer — activation rows ā_{b,t} ``[d_a]`` (:class:`~curvlib.linalg.rows.Rows`)
and back-propagated columns g_{b,c,t} ``[d_g]`` at the positions t of a
:class:`~curvlib.linalg.geometry.Geometry` — the block restricted to an ∞-norm band of
radius r is

    F_r = scale · Σ_b Σ_c Σ_{‖t − t'‖∞ ≤ r} ā_{b,t} ā_{b,t'}ᵀ ⊗ g_{b,c,t} g_{b,c,t'}ᵀ      (3.28), (3.35)

(r = ``None``: every pair, the exact block).  :class:`PositionZOperator` applies Z(F_r) and
Z(F_r)ᵀ from the statistics alone, with no loop over samples or positions:

* one position (a Linear layer, T = 1) or r = 0 (positions treated as independent
  samples — the block of KFAC-expand): Prop. 3.1 on the m·T rows,
  MAT(Z(F)v) = scale·Σ_{b,t} (Σ_c g_{bct}ᵀ V g_{bct}) ā_{bt} ā_{bt}ᵀ and
  MAT(Z(F)ᵀu) = scale·Σ_{b,c,t} (ā_{bt}ᵀ U ā_{bt}) g_{bct} g_{bct}ᵀ;
* every pair (r = ``None`` or r ≥ max(shape) − 1): per (sample, column) the double sum
  factorises into x xᵀ with x = vec(D), D = Σ_t g_t ā_tᵀ, so Z(F)v = scale·Σ vec(Dᵀ V D)
  (:class:`ExactZOperator`);
* a finite band on an N-D grid: a loop over the clipped offsets of every axis but the
  last (never over samples or positions), the last axis handled by a ``[S, S]`` band mask
  inside one batched GEMM — for a sequence there is no loop at all.

:class:`SumZOperator` and :class:`TransposedZOperator` combine the uses of a layer whose
weight is used several times (a module called repeatedly, tied parameters): Z is linear,
and a use whose matrix enters the layer matrix transposed has the commuted block
K F Kᵀ, for which Z(K F Kᵀ) = Z(F)ᵀ.  :class:`AffineZOperator` adds known Kronecker
terms through Z(R ⊗ S) = vec(R) vec(S)ᵀ (§3.2.3.1): deflation, KFAC-corrected (3.26) and
the EMA of the block itself.  Neither F nor Z(F) is ever formed.

Gram form.  Without a band (one position, or r = 0), Prop. 3.1 reads

    Z(F) = scale · Σ_i vec(ā_i ā_iᵀ) vec(Σ_c g_ic g_icᵀ)ᵀ = X C Yᵀ,      i = (b, t), n = m·T,

with X ``[d_a², n]``, Y ``[d_g², n]`` and the core C = scale·I_n: Z(F) has rank ≤ n and
lives in span(X) × span(Y).  :meth:`ZOperator.gram_form` returns this form
(:class:`GramForm`, a :class:`~curvlib.linalg.svd.GramOperator`): the solvers of
:mod:`curvlib.linalg.svd` then iterate on n coefficients with the Gram matrices

    G_a = XᵀX = (K_a)∘², (K_a)_ij = ā_iᵀā_j;     (G_b)_ij = Σ_{c,c'} (g_icᵀ g_jc')²

(O(n²·(d_a + c²·d_g)) once; Hadamard squares, since ⟨vec(x xᵀ), vec(y yᵀ)⟩ = (xᵀy)²) at
O(n²) per step, and a vector is formed only at the end, MAT(Xα) = Σ_i α_i ā_i ā_iᵀ —
one weighted Gram GEMM, O(n·d_a²), like a KFAC factor.  Deflation by found triplets
changes only C (C − σ α βᵀ, :meth:`GramForm.deflated`); known terms R ⊗ S (KFAC-corrected,
the EMA of the block) add the columns vec(R), vec(S) (:meth:`GramForm.extended`, one
quadratic form per row: ā_iᵀ R ā_i).  The Gram matrices are formed by a GEMM in the
statistics' dtype (float32 at least), squared and combined in float64, the work dtype of
the coefficients.  Convolutions with a band, and blocks of several uses, have no Gram form
here (``None``).
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Iterable, Sequence

import torch

from curvlib.errors import ConfigError, DTypeDeviceError, NumericalError, PerformanceWarning, ShapeError, warn
from curvlib.linalg.geometry import Geometry, band_mask
from curvlib.linalg.kron import unvec, vec
from curvlib.linalg.kronecker_sum import KroneckerSum
from curvlib.linalg.operator import LinearOperator
from curvlib.linalg.rows import DenseRows, OneHotRows, Rows, as_rows
from curvlib.linalg.rows import split_symmetric
from curvlib.linalg.rows import symmetric_product as _symmetric_product  # one kernel for rows and Gram sides
from curvlib.linalg.svd import GramOperator

__all__ = [
    "AffineZOperator",
    "DenseZOperator",
    "ConvZOperator",
    "ExactZOperator",
    "GramForm",
    "LinearZOperator",
    "PositionZOperator",
    "SumZOperator",
    "TransposedZOperator",
    "ZOperator",
    "deflated",
    "ema_combined",
]


class ZOperator(LinearOperator):
    """Matrix-free Z(M) of shape ``[a_dim², b_dim²]`` (Def. 3.3), M ≈ Σ_k A_k ⊗ B_k with
    A_k ``[a_dim, a_dim]``, B_k ``[b_dim, b_dim]``.

    ``matvec(v)`` computes Z(M)·v for ``v [b_dim²]`` (or ``[b_dim², k]``) and returns
    ``[a_dim²]`` (or ``[a_dim², k]``); ``rmatvec(u)`` computes Z(M)ᵀ·u.  Vectors use the
    column-major ``vec`` of Def. 3.2, so ``MAT(v)`` is ``[b_dim, b_dim]``.  Subclasses
    implement ``_matmat`` and ``_rmatmat`` (:class:`~curvlib.linalg.operator.LinearOperator`).
    """

    def __init__(self, a_dim: int, b_dim: int, *, dtype: torch.dtype, device: torch.device) -> None:
        self.a_dim = int(a_dim)
        self.b_dim = int(b_dim)
        self._dtype = dtype
        self._device = torch.device(device)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a_dim**2, self.b_dim**2)

    def gram_form(self) -> GramForm | None:
        """This operator as X C Yᵀ over the samples (module docstring), or ``None`` when it
        has no such form.  Cheap: the Gram matrices are formed when a solver first needs them."""
        return None


class DenseZOperator(ZOperator):
    """A :class:`ZOperator` backed by a dense ``[a_dim², b_dim²]`` matrix (reference)."""

    def __init__(self, Z: torch.Tensor, a_dim: int, b_dim: int) -> None:
        if Z.shape != (a_dim**2, b_dim**2):
            raise ShapeError(f"DenseZOperator: expected [{a_dim**2}, {b_dim**2}], got {list(Z.shape)}")
        super().__init__(a_dim, b_dim, dtype=Z.dtype, device=Z.device)
        self.Z = Z

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.Z @ V

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return self.Z.T @ U


def _mats(X: torch.Tensor, n: int) -> torch.Tensor:
    """Columns of ``X [n², k]`` as matrices ``[k, n, n]`` (MAT of each column)."""
    return unvec(X.T, n, n)


def _vecs(Y: torch.Tensor) -> torch.Tensor:
    """Matrices ``[k, n, n]`` as the columns ``[n², k]`` of their vecs."""
    return vec(Y).T


class ExactZOperator(ZOperator):
    """Z(F) for F = scale · Σ_n vec(D_n) vec(D_n)ᵀ from the per-(sample, column) gradients D_n.

    MAT(Z(F)v) = scale·Σ_n D_nᵀ V D_n and MAT(Z(F)ᵀu) = scale·Σ_n D_n U D_nᵀ: for one
    pair, x = vec(D), Z(x xᵀ)v = vec(Dᵀ MAT(v) D) (Prop. 3.1 with a single rank-one
    term).  Cost per product with k vectors: O(k·n·d_a·d_g·(d_a + d_g)).

    Args:
        D: ``[n, d_g, d_a]``.
        scale: the factor in front of the sum.
    """

    def __init__(self, D: torch.Tensor, scale: float) -> None:
        if D.ndim != 3:
            raise ShapeError(f"ExactZOperator: expected D [n, d_g, d_a], got {list(D.shape)}")
        super().__init__(D.shape[2], D.shape[1], dtype=D.dtype, device=D.device)
        self.D = D
        self.scale = float(scale)

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        Vm = _mats(V, self.b_dim)  # [k, d_g, d_g]
        VD = torch.einsum("kgh,nhj->kngj", Vm, self.D)  # [k, n, d_g, d_a]
        return self.scale * _vecs(torch.einsum("ngi,kngj->kij", self.D, VD))

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        Um = _mats(U, self.a_dim)  # [k, d_a, d_a]
        DU = torch.einsum("ngi,kij->kngj", self.D, Um)  # [k, n, d_g, d_a]
        return self.scale * _vecs(torch.einsum("kngj,nhj->kgh", DU, self.D))


class PositionZOperator(ZOperator):
    """Z(F_r) of one use with positions (module docstring), ``[d_a², d_g²]``.

    Costs for k vectors (T positions, n = m·c pairs):

    * T = 1 or r = 0: O(k·m·T·(c·d_g² + d_a²)) flops, O(k·m·c·T·d_g) memory;
    * every pair: O(n·T·d_a·d_g) once (the D_n), then O(k·n·d_a·d_g·(d_a + d_g));
    * a finite band on a grid (S_N the last axis, r_j = min(r, S_j − 1)):
      O(k·m·(c·T·d_g² + Π_{j<N}(2r_j+1)·T·S_N·(c·d_g + d_a) + T·d_a²)), all in GEMMs
      (the masked last-axis blocks do up to S_N/(2r+1) times the strictly needed pair
      products, in exchange for one GEMM per offset).  One-hot rows are densified for a
      finite band (a :class:`~curvlib.errors.PerformanceWarning`).

    Args:
        a: activation rows ``[m, T, d_a]`` (:class:`~curvlib.linalg.rows.Rows` or a tensor).
        g: back-propagated columns ``[m, c, T, d_g]``.
        geometry: the positions (``geometry.T == T``).
        radius: the band radius r ≥ 0, or ``None`` for every pair.
        scale: the factor in front of the sum.
    """

    def __init__(self, a: Rows | torch.Tensor, g: torch.Tensor, geometry: Geometry, radius: int | None, scale: float) -> None:
        rows = as_rows(a)
        name = type(self).__name__
        if not g.is_floating_point() or rows.dtype != g.dtype or rows.device != g.device:
            raise DTypeDeviceError(
                f"{name}: expected floating statistics of one dtype and device; a is {rows.dtype} on {rows.device}, "
                f"g is {g.dtype} on {g.device}"
            )
        m, T, d_a = rows.shape
        if g.ndim != 4 or g.shape[0] != m or g.shape[2] != T or T != geometry.T:
            raise ShapeError(
                f"{name}: expected a [m, T, d_a] and g [m, c, T, d_g] with the same m and T = {geometry.T} positions of "
                f"{geometry}; got a {[m, T, d_a]} and g {list(g.shape)}"
            )
        if radius is not None and (isinstance(radius, bool) or not isinstance(radius, int) or radius < 0):
            raise ConfigError(f"{name}: expected radius an int ≥ 0 or None, got {radius!r}")
        super().__init__(d_a, g.shape[3], dtype=g.dtype, device=g.device)
        self.rows = rows
        self.g = g
        self.geometry = geometry
        self.radius = radius
        self.scale = float(scale)
        if T == 1 or radius == 0:
            self._mode = "independent"
        elif geometry.covers_all_pairs(radius):
            self._mode = "exact"
            m, c = g.shape[:2]
            self._exact = ExactZOperator(rows.sample_outer(g).reshape(m * c, self.b_dim, self.a_dim), self.scale)
        else:
            self._mode = "band"
            if isinstance(rows, OneHotRows):
                warn(
                    f"{name}: a finite band radius {radius} densifies one-hot rows ({m}×{T}×{d_a}); "
                    "use radius 0 or None to keep them sparse",
                    PerformanceWarning,
                )
            self._a = rows.dense()

    # -- T = 1 or r = 0 -------------------------------------------------------------------------
    def _independent_matvec(self, Vm: torch.Tensor) -> torch.Tensor:
        gV = torch.einsum("bctg,kgh->kbcth", self.g, Vm)  # [k, m, c, T, d_g]
        w = (gV * self.g).sum(dim=(2, 4))  # [k, m, T]: Σ_c g_bctᵀ V g_bct
        return self.rows.gram(w)

    def _independent_rmatvec(self, Um: torch.Tensor) -> torch.Tensor:
        s = self.rows.quadratic(Um)  # [k, m, T]: ā_btᵀ U ā_bt
        m, c, T, d_g = self.g.shape
        G = self.g.reshape(m * c * T, d_g)
        w = s.unsqueeze(2).expand(-1, m, c, T).reshape(s.shape[0], -1)  # shared by the c columns
        return (G.T * w[:, None, :]) @ G

    # -- finite band on a grid --------------------------------------------------------------------
    def _grid_views(self) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
        shape = self.geometry.shape
        m, c, _, d_g = self.g.shape
        return shape, self.g.reshape(m, c, *shape, d_g), self._a.reshape(m, *shape, self.a_dim)

    def _band_matvec(self, Vm: torch.Tensor) -> torch.Tensor:
        shape, g, a = self._grid_views()
        k, S = Vm.shape[0], shape[-1]
        band = band_mask(S, self.radius, dtype=self.dtype, device=self.device)
        Vg = torch.einsum("kgh,bc...h->kbc...g", Vm, g)  # V g_t' at every position
        # acc[t] = Σ_{t' in band(t)} (Σ_c g_tᵀ V g_t') ā_t', so MAT(Z(F)v) = Σ_t ā_t acc[t]ᵀ
        acc = torch.zeros(k, *a.shape, dtype=self.dtype, device=self.device)
        full = (slice(None),)
        for sl_t, sl_s in self.geometry.band_offsets(self.radius):
            gt = g[full * 2 + sl_t]  # [m, c, *o, S, d_g]
            Vgs = Vg[full * 3 + sl_s]  # [k, m, c, *o, S, d_g]
            P = torch.einsum("bc...jg,kbc...lg->kb...jl", gt, Vgs) * band
            acc[full * 2 + sl_t] += P @ a[full + sl_s]
        m = a.shape[0]
        return torch.einsum("bti,kbtj->kij", self._a, acc.reshape(k, m, -1, self.a_dim))

    def _band_rmatvec(self, Um: torch.Tensor) -> torch.Tensor:
        shape, g, a = self._grid_views()
        k, S = Um.shape[0], shape[-1]
        band = band_mask(S, self.radius, dtype=self.dtype, device=self.device)
        Ua = torch.einsum("kij,b...j->kb...i", Um, a)  # U ā_t' at every position
        # acc[c, t] = Σ_{t' in band(t)} (ā_tᵀ U ā_t') g_{c,t'}, so MAT(Z(F)ᵀu) = Σ_{c,t} g_{c,t} acc[c, t]ᵀ
        acc = torch.zeros(k, *g.shape, dtype=self.dtype, device=self.device)
        full = (slice(None),)
        for sl_t, sl_s in self.geometry.band_offsets(self.radius):
            at = a[full + sl_t]  # [m, *o, S, d_a]
            Uas = Ua[full * 2 + sl_s]  # [k, m, *o, S, d_a]
            P = torch.einsum("b...ji,kb...li->kb...jl", at, Uas) * band
            acc[full * 3 + sl_t] += P.unsqueeze(2) @ g[full * 2 + sl_s]
        m, c = g.shape[:2]
        return torch.einsum("bcth,kbctj->khj", self.g, acc.reshape(k, m, c, -1, self.b_dim))

    # -- Gram form ---------------------------------------------------------------------------------
    def gram_form(self) -> GramForm | None:
        """X C Yᵀ with x_i = vec(ā_i ā_iᵀ), y_i = vec(Σ_c g_ic g_icᵀ) over the m·T rows i = (b, t)
        and C = scale·I (module docstring) — T = 1 or r = 0; ``None`` for a band or every pair."""
        if self._mode != "independent":
            return None
        n = self.rows.m * self.rows.T
        diag = torch.full((n,), self.scale, dtype=torch.float64, device=self.device)
        return GramForm(_RowsSide(self.rows), _ColumnsSide(self.g), diag, dtype=self.dtype)

    # -- dispatch ---------------------------------------------------------------------------------
    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        if self._mode == "exact":
            return self._exact._matmat(V)
        Vm = _mats(V, self.b_dim)
        out = self._independent_matvec(Vm) if self._mode == "independent" else self._band_matvec(Vm)
        return self.scale * _vecs(out)

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        if self._mode == "exact":
            return self._exact._rmatmat(U)
        Um = _mats(U, self.a_dim)
        out = self._independent_rmatvec(Um) if self._mode == "independent" else self._band_rmatvec(Um)
        return self.scale * _vecs(out)


class LinearZOperator(PositionZOperator):
    """Z(F) for the Linear-layer block F = scale · Σ_b Σ_c ā_b ā_bᵀ ⊗ g_bc g_bcᵀ (Prop. 3.1).

    The c back-propagated columns of sample b (MC target samples, or columns of a square
    root of the loss Hessian) share the activation ā_b.  Z(F) is ``[d_a², d_g²]``; a
    :class:`PositionZOperator` with no positions.

    Cost per product with k vectors: O(k·m·(c·d_g² + d_a²)) flops, O(k·m·c·d_g) memory.

    Args:
        a: activations ā ``[m, d_a]`` (with the trailing 1 when the layer has a bias).
        g: pre-activation gradients ``[m, c, d_g]``, or ``[m, d_g]`` for c = 1.
        scale: the factor in front of the sum (e.g. 1/m).
    """

    def __init__(self, a: torch.Tensor, g: torch.Tensor, scale: float) -> None:
        if g.ndim == 2:
            g = g.unsqueeze(1)
        if a.ndim != 2 or g.ndim != 3 or a.shape[0] != g.shape[0]:
            raise ShapeError(
                f"LinearZOperator: expected a [m, d_a] and g [m, c, d_g] or [m, d_g] with the same m; "
                f"got a {list(a.shape)} and g {list(g.shape)}"
            )
        super().__init__(DenseRows(a.unsqueeze(1)), g.unsqueeze(2), Geometry.none(), None, scale)


class ConvZOperator(PositionZOperator):
    """Z(F) for a 2-D convolution block with a spatial band, (3.28) and (3.31)–(3.36): a
    :class:`PositionZOperator` on the grid ``spatial_shape`` (see its costs).

    Args:
        a: activations (unfolded patches) ā ``[m, T, d_a]``.
        g: pre-activation gradients ``[m, c, T, d_g]``, or ``[m, T, d_g]`` for c = 1.
        spatial_shape: ``(H, W)`` of the layer's output, H·W = T.
        radius: the band radius r ≥ 0, or ``None`` for all pairs.
        scale: the factor in front of the sum.
    """

    def __init__(
        self,
        a: torch.Tensor,
        g: torch.Tensor,
        spatial_shape: tuple[int, int],
        radius: int | None,
        scale: float,
    ) -> None:
        if g.ndim == 3:
            g = g.unsqueeze(1)
        H, W = (int(s) for s in spatial_shape)
        if a.ndim != 3 or g.ndim != 4 or a.shape[0] != g.shape[0] or a.shape[1] != g.shape[2] or a.shape[1] != H * W:
            raise ShapeError(
                f"ConvZOperator: expected a [m, T, d_a] and g [m, c, T, d_g] or [m, T, d_g] with the same m "
                f"and T = H·W = {H}·{W} = {H * W}; got a {list(a.shape)} and g {list(g.shape)}"
            )
        super().__init__(a, g, Geometry.grid((H, W)), radius, scale)

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return self.geometry.shape  # type: ignore[return-value]


class SumZOperator(ZOperator):
    """Z(F_1 + … + F_k) = Σ_j Z(F_j) for operators of one shape, dtype and device.

    Args:
        ops: at least one :class:`ZOperator`.
    """

    def __init__(self, ops: Sequence[ZOperator]) -> None:
        ops = list(ops)
        if not ops:
            raise ShapeError("SumZOperator: expected at least one operator, got none")
        first = ops[0]
        for j, op in enumerate(ops):
            if op.shape != first.shape:
                raise ShapeError(f"SumZOperator: operator {j} has shape {op.shape}, operator 0 {first.shape}")
            if op.dtype != first.dtype or op.device != first.device:
                raise DTypeDeviceError(
                    f"SumZOperator: operator {j} is {op.dtype} on {op.device}, operator 0 {first.dtype} on {first.device}"
                )
        super().__init__(first.a_dim, first.b_dim, dtype=first.dtype, device=first.device)
        self.ops = ops

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.ops[0]._matmat(V)
        for op in self.ops[1:]:
            out = out + op._matmat(V)
        return out

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        out = self.ops[0]._rmatmat(U)
        for op in self.ops[1:]:
            out = out + op._rmatmat(U)
        return out


class TransposedZOperator(ZOperator):
    """Z(K F Kᵀ) = Z(F)ᵀ, K the commutation matrix (vec(Xᵀ) = K vec(X)).

    The block of a use whose matrix enters the layer matrix transposed (an embedding's
    weight tied to an output layer's): ``op`` is Z of the use's own block ``[d_g², d_a²]``
    in the layer's terms; this operator is ``[d_a², d_g²]``.
    """

    def __init__(self, op: ZOperator) -> None:
        super().__init__(op.b_dim, op.a_dim, dtype=op.dtype, device=op.device)
        self.op = op

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.op._rmatmat(V)

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return self.op._matmat(U)

    def gram_form(self) -> GramForm | None:
        """The use's form with its two sides swapped (Z(F)ᵀ = Y Cᵀ Xᵀ)."""
        form = self.op.gram_form()
        return None if form is None else form.transposed()


TermsLike = KroneckerSum | Sequence[tuple[torch.Tensor, torch.Tensor]] | Iterable[tuple[torch.Tensor, torch.Tensor]]


class AffineZOperator(ZOperator):
    """Z(base_coeff·M + term_coeff·Σ_k R_k ⊗ S_k), matrix-free (§3.2.3.1).

    Since Z is linear and Z(R ⊗ S) = vec(R) vec(S)ᵀ (Thm 3.14),

        Z(·) v  = base_coeff·Z(M) v  + term_coeff·Σ_k vec(R_k) ⟨vec(S_k), v⟩
        Z(·)ᵀ u = base_coeff·Z(M)ᵀ u + term_coeff·Σ_k vec(S_k) ⟨vec(R_k), u⟩

    at an extra cost of O(K·k·(d_a² + d_b²)) for K terms.  With the default
    coefficients (1, −1) this is the deflated operator Z(F − Σ R_k ⊗ S_k) of
    deflation and of KFAC-corrected (3.26).

    Args:
        base: Z(M) as a :class:`ZOperator`, or ``None`` for M = 0.
        terms: the pairs ``(R_k [d_a, d_a], S_k [d_b, d_b])`` or a :class:`KroneckerSum`;
            may be empty when ``base`` is given.
        base_coeff, term_coeff: the two scalars.
    """

    def __init__(
        self,
        base: ZOperator | None,
        terms: TermsLike,
        base_coeff: float = 1.0,
        term_coeff: float = -1.0,
    ) -> None:
        pairs = tuple(terms.terms if isinstance(terms, KroneckerSum) else ((R, S) for R, S in terms))
        if base is None and not pairs:
            raise ShapeError("AffineZOperator: expected a base operator or at least one term, got neither")
        if base is not None:
            a_dim, b_dim, dtype, device = base.a_dim, base.b_dim, base.dtype, base.device
        else:
            R0, S0 = pairs[0]
            a_dim, b_dim, dtype, device = R0.shape[-1], S0.shape[-1], R0.dtype, R0.device
        for k, (R, S) in enumerate(pairs):
            if R.shape != (a_dim, a_dim) or S.shape != (b_dim, b_dim):
                raise ShapeError(
                    f"AffineZOperator: term {k} must be (R [{a_dim}, {a_dim}], S [{b_dim}, {b_dim}]); "
                    f"got {list(R.shape)} and {list(S.shape)}"
                )
            for name, t in (("R", R), ("S", S)):
                if t.dtype != dtype or t.device != device:
                    raise DTypeDeviceError(
                        f"AffineZOperator: term {k} factor {name} is {t.dtype} on {t.device}; "
                        f"the operator is {dtype} on {device}"
                    )
        super().__init__(a_dim, b_dim, dtype=dtype, device=device)
        self.base = base
        self.terms = pairs
        self.base_coeff = float(base_coeff)
        self.term_coeff = float(term_coeff)
        if pairs:
            self._R = torch.stack([vec(R) for R, _ in pairs], dim=1)  # [d_a², K]
            self._S = torch.stack([vec(S) for _, S in pairs], dim=1)  # [d_b², K]

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        out = self.base_coeff * self.base.matvec(V) if self.base is not None else None
        if self.terms:
            low_rank = self.term_coeff * (self._R @ (self._S.T @ V))
            out = low_rank if out is None else out + low_rank
        return out

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        out = self.base_coeff * self.base.rmatvec(U) if self.base is not None else None
        if self.terms:
            low_rank = self.term_coeff * (self._S @ (self._R.T @ U))
            out = low_rank if out is None else out + low_rank
        return out

    def gram_form(self) -> GramForm | None:
        """base_coeff·(the base's form), extended by the terms' columns (:meth:`GramForm.extended`);
        ``None`` without a base or when the base has no form."""
        form = None if self.base is None else self.base.gram_form()
        if form is None:
            return None
        if self.base_coeff != 1.0:
            form = form.scaled(self.base_coeff)
        return form.extended(self.terms, self.term_coeff) if self.terms else form

    @classmethod
    def deflated(cls, op: ZOperator, terms: TermsLike) -> AffineZOperator:
        """Z(M − Σ_k R_k ⊗ S_k): deflation (§3.2.3.1) and KFAC-corrected (3.26)."""
        return cls(op, terms, base_coeff=1.0, term_coeff=-1.0)

    @classmethod
    def ema_combined(cls, op: ZOperator, previous_terms: TermsLike, rho: float) -> AffineZOperator:
        """Z(ρ·F_prev + (1 − ρ)·F_batch) with F_prev = Σ previous terms and Z(F_batch) = ``op``.

        Tracks the EMA of the Fisher block itself, so the new factors fit the averaged
        block rather than averaging factors.  ``rho`` ∈ [0, 1] is the weight of the past.
        """
        rho = float(rho)
        if not 0.0 <= rho <= 1.0:
            raise ConfigError(f"ema_combined: expected 0 ≤ rho ≤ 1, got {rho}")
        return cls(op, previous_terms, base_coeff=1.0 - rho, term_coeff=rho)


deflated = AffineZOperator.deflated
ema_combined = AffineZOperator.ema_combined

# --------------------------------------------------------------------------- Gram form

_WORK = torch.float64  # dtype of Gram matrices and coefficients (module docstring)


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the GEMMs that form Gram matrices and images: float32 at least."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _weighted_gram(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i w_ik x_i x_iᵀ for rows ``X [n, d]`` and weights ``w [n, k]`` (in X's dtype): ``[k, d, d]``."""
    return _symmetric_product(X.T * w.T[:, None, :], X)


def _quadratic_forms(X: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """x_iᵀ M_k x_i for rows ``X [n, d]`` and ``M [k, d, d]``: ``[k, n]``.

    A quadratic form sees only the symmetric part of M, so with d split in two it is
    x₁ᵀM₁₁x₁ + x₁ᵀ(M₁₂ + M₂₁ᵀ)x₂ + x₂ᵀM₂₂x₂: one GEMM of a quarter for the cross term and two
    quadratic forms again, down to widths below ``SYMMETRIC_BLOCKS_FROM`` (5/8 of the
    multiply-adds of X M at two levels; d = 785, n = 512: 5.0 ms against 5.4 for one level),
    on the CPU only (:func:`~curvlib.linalg.rows.split_symmetric`).
    """
    d = X.shape[1]
    if not split_symmetric(X, d):
        return ((X @ M) * X).sum(-1)
    h = d // 2
    X1, X2 = X[:, :h], X[:, h:]
    cross = M[..., :h, h:] + M[..., h:, :h].transpose(-1, -2)
    return _quadratic_forms(X1, M[..., :h, :h]) + ((X1 @ cross) * X2).sum(-1) + _quadratic_forms(X2, M[..., h:, h:])


def _pairs(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``p, q [d]`` or ``[d, r]`` -> both ``[d, r]``."""
    return (p.unsqueeze(-1), q.unsqueeze(-1)) if p.ndim == 1 else (p, q)


#: rank of the sketch through which a warm start of a Gram-space solver enters
#: (:meth:`GramForm.start_right_images`); measured on the MNIST auto-encoder's KFAC-corrected
#: refreshes, a rank-2 sketch of the previous factor needed no more iterations than the exact start
START_SKETCH_RANK = 8


@functools.lru_cache(maxsize=64)
def _sketch_probe(n: int, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The fixed Gaussian test matrix Ω ``[n, r]`` of :func:`_range_sketch` (seeded by n: the
    same start gives the same sketch, so refreshes and resumed runs stay reproducible)."""
    omega = torch.randn(n, r, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    return omega.to(dtype=dtype, device=device)


def _range_sketch(S: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, SᵀU)`` for a square S ``[n, n]``: U ``[n, r]`` an orthonormal basis of S Ω (the
    randomized range finder), so that U (SᵀU)ᵀ = U Uᵀ S is S projected on the dominant part of
    its range (exact when rank S ≤ r).  Two passes over S, O(n²·r).  (A power step, S Sᵀ S Ω,
    measured no fewer solver iterations on the MNIST auto-encoder, for a third pass.)"""
    omega = _sketch_probe(S.shape[0], r, S.dtype, S.device)
    U = torch.linalg.qr(S @ omega).Q
    return U, S.T @ U


class _GramSide(abc.ABC):
    """One side of a :class:`GramForm`: columns x_1 … x_N ∈ R^{d²} (vecs of d×d matrices), implicit.

    Attributes:
        dim: d.
        count: N.
        dtype, device: of the statistics (and of the matrices :meth:`combine` returns).
    """

    dim: int
    count: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self) -> None:
        self._gram: torch.Tensor | None = None

    def gram(self) -> torch.Tensor:
        """⟨x_i, x_j⟩ ``[N, N]`` in float64, formed once (the sides of a form and of the forms
        derived from it are shared)."""
        if self._gram is None:
            gram = self._form_gram()
            lo, hi = torch.aminmax(gram)  # both propagate NaN: cheaper than isfinite(gram).all()
            if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
                # e.g. statistics so large that the GEMM overflowed: no solver step can be finite
                raise NumericalError(f"GramForm: the Gram matrix [{self.count}, {self.count}] of the statistics has "
                                     "non-finite entries (expected finite statistics whose products do not overflow)")
            self._gram = gram
        return self._gram

    @abc.abstractmethod
    def _form_gram(self) -> torch.Tensor: ...

    @abc.abstractmethod
    def images(self, M: torch.Tensor) -> torch.Tensor:
        """⟨x_i, vec(M_k)⟩: ``M [k, d, d]`` -> ``[N, k]`` in float64."""

    @abc.abstractmethod
    def combine(self, w: torch.Tensor) -> torch.Tensor:
        """MAT(Σ_i w_ik x_i): ``w [N, k]`` (float64) -> ``[k, d, d]`` in :attr:`dtype`."""

    @abc.abstractmethod
    def outer_images(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """⟨x_i, vec(p qᵀ)⟩ = pᵀ MAT(x_i) q for ``p, q [d]``, or ⟨x_i, vec(P Qᵀ)⟩ =
        Σ_j p_jᵀ MAT(x_i) q_j for ``P, Q [d, r]``: ``[N]`` in float64, O(N·d·r)."""

    @abc.abstractmethod
    def symmetrized(self) -> _GramSide:
        """The side with each MAT(x_i) replaced by its symmetric part."""

    @property
    @abc.abstractmethod
    def gram_flops(self) -> int:
        """Multiply-adds of :meth:`gram`."""

    @property
    @abc.abstractmethod
    def vector_flops(self) -> int:
        """Multiply-adds of :meth:`images` or :meth:`combine` for one matrix or column."""


class _RowsSide(_GramSide):
    """x_i = vec(ā_i ā_iᵀ) for the rows i = (b, t) of a :class:`~curvlib.linalg.rows.Rows`
    (symmetric): G = (ā_iᵀā_j)², images ā_iᵀ M ā_i, MAT(Xw) = Σ_i w_i ā_i ā_iᵀ."""

    def __init__(self, rows: Rows) -> None:
        super().__init__()
        self.rows = rows
        m, T, d = rows.shape
        self.dim, self.count, self.dtype, self.device = d, m * T, rows.dtype, rows.device

    def _dense(self) -> torch.Tensor | None:
        """The rows ``[N, d]`` when they are dense (one-hot rows go through :class:`Rows`)."""
        return self.rows.dense().reshape(self.count, self.dim) if isinstance(self.rows, DenseRows) else None

    def _form_gram(self) -> torch.Tensor:
        A = self._dense()
        if A is not None:
            A = A.to(_gemm_dtype(self.dtype))
            K = _symmetric_product(A, A.T).to(_WORK)
        else:
            rows = self.rows.to(dtype=_gemm_dtype(self.dtype))
            K = rows.cross(rows).reshape(self.count, self.count).to(_WORK)
        return K * K

    def images(self, M: torch.Tensor) -> torch.Tensor:
        A = self._dense()
        if A is not None:
            A = A.to(_gemm_dtype(self.dtype))
            return _quadratic_forms(A, M.to(A.dtype)).T.to(_WORK)
        rows = self.rows.to(dtype=_gemm_dtype(self.dtype))
        return rows.quadratic(M.to(rows.dtype)).reshape(M.shape[0], self.count).T.to(_WORK)

    def combine(self, w: torch.Tensor) -> torch.Tensor:
        A = self._dense()
        if A is not None:
            return _weighted_gram(A, w.to(self.dtype))
        m, T, _ = self.rows.shape
        return self.rows.gram(w.T.to(self.dtype).reshape(w.shape[1], m, T))

    def outer_images(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        rows = self.rows.to(dtype=_gemm_dtype(self.dtype))
        P, Q = _pairs(p, q)
        r = P.shape[1]
        a = rows.apply(torch.cat([P, Q], 1).T.to(rows.dtype)[None])  # [1, m, T, 2r]: ā_iᵀp_j, ā_iᵀq_j
        return (a[..., :r] * a[..., r:]).sum(-1).reshape(self.count).to(_WORK)

    def symmetrized(self) -> _RowsSide:
        return self

    @property
    def gram_flops(self) -> int:
        return self.count**2 * self.dim

    @property
    def vector_flops(self) -> int:
        return self.count * self.dim**2


class _ColumnsSide(_GramSide):
    """y_i = vec(Σ_c g_ic g_icᵀ) for the rows i = (b, t) of back-propagated columns
    ``g [m, c, T, d]`` (symmetric): G_ij = Σ_{c,c'} (g_icᵀ g_jc')²."""

    def __init__(self, g: torch.Tensor) -> None:
        super().__init__()
        m, c, T, d = g.shape
        self.c = c
        self.dim, self.count, self.dtype, self.device = d, m * T, g.dtype, g.device
        # rows ordered (b, t) like the activation rows, the c columns of a row adjacent
        self.G = g.permute(0, 2, 1, 3).reshape(m * T * c, d)  # [n·c, d]

    def _G(self) -> torch.Tensor:
        return self.G.to(_gemm_dtype(self.dtype))

    def _form_gram(self) -> torch.Tensor:
        G = self._G()
        K = _symmetric_product(G, G.T).to(_WORK)
        K = K * K
        if self.c > 1:
            n, c = self.count, self.c
            K = K.reshape(n, c, n, c).sum(dim=(1, 3))
        return K

    def images(self, M: torch.Tensor) -> torch.Tensor:
        G = self._G()
        q = _quadratic_forms(G, M.to(G.dtype))  # [k, n·c]: g_icᵀ M_k g_ic
        return q.reshape(M.shape[0], self.count, self.c).sum(-1).T.to(_WORK)

    def combine(self, w: torch.Tensor) -> torch.Tensor:
        weights = w.to(self.dtype)
        if self.c > 1:
            weights = weights.repeat_interleave(self.c, dim=0)  # shared by the c columns of a row
        return _weighted_gram(self.G, weights)

    def outer_images(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        G = self._G()
        P, Q = _pairs(p, q)
        r = P.shape[1]
        x = G @ torch.cat([P, Q], 1).to(G.dtype)  # [n·c, 2r]
        return (x[:, :r] * x[:, r:]).sum(-1).reshape(self.count, self.c).sum(-1).to(_WORK)

    def symmetrized(self) -> _ColumnsSide:
        return self

    @property
    def gram_flops(self) -> int:
        return (self.count * self.c) ** 2 * self.dim

    @property
    def vector_flops(self) -> int:
        return self.count * self.c * self.dim**2


class _ExplicitSide(_GramSide):
    """Columns given as matrices ``M [e, d, d]`` (the terms of :meth:`GramForm.extended`)."""

    def __init__(self, M: torch.Tensor) -> None:
        super().__init__()
        self.M = M
        self.dim, self.count, self.dtype, self.device = M.shape[-1], M.shape[0], M.dtype, M.device

    def _M(self) -> torch.Tensor:
        return self.M.to(_gemm_dtype(self.dtype)).reshape(self.count, -1)

    def _form_gram(self) -> torch.Tensor:
        M = self._M()
        return (M @ M.T).to(_WORK)

    def images(self, M: torch.Tensor) -> torch.Tensor:
        E = self._M()
        return (E @ M.to(E.dtype).reshape(M.shape[0], -1).T).to(_WORK)

    def combine(self, w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("ek,eij->kij", w.to(self.dtype), self.M)

    def outer_images(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        M = self.M.to(_gemm_dtype(self.dtype))
        P, Q = _pairs(p, q)
        return ((M @ Q.to(M.dtype)) * P.to(M.dtype)).sum((-2, -1)).to(_WORK)  # Σ_j p_jᵀ M_e q_j

    def symmetrized(self) -> _ExplicitSide:
        return _ExplicitSide(0.5 * (self.M + self.M.transpose(-1, -2)))

    @property
    def gram_flops(self) -> int:
        return self.count**2 * self.dim**2

    @property
    def vector_flops(self) -> int:
        return self.count * self.dim**2


class _StackedSide(_GramSide):
    """The columns of ``first`` followed by those of an explicit side."""

    def __init__(self, first: _GramSide, extra: _ExplicitSide) -> None:
        super().__init__()
        self.first, self.extra = first, extra
        self.dim, self.count = first.dim, first.count + extra.count
        self.dtype, self.device = first.dtype, first.device

    def _form_gram(self) -> torch.Tensor:
        cross = self.first.images(self.extra.M)  # [N_1, e]: the one O(N_1·d²) product per extra column
        return torch.cat([torch.cat([self.first.gram(), cross], 1), torch.cat([cross.T, self.extra.gram()], 1)], 0)

    def images(self, M: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first.images(M), self.extra.images(M)], 0)

    def combine(self, w: torch.Tensor) -> torch.Tensor:
        n = self.first.count
        out = self.first.combine(w[:n])  # [k, d, d], a new tensor
        # + Σ_e w_ek M_e, accumulated in place (one GEMM [k, e] @ [e, d²], no temporary)
        M = self.extra.M.reshape(self.extra.count, -1)
        out.view(out.shape[0], -1).addmm_(w[n:].T.to(M.dtype), M)
        return out

    def outer_images(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.first.outer_images(p, q), self.extra.outer_images(p, q)])

    def symmetrized(self) -> _StackedSide:
        return _StackedSide(self.first.symmetrized(), self.extra.symmetrized())

    @property
    def gram_flops(self) -> int:
        return self.first.gram_flops + self.extra.count * self.first.vector_flops + self.extra.gram_flops

    @property
    def vector_flops(self) -> int:
        return self.first.vector_flops + self.extra.vector_flops


class GramForm(GramOperator):
    """Z = X C Yᵀ ``[d_a², d_b²]`` over the samples (module docstring): the
    :class:`~curvlib.linalg.svd.GramOperator` the solvers iterate on.

    The core is C = diag(c) + P Qᵀ (``c [N]``, ``P [N, r]``, ``Q [N, r]``; X and Y have the
    same number N of columns): c = scale on the rows of a Fisher block, a term's coefficient
    on its extra columns (:meth:`extended`), and −σ_j α_j β_jᵀ for each found triplet
    (:meth:`deflated`).  Deriving a form shares the sides and their Gram matrices, so a
    deflated operator costs nothing to build and O(N·r) more per product.

    Built by :meth:`ZOperator.gram_form`; not meant to be constructed by hand.
    """

    def __init__(
        self,
        side_a: _GramSide,
        side_b: _GramSide,
        diag: torch.Tensor,
        P: torch.Tensor | None = None,
        Q: torch.Tensor | None = None,
        *,
        dtype: torch.dtype,
    ) -> None:
        N = side_a.count
        if side_b.count != N or diag.shape != (N,):
            raise ShapeError(
                f"GramForm: expected sides of one number of columns N and a core diagonal [N]; got "
                f"{side_a.count} and {side_b.count} columns and a diagonal {list(diag.shape)}"
            )
        self.side_a, self.side_b, self.diag = side_a, side_b, diag
        empty = diag.new_zeros(N, 0)
        self.P = empty if P is None else P
        self.Q = empty if Q is None else Q
        self._dtype = dtype

    # -- GramOperator ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.side_a.dim**2, self.side_b.dim**2)

    @property
    def coefficient_shape(self) -> tuple[int, int]:
        return (self.side_a.count, self.side_b.count)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def work_dtype(self) -> torch.dtype:
        return _WORK

    @property
    def device(self) -> torch.device:
        return self.diag.device

    @property
    def a_dim(self) -> int:
        return self.side_a.dim

    @property
    def b_dim(self) -> int:
        return self.side_b.dim

    def metric_a(self, alpha: torch.Tensor) -> torch.Tensor:
        return self.side_a.gram() @ alpha

    def metric_b(self, beta: torch.Tensor) -> torch.Tensor:
        return self.side_b.gram() @ beta

    def _core(self, y: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        d = self.diag if y.ndim == 1 else self.diag[:, None]
        out = d * y
        return out + L @ (R.T @ y) if L.shape[1] else out

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self._core(y, self.P, self.Q)

    def backward(self, x: torch.Tensor) -> torch.Tensor:
        return self._core(x, self.Q, self.P)

    def right_images(self, v: torch.Tensor) -> torch.Tensor:
        """Yᵀv: ``[d_b²(, k)]`` -> ``[N(, k)]`` (one quadratic form per row and vector)."""
        return self._images(self.side_b, v)

    def left_images(self, u: torch.Tensor) -> torch.Tensor:
        """Xᵀu: ``[d_a²(, k)]`` -> ``[N(, k)]``."""
        return self._images(self.side_a, u)

    def right_outer_images(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Yᵀ vec(p qᵀ) for ``p, q [d_b]``: ``[N]``, O(N·d_b) — a cheap probe vector of R^{d_b²}."""
        return self.side_b.outer_images(p, q)

    def start_right_images(self, v: torch.Tensor) -> torch.Tensor:
        """Yᵀv' for warm starts ``v [d_b²(, k)]``, v' = vec(U Uᵀ S) with S = MAT(v) and U the
        rank-:data:`START_SKETCH_RANK` range of S (:func:`_range_sketch`): O(d_b²·r + N·d_b·r)
        per start instead of the O(N·d_b²) quadratic forms of :meth:`right_images`.  A start only
        steers the iteration, and the previous refresh's factor is dominated by a few
        directions; for d_b ≤ 4r the start enters exactly."""
        n, r = self.side_b.dim, START_SKETCH_RANK
        if n <= 4 * r:
            return self.right_images(v)
        cols = (v.unsqueeze(-1) if v.ndim == 1 else v).to(_gemm_dtype(v.dtype))  # QR needs float32 at least
        images = torch.stack([self.side_b.outer_images(*_range_sketch(unvec(cols[:, j], n, n), r))
                              for j in range(cols.shape[1])], 1)
        return images[:, 0] if v.ndim == 1 else images

    def _images(self, side: _GramSide, x: torch.Tensor) -> torch.Tensor:
        n = side.dim
        if x.ndim == 1:
            return side.images(unvec(x, n, n).unsqueeze(0))[:, 0]
        return side.images(unvec(x.T, n, n))

    # -- vectors --------------------------------------------------------------------------------
    def left_matrices(self, alpha: torch.Tensor) -> torch.Tensor:
        """MAT(X α_k): coefficients ``[N, k]`` -> ``[k, d_a, d_a]`` in :attr:`dtype` (O(N·d_a²) each)."""
        return self.side_a.combine(alpha)

    def right_matrices(self, beta: torch.Tensor) -> torch.Tensor:
        """MAT(Y β_k): ``[N, k]`` -> ``[k, d_b, d_b]``."""
        return self.side_b.combine(beta)

    # -- derived forms --------------------------------------------------------------------------
    def deflated(self, sigma: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> GramForm:
        """Z − Σ_j σ_j (Xα_j)(Yβ_j)ᵀ: ``sigma [r]``, coefficients ``alpha [N, r]``, ``beta [N, r]``."""
        P = torch.cat([self.P, -alpha * sigma], 1)
        Q = torch.cat([self.Q, beta], 1)
        return GramForm(self.side_a, self.side_b, self.diag, P, Q, dtype=self._dtype)

    def scaled(self, coeff: float) -> GramForm:
        """coeff·Z."""
        return GramForm(self.side_a, self.side_b, coeff * self.diag, coeff * self.P, self.Q, dtype=self._dtype)

    def extended(self, terms: Sequence[tuple[torch.Tensor, torch.Tensor]], coeff: float) -> GramForm:
        """Z + coeff·Σ_k vec(R_k) vec(S_k)ᵀ: the terms' factors as extra columns of X and Y.

        Their Gram entries cost one quadratic form per row and factor, O(N·(d_a² + d_b²))
        per term, when the Gram matrices are first needed.
        """
        R = torch.stack([A for A, _ in terms]) if len(terms) > 1 else terms[0][0].unsqueeze(0)
        S = torch.stack([B for _, B in terms]) if len(terms) > 1 else terms[0][1].unsqueeze(0)
        e = R.shape[0]
        diag = torch.cat([self.diag, self.diag.new_full((e,), float(coeff))])
        pad = self.P.new_zeros(e, self.P.shape[1])
        return GramForm(
            _StackedSide(self.side_a, _ExplicitSide(R)),
            _StackedSide(self.side_b, _ExplicitSide(S)),
            diag,
            torch.cat([self.P, pad]),
            torch.cat([self.Q, pad]),
            dtype=self._dtype,
        )

    def transposed(self) -> GramForm:
        """Zᵀ = Y Cᵀ Xᵀ."""
        return GramForm(self.side_b, self.side_a, self.diag, self.Q, self.P, dtype=self._dtype)

    def symmetrized(self) -> GramForm:
        """P_a Z P_b with P the projector vec(M) ↦ vec((M + Mᵀ)/2): each column's matrix
        replaced by its symmetric part (those of the rows are symmetric already)."""
        return GramForm(self.side_a.symmetrized(), self.side_b.symmetrized(), self.diag, self.P, self.Q,
                        dtype=self._dtype)

    # -- costs ----------------------------------------------------------------------------------
    @property
    def setup_flops(self) -> int:
        """Multiply-adds of the two Gram matrices (with the extra columns' quadratic forms)."""
        return self.side_a.gram_flops + self.side_b.gram_flops

    @property
    def product_flops(self) -> int:
        """Multiply-adds of one product Z v formed from the statistics (Yᵀv, then MAT(X·)):
        the unit of the direct iteration's cost."""
        return self.side_b.vector_flops + self.side_a.vector_flops

