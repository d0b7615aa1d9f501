"""Matrix-free products with the rearranged Fisher block Z(F) (Prop. 3.1, (3.31)–(3.36)).

For the block F = scale · Σ_b Σ_c ā_b ā_bᵀ ⊗ g_bc g_bcᵀ of a Linear layer (3.18),
Prop. 3.1 gives Z(F)v and Z(F)ᵀu from the per-sample statistics alone:

    MAT(Z(F) v)  = scale · Σ_b (Σ_c g_bcᵀ V g_bc) ā_b ā_bᵀ   = scale · Âᵀ diag(w) Â
    MAT(Z(F)ᵀ u) = scale · Σ_b (ā_bᵀ U ā_b) Σ_c g_bc g_bcᵀ

with V = MAT(v) ``[d_g, d_g]``, U = MAT(u) ``[d_a, d_a]`` (column-major MAT, Def. 3.2).
Convolutions add a double sum over spatial positions (3.28), optionally restricted to
a band ‖t − t'‖∞ ≤ r on the 2-D positions (3.35)–(3.36).  Neither F nor Z(F) is ever
formed: the cost is O(m·d²) per product (the exact cost is stated on each class).

:class:`AffineZOperator` adds known Kronecker terms to any of these operators, through
Z(R ⊗ S) = vec(R) vec(S)ᵀ (§3.2.3.1): deflation, KFAC-corrected (3.26) and the EMA of
the block itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.linalg.kron import KroneckerSum, unvec, vec
from curvlib.linalg.operator import ZOperator

__all__ = ["LinearZOperator", "ConvZOperator", "AffineZOperator", "deflated", "ema_combined"]


def _check_statistics(name: str, a: torch.Tensor, g: torch.Tensor) -> None:
    if not (a.is_floating_point() and g.is_floating_point()):
        raise DTypeDeviceError(f"{name}: expected floating-point statistics, got a {a.dtype} and g {g.dtype}")
    if a.dtype != g.dtype or a.device != g.device:
        raise DTypeDeviceError(f"{name}: a is {a.dtype} on {a.device}, g is {g.dtype} on {g.device}; expected the same")


def _mats(X: torch.Tensor, n: int) -> torch.Tensor:
    """Columns of ``X [n², k]`` as matrices ``[k, n, n]`` (MAT of each column)."""
    return unvec(X.T, n, n)


def _vecs(Y: torch.Tensor) -> torch.Tensor:
    """Matrices ``[k, n, n]`` as the columns ``[n², k]`` of their vecs."""
    return vec(Y).T


class LinearZOperator(ZOperator):
    """Z(F) for the Linear-layer block F = scale · Σ_b Σ_c ā_b ā_bᵀ ⊗ g_bc g_bcᵀ (Prop. 3.1).

    The c back-propagated columns of sample b (MC target samples, or columns of a square
    root of the loss Hessian) share the activation ā_b.  Z(F) is ``[d_a², d_g²]``.

    Cost per product with k vectors: O(k·m·(c·d_g² + d_a²)) flops, O(k·m·c·d_g) memory.

    Args:
        a: activations ā ``[m, d_a]`` (with the trailing 1 when the layer has a bias).
        g: pre-activation gradients ``[m, c, d_g]``, or ``[m, d_g]`` for c = 1.
        scale: the factor in front of the sum (e.g. 1/m).
    """

    def __init__(self, a: torch.Tensor, g: torch.Tensor, scale: float) -> None:
        _check_statistics("LinearZOperator", a, g)
        if g.ndim == 2:
            g = g.unsqueeze(1)
        if a.ndim != 2 or g.ndim != 3 or a.shape[0] != g.shape[0]:
            raise ShapeError(
                f"LinearZOperator: expected a [m, d_a] and g [m, c, d_g] or [m, d_g] with the same m; "
                f"got a {list(a.shape)} and g {list(g.shape)}"
            )
        super().__init__(a.shape[1], g.shape[2], dtype=a.dtype, device=a.device)
        self.a = a
        self.g = g
        self.scale = float(scale)

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        Vm = _mats(V, self.b_dim)  # [k, d_g, d_g]
        gV = torch.einsum("bci,kij->kbcj", self.g, Vm)  # [k, m, c, d_g]
        w = (gV * self.g).sum(dim=(-1, -2))  # [k, m]: w_b = Σ_c g_bcᵀ V g_bc
        out = (self.a.T * w[:, None, :]) @ self.a  # Âᵀ diag(w) Â, [k, d_a, d_a]
        return self.scale * _vecs(out)

    def _rmatvec(self, U: torch.Tensor) -> torch.Tensor:
        Um = _mats(U, self.a_dim)  # [k, d_a, d_a]
        s = ((self.a @ Um) * self.a).sum(dim=-1)  # [k, m]: s_b = ā_bᵀ U ā_b
        m, c, d_g = self.g.shape
        G = self.g.reshape(m * c, d_g)
        w = s.repeat_interleave(c, dim=1)  # [k, m·c]: sample weights shared by its c columns
        out = (G.T * w[:, None, :]) @ G  # [k, d_g, d_g]
        return self.scale * _vecs(out)


def _row_offsets(H: int, radius: int) -> Iterator[tuple[slice, slice]]:
    """Row offsets δr with |δr| ≤ radius, clipped to the grid.

    Yields ``(rows_t, rows_s)``: slices of the row axis of an ``[..., H, W, ·]`` view such
    that row i of the first meets row i + δr of the second.
    """
    rh = min(radius, H - 1)
    for dr in range(-rh, rh + 1):
        yield slice(max(0, -dr), H - max(0, dr)), slice(max(0, dr), H - max(0, -dr))


def _column_band(W: int, radius: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[W, W]`` 0/1 mask of the column pairs (j, l) with |j − l| ≤ radius."""
    j = torch.arange(W, device=device)
    return ((j[:, None] - j[None, :]).abs() <= radius).to(dtype)


