"""How positions combine: KFAC factors (expand / reduce) and the Z-operator of a layer block.

Weight sharing (Eschenhagen et al., "Kronecker-Factored Approximate Curvature for Modern
Neural Network Architectures", NeurIPS 2023) comes in two settings, chosen by the
approximator option ``weight_sharing``:

* ``"expand"`` — every position acts like an extra sample.  With T positions of one use
  (T = Σ_u T_u over the uses of one orientation),

      A = (1/m) Σ_b Σ_t ā_{b,t} ā_{b,t}ᵀ,     G = (scale/T) Σ_{b,c,t} g_{b,c,t} g_{b,c,t}ᵀ,

  which is KFC for convolutions (3.29)–(3.30) and KFAC (3.19) for T = 1.  A ⊗ G is the
  KFAC of the *expand block* F_0 = scale·Σ_{b,c,t} ā_t ā_tᵀ ⊗ g_t g_tᵀ (the block with
  only the pairs t = t'), and under the hypotheses of §3.4.1 it estimates F_ii itself.
* ``"reduce"`` — positions are reduced first: â_b = (1/T) Σ_t ā_{b,t} and
  ĝ_{b,c} = Σ_t g_{b,c,t}, then KFAC of one position,

      A = (1/m) Σ_b â_b â_bᵀ,     G = scale · Σ_{b,c} ĝ_{b,c} ĝ_{b,c}ᵀ,

  the KFAC of the *reduce block* scale·Σ_{b,c} vec(ĝ âᵀ) vec(ĝ âᵀ)ᵀ, exact when ā_t does
  not depend on t.

Both reduce to plain KFAC (3.19) when T = 1.  Uses whose matrix enters W̄ transposed (a
weight tied between an embedding and an output layer) form their own group: each group
gives one Kronecker term, the transposed group's factors swapped (K(A⊗G)Kᵀ = G⊗A), so a
tied block's KFAC is a sum of two terms, ordered as the uses are (the untransposed first).

The SVD-based approximators fit "the block of the chosen setting" through
:func:`z_operator`: for ``"expand"`` the block of each use restricted to the ∞-norm band
‖t − t'‖∞ ≤ r of its geometry (r = the kernel size for convolutions by default — the
thesis's §3.4.3 —, 0 for positions without a kernel, i.e. F_0; ``None`` for every pair,
the exact block); for ``"reduce"`` the reduce block.  Several uses of one block: with a
finite radius the sum of the per-use banded blocks (pairs of positions of different uses
are left out, as pairs farther apart than the band are); with ``None``, or in the reduce
setting, the exact block of the summed per-pair gradients.
"""

from __future__ import annotations

from typing import Literal

import torch

from curvlib.curvatures.statistics import LayerStatistics, Use
from curvlib.errors import ConfigError
from curvlib.linalg.geometry import Geometry
from curvlib.linalg.zproducts import ZOperator
from curvlib.linalg.rows import DenseRows, symmetric_product
from curvlib.linalg.zproducts import ExactZOperator, PositionZOperator, SumZOperator, TransposedZOperator

__all__ = ["WEIGHT_SHARING", "WeightSharing", "kfac_factors", "reduced", "resolve_radius", "z_operator"]

WeightSharing = Literal["expand", "reduce"]
WEIGHT_SHARING: tuple[str, ...] = ("expand", "reduce")

Term = tuple[torch.Tensor, torch.Tensor]


def _check_setting(weight_sharing: str) -> None:
    if weight_sharing not in WEIGHT_SHARING:
        raise ConfigError(f"weight_sharing must be 'expand' or 'reduce', got {weight_sharing!r}")


def _groups(stats: LayerStatistics) -> list[list[Use]]:
    """The uses grouped by orientation, in the order of their first appearance."""
    groups: dict[bool, list[Use]] = {}
    for u in stats.uses:
        groups.setdefault(u.transposed, []).append(u)
    return list(groups.values())


