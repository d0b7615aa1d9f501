"""Exact and block-diagonal natural gradient by Sherman–Morrison–Woodbury (thesis §4.4.1).

These are the reference preconditioners of DESIGN.md §3 (and possible first levels of a
two-level method): operators of the operator base that solve with the exact damped curvature
F• = F + λI built from the per-sample Jacobian statistics (appendices 4.A–4.B).

With C = scale·JJᵀ (J ``[p, n]``, n = m·c (sample, column) pairs: m samples times the
back-propagated columns c — MC samples of ``fisher``, output dimensions of ``ggn``), and
m' = 1/scale,

    (C + λI)⁻¹ u = λ⁻¹ u − λ⁻² m'⁻¹ J (I_n + (λm')⁻¹ JᵀJ)⁻¹ Jᵀ u                  (4.49)–(4.50)

only needs JᵀJ ``[n, n]`` ((4.78) for Linear, (4.79) for conv and transposed conv, from
``F.JtJ()``), and products with J and Jᵀ (appendix 4.A.2), never J or a p × p matrix.
The n × n system is factorised once (Cholesky) by :class:`~curvlib.linalg.WoodburySolver`.
Block-diagonal NG (4.51)–(4.52) does the same per layer with J_i and J_iᵀJ_i.

Cost: building JᵀJ is O(n²·Σ_i T_i²·(a_i + g_i)) (O(n²·Σ_i(a_i + g_i)) for Linear layers),
the factorisation O(n³) (ℓ of them for the block version); one product O(n·p).  Memory
O(n²) (ℓ·n² for the block version).  Affordable while n = m·c stays in the thousands.
"""

from __future__ import annotations

from typing import Any

import torch

from curvlib.config import positive_damping
from curvlib.curvatures.operator import CurvatureOperator
from curvlib.errors import ConfigError
from curvlib.linalg import BlockDiagonalOperator, LinearOperator, VectorLayout, WoodburySolver

__all__ = ["BlockNaturalGradient", "ExactNaturalGradient", "block_natural_gradient", "exact_natural_gradient"]


def _check(curvature: Any, damping: float, who: str) -> float:
    if not isinstance(curvature, CurvatureOperator):
        raise ConfigError(
            f"{who}: needs a curvature with a per-sample Jacobian factorization C = scale·JJᵀ "
            f"('fisher', 'empirical_fisher', 'ggn'); got {type(curvature).__name__}"
        )
    return positive_damping(damping, who)


class _WoodburyOperator(LinearOperator):
    """(C + λI)⁻¹ ``[p, p]`` applied by a :class:`~curvlib.linalg.WoodburySolver`."""

    symmetric = True

    def __init__(self, solver: WoodburySolver, p: int, dtype: torch.dtype, device: torch.device,
                 layout: VectorLayout | None = None) -> None:
        self.solver, self._p, self._dtype, self._device, self._layout = solver, int(p), dtype, device, layout

    @property
    def shape(self) -> tuple[int, int]:
        return (self._p, self._p)

    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        return self.solver.solve(U)


class ExactNaturalGradient(_WoodburyOperator):
    """ζ = (F + λI)⁻¹u, exact, by Woodbury on the n × n Gram matrix JᵀJ (4.49)–(4.50), (4.78)–(4.79).

    Args:
        curvature: a :class:`~curvlib.curvatures.operator.CurvatureOperator` (``fisher``,
            ``empirical_fisher``, ``ggn``; Linear, Conv2d, ConvTranspose2d layers).
        damping: λ > 0.

    Attributes:
        damping, n (the size of the solved system, ``F.num_pairs``), solver
        (:class:`~curvlib.linalg.WoodburySolver`).
    """

    def __init__(self, curvature: Any, damping: float) -> None:
        self.damping = _check(curvature, damping, "exact_natural_gradient")
        self.curvature = F = curvature
        self.n = F.num_pairs
        solver = WoodburySolver(F.JtJ(), self.damping, 1.0 / F.scale, F.J, F.Jt)
        super().__init__(solver, F.p, F.dtype, F.device, F.layout)

    @property
    def p(self) -> int:
        return self._p

    def __repr__(self) -> str:
        return f"ExactNaturalGradient(p={self.p}, n={self.n}, damping={self.damping:g})"


class BlockNaturalGradient(BlockDiagonalOperator):
    """ζ_i = (F_ii + λI)⁻¹u[i] for every layer i (4.51)–(4.52), by Woodbury on J_iᵀJ_i.

    Block-diagonal, with blocks ``slices`` (the layers): a first level for
    :func:`~curvlib.coarse.api.two_level` whose block inverse is exact.

    Args:
        curvature: a :class:`~curvlib.curvatures.operator.CurvatureOperator`.
        damping: λ > 0.

    Attributes:
        damping, n, slices (``F.layers[i].slice``), blocks (one Woodbury-applied
        (F_ii + λI)⁻¹ operator per layer).
    """

    def __init__(self, curvature: Any, damping: float) -> None:
        self.damping = _check(curvature, damping, "block_natural_gradient")
        self.curvature = F = curvature
        self.n = F.num_pairs
        blocks = [
            _WoodburyOperator(WoodburySolver(F.JtJ_i(i), self.damping, 1.0 / F.scale,
                                             lambda w, i=i: F.J_i(i, w), lambda u, i=i: F.Jt_i(i, u)),
                              L.p_i, F.dtype, F.device)
            for i, L in enumerate(F.layers)
        ]
        super().__init__(blocks, [L.slice for L in F.layers], p=F.p, layout=F.layout)

    def __repr__(self) -> str:
        return f"BlockNaturalGradient(p={self.p}, layers={len(self.slices)}, n={self.n}, damping={self.damping:g})"


def exact_natural_gradient(curvature: Any, damping: float) -> ExactNaturalGradient:
    """(F + λI)⁻¹ as an operator, exact, via Woodbury on JᵀJ ``[n, n]`` (4.50), (4.78)–(4.79).

    Example::

        ng = curvlib.exact_natural_gradient(F, damping=1e-3)
        ng @ F.gradient_vector()          # [p]; also [p, k] and lists shaped like F.params()
    """
    return ExactNaturalGradient(curvature, damping)


def block_natural_gradient(curvature: Any, damping: float) -> BlockNaturalGradient:
    """diag_i (F_ii + λI)⁻¹ as an operator, exact per layer via Woodbury on J_iᵀJ_i (4.52).

    Example::

        bng = curvlib.block_natural_gradient(F, damping=1e-3)
        pre = curvlib.two_level(bng, F, "residual", damping=1e-3)
    """
    return BlockNaturalGradient(curvature, damping)