class ConvZOperator(ZOperator):
    """Z(F) for a convolution block with a spatial band, (3.28) and (3.31)–(3.36).

        F = scale · Σ_b Σ_c Σ_{(t,t') ∈ band} ā_{b,t} ā_{b,t'}ᵀ ⊗ g_{b,c,t} g_{b,c,t'}ᵀ

    Positions are 2-D, t = (row, col), flattened row-major as t = row·W + col; the band
    is ‖t − t'‖∞ = max(|Δrow|, |Δcol|) ≤ r on the 2-D positions (3.35) — not on the
    flattened index, which would wrap at row ends and miss vertical neighbours
    (DESIGN.md §10).  ``radius=None`` keeps every pair: the exact block (3.28).  No
    1/T factor is applied here; the caller's ``scale`` carries all of the scaling.

    Costs for k vectors (d_a = activation dim, d_g = gradient dim, T = H·W):

    * exact band (``radius=None``, or r ≥ max(H, W) − 1 which covers every pair): per
      sample the double sum factorises, Σ_{t,t'} ā_t ā_t'ᵀ ⊗ g_t g_t'ᵀ = x xᵀ with
      x = vec(D), D = Σ_t g_t ā_tᵀ, so MAT(Z(F)v) = scale·Σ Dᵀ V D and
      MAT(Z(F)ᵀu) = scale·Σ D U Dᵀ: O(m·c·(T·d_a·d_g + k·d_a·d_g·(d_a + d_g))).
    * finite r: a Python loop over the 2·r_h + 1 clipped row offsets δr
      (r_h = min(r, H−1)) — never over samples or positions.  For each δr, every
      pair of columns of rows i and i + δr is formed at once as a ``[W, W]`` block
      (one batched GEMM) and masked to |Δcol| ≤ r, so the 2-D band (3.35) is applied
      exactly.  V g_t' (resp. U ā_t') is computed once up front.  Z(F)·v costs
      O(k·m·(c·T·d_g² + (2r_h+1)·T·W·(c·d_g + d_a) + T·d_a²)) flops, all in GEMMs, and
      Z(F)ᵀ·u the same with the roles of (d_a) and (c, d_g) swapped; memory
      O(k·m·(c·T·d_g + T·d_a + T·W)).  The masked column blocks do up to W/(2r+1)
      times the strictly needed pair products; in exchange a loop over the (2r+1)²
      2-D offsets (exact pair work, but one elementwise pass over ``[m, T, d_a]`` per
      offset) becomes 2r+1 GEMMs.  That pays off when d_a is large (unfolded patches)
      and on GPUs; for wide grids with tiny d_a the offset loop would be cheaper.

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
        _check_statistics("ConvZOperator", a, g)
        if g.ndim == 3:
            g = g.unsqueeze(1)
        H, W = (int(s) for s in spatial_shape)
        if a.ndim != 3 or g.ndim != 4 or a.shape[0] != g.shape[0] or a.shape[1] != g.shape[2] or a.shape[1] != H * W:
            raise ShapeError(
                f"ConvZOperator: expected a [m, T, d_a] and g [m, c, T, d_g] or [m, T, d_g] with the same m "
                f"and T = H·W = {H}·{W} = {H * W}; got a {list(a.shape)} and g {list(g.shape)}"
            )
        if radius is not None and (isinstance(radius, bool) or not isinstance(radius, int) or radius < 0):
            raise ConfigError(f"ConvZOperator: expected radius an int ≥ 0 or None, got {radius!r}")
        super().__init__(a.shape[2], g.shape[3], dtype=a.dtype, device=a.device)
        self.a = a
        self.g = g
        self.spatial_shape = (H, W)
        self.radius = radius
        self.scale = float(scale)
        self._exact = radius is None or radius >= max(H, W) - 1
        if self._exact:
            # D_bc = Σ_t g_{b,c,t} ā_{b,t}ᵀ = MAT of the per-(sample, column) gradient
            m, c = g.shape[:2]
            self._D = torch.einsum("bctg,bti->bcgi", g, a).reshape(m * c, self.b_dim, self.a_dim)

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        Vm = _mats(V, self.b_dim)  # [k, d_g, d_g]
        if self._exact:
            VD = torch.einsum("kgh,nhj->kngj", Vm, self._D)  # [k, m·c, d_g, d_a]
            out = torch.einsum("ngi,kngj->kij", self._D, VD)  # Σ Dᵀ V D
            return self.scale * _vecs(out)
        H, W = self.spatial_shape
        m, c, T, d_g = self.g.shape
        k = Vm.shape[0]
        g = self.g.reshape(m, c, H, W, d_g)
        a = self.a.reshape(m, H, W, self.a_dim)
        band = _column_band(W, self.radius, dtype=self.dtype, device=self.device)
        Vg = torch.einsum("kgh,bcxyh->kbcxyg", Vm, g)  # V g_t' for every position
        # acc[t] = Σ_{t' in band(t)} (Σ_c g_tᵀ V g_t') ā_t', so MAT(Z(F)v) = Σ_t ā_t acc[t]ᵀ
        acc = torch.zeros(k, m, H, W, self.a_dim, dtype=self.dtype, device=self.device)
        for rt, rs in _row_offsets(H, self.radius):
            # P[.., x, j, l] = Σ_c g_{(x, j)}ᵀ V g_{(x+δr, l)}, kept where |j − l| ≤ r
            P = torch.einsum("bcxjg,kbcxlg->kbxjl", g[:, :, rt], Vg[:, :, :, rs]) * band
            acc[:, :, rt] += P @ a[:, rs]
        out = torch.einsum("bti,kbtj->kij", self.a, acc.reshape(k, m, T, self.a_dim))
        return self.scale * _vecs(out)

    def _rmatvec(self, U: torch.Tensor) -> torch.Tensor:
        Um = _mats(U, self.a_dim)  # [k, d_a, d_a]
        if self._exact:
            DU = torch.einsum("ngi,kij->kngj", self._D, Um)  # [k, m·c, d_g, d_a]
            out = torch.einsum("kngj,nhj->kgh", DU, self._D)  # Σ D U Dᵀ
            return self.scale * _vecs(out)
        H, W = self.spatial_shape
        m, c, T, d_g = self.g.shape
        k = Um.shape[0]
        g = self.g.reshape(m, c, H, W, d_g)
        a = self.a.reshape(m, H, W, self.a_dim)
        band = _column_band(W, self.radius, dtype=self.dtype, device=self.device)
        Ua = torch.einsum("kij,bxyj->kbxyi", Um, a)  # U ā_t' for every position
        # acc[c, t] = Σ_{t' in band(t)} (ā_tᵀ U ā_t') g_{c,t'}, so MAT(Z(F)ᵀu) = Σ_{c,t} g_{c,t} acc[c, t]ᵀ
        acc = torch.zeros(k, m, c, H, W, d_g, dtype=self.dtype, device=self.device)
        for rt, rs in _row_offsets(H, self.radius):
            # P[.., x, j, l] = ā_{(x, j)}ᵀ U ā_{(x+δr, l)}, kept where |j − l| ≤ r
            P = torch.einsum("bxji,kbxli->kbxjl", a[:, rt], Ua[:, :, rs]) * band
            acc[:, :, :, rt] += P.unsqueeze(2) @ g[:, :, rs]
        out = torch.einsum("bcth,kbctj->khj", self.g, acc.reshape(k, m, c, T, d_g))
        return self.scale * _vecs(out)


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

    def _matvec(self, V: torch.Tensor) -> torch.Tensor:
        out = self.base_coeff * self.base.matvec(V) if self.base is not None else None
        if self.terms:
            low_rank = self.term_coeff * (self._R @ (self._S.T @ V))
            out = low_rank if out is None else out + low_rank
        return out

    def _rmatvec(self, U: torch.Tensor) -> torch.Tensor:
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
