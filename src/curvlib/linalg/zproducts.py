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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from curvlib.errors import ConfigError, DTypeDeviceError, PerformanceWarning, ShapeError, warn
from curvlib.linalg.geometry import Geometry, band_mask
from curvlib.linalg.kron import unvec, vec
from curvlib.linalg.kronecker_sum import KroneckerSum
from curvlib.linalg.operator import LinearOperator
from curvlib.linalg.rows import DenseRows, OneHotRows, Rows, as_rows

__all__ = [
    "AffineZOperator",
    "DenseZOperator",
    "ConvZOperator",
    "ExactZOperator",
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