def reduced(stats: LayerStatistics) -> LayerStatistics:
    """The statistics of the reduce setting: one use without positions per orientation,
    â_b = (1/T) Σ_{u,t} ā_{u,b,t}, ĝ_{b,c} = Σ_{u,t} g_{u,b,c,t} (T = Σ_u T_u of the group).

    The identity for a block whose uses have no positions (T = 1) and one orientation.
    """
    groups = _groups(stats)
    if len(groups) == 1 and len(groups[0]) == 1 and groups[0][0].T == 1:
        return stats
    uses = []
    for group in groups:
        T = sum(u.T for u in group)
        a = sum(u.a.position_sum().a for u in group) / T  # [m, 1, d]
        g = sum(u.g.sum(2, keepdim=True) for u in group)  # [m, c, 1, d']
        uses.append(Use(DenseRows(a), g, Geometry.none(), group[0].transposed))
    return LayerStatistics(uses=uses, scale=stats.scale, has_bias=stats.has_bias)


def kfac_factors(stats: LayerStatistics, weight_sharing: WeightSharing = "expand") -> list[Term]:
    """The KFAC factors of one batch (module docstring): one term (A ``[d_a, d_a]``,
    G ``[d_g, d_g]``) per orientation group, symmetric PSD, in the statistics' dtype.

    Cost: O(m·T·(d_a² + c·d_g²)) (two GEMMs per use); one-hot rows give a diagonal A from
    token counts, O(m·T).
    """
    _check_setting(weight_sharing)
    if weight_sharing == "reduce":
        stats = reduced(stats)
    m, scale = stats.m, float(stats.scale)
    terms = []
    for group in _groups(stats):
        T = sum(u.T for u in group)
        A = _symmetrized([u.a.gram() for u in group], 1.0 / m, exact=all(u.a.exact_symmetric_gram for u in group))
        G = _symmetrized([_g_gram(u.g) for u in group], scale / T, exact=True)
        terms.append((G, A) if group[0].transposed else (A, G))
    return terms


def _symmetrized(grams: list[torch.Tensor], c: float, *, exact: bool) -> torch.Tensor:
    """c·(S + Sᵀ)/2 for S the sum of ``grams``: one new matrix (the grams are fresh and summed in
    place), not the five temporaries of the textbook expression.  ``exact``: every gram is
    exactly symmetric, and so is their sum (entrywise additions), so c·S is returned without
    the transposed pass (~1 ms for a [1000, 1000] factor on one CPU thread)."""
    S = grams[0]
    for M in grams[1:]:
        S = S.add_(M)
    return S.mul_(c) if exact else (S + S.mT).mul_(0.5 * c)


def _g_gram(g: torch.Tensor) -> torch.Tensor:
    g2 = g.reshape(-1, g.shape[-1])
    return symmetric_product(g2.T, g2)


def resolve_radius(geometry: Geometry, band_radius: int | str | None) -> int | None:
    """The band radius of one use: ``"kernel"`` -> the kernel size (0 without a kernel),
    an int or ``None`` as given."""
    if band_radius == "kernel":
        return geometry.kernel_radius
    if band_radius is not None and (isinstance(band_radius, bool) or not isinstance(band_radius, int) or band_radius < 0):
        raise ConfigError(f"band_radius must be 'kernel', an int ≥ 0 or None, got {band_radius!r}")
    return band_radius


def z_operator(
    stats: LayerStatistics, weight_sharing: WeightSharing = "expand", band_radius: int | str | None = "kernel"
) -> ZOperator:
    """The matrix-free Z(F) of the block of the chosen setting (module docstring), ``[d_a², d_g²]``.

    Args:
        stats: the layer's statistics.
        weight_sharing: ``"expand"`` or ``"reduce"``.
        band_radius: ``"expand"`` only: ``"kernel"``, an int r ≥ 0, or ``None`` (every pair).
    """
    _check_setting(weight_sharing)
    if weight_sharing == "reduce":
        stats, band_radius = reduced(stats), None
    if len(stats.uses) > 1 and band_radius is None:
        return ExactZOperator(stats.pair_gradients(), stats.scale)
    ops: list[ZOperator] = []
    for u in stats.uses:
        op: ZOperator = PositionZOperator(u.a, u.g, u.geometry, resolve_radius(u.geometry, band_radius), stats.scale)
        ops.append(TransposedZOperator(op) if u.transposed else op)
    return ops[0] if len(ops) == 1 else SumZOperator(ops)
