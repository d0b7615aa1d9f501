"""Exact and block-diagonal natural gradient by Sherman–Morrison–Woodbury (thesis §4.4.1).

These are reference preconditioners (and possible first levels of a two-level method).
They live next to the two-level code because both solve with the exact damped curvature
F• = F + λI built from the same per-sample Jacobian statistics (appendices 4.A–4.B).

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

import math
from typing import Any

import torch

from curvlib.coarse.base import _SquareOnCurvature
from curvlib.curvatures.operator import CurvatureOperator
from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError
from curvlib.linalg import WoodburySolver

__all__ = ["BlockNaturalGradient", "ExactNaturalGradient"]


def _check(curvature: Any, damping: float, who: str) -> float:
    if not isinstance(curvature, CurvatureOperator):
        raise ConfigError(
            f"{who}: needs a curvature with a per-sample Jacobian factorization C = scale·JJᵀ "
            f"('fisher', 'empirical_fisher', 'ggn'); got {type(curvature).__name__}"
            + (f" (kind {curvature.kind!r})" if getattr(curvature, "kind", "") else "")
        )
    try:
        lam = float(damping)
    except (TypeError, ValueError):
        raise ConfigError(f"{who}: damping must be a number > 0, got {damping!r}") from None
    if not (math.isfinite(lam) and lam > 0):
        raise ConfigError(f"{who}: damping λ must be finite and > 0, got {damping!r}")
    return lam


class _NaturalGradientBase(_SquareOnCurvature):
    """Shared shape handling: ``@`` on ``[p]``, ``[p, k]`` or a list shaped like ``F.params()``."""

    curvature: CurvatureOperator

    @property
    def p(self) -> int:
        return self.curvature.p

    def _solve(self, U: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matvec(self, u: Any) -> Any:
        """(F + λI)⁻¹u (or its block-diagonal version) for u ``[p]`` -> ``[p]``,
        ``[p, k]`` -> ``[p, k]``, or a list shaped like ``F.params()`` -> the same."""
        F = self.curvature
        if isinstance(u, (list, tuple)):
            return F.vector_to_params(self._solve(F.params_to_vector(list(u)).unsqueeze(1))[:, 0])
        if not isinstance(u, torch.Tensor):
            raise ShapeError(f"{type(self).__name__}: expected a tensor or a list of tensors, got {type(u).__name__}")
        if u.dtype != self.dtype or u.device != self.device:
            raise DTypeDeviceError(
                f"{type(self).__name__}: operator is {self.dtype} on {self.device}, vector is {u.dtype} on {u.device}"
            )
        if u.ndim == 1 and u.shape[0] == self.p:
            return self._solve(u.unsqueeze(1))[:, 0]
        if u.ndim == 2 and u.shape[0] == self.p:
            return self._solve(u)
        raise ShapeError(f"{type(self).__name__}: expected [{self.p}] or [{self.p}, k], got {list(u.shape)}")

    __matmul__ = matvec

    def matmat(self, U: torch.Tensor) -> torch.Tensor:
        """``U [p, k]`` -> ``[p, k]``."""
        if not isinstance(U, torch.Tensor) or U.ndim != 2:
            raise ShapeError(f"{type(self).__name__}.matmat: expected [{self.p}, k], got {getattr(U, 'shape', U)!r}")
        return self.matvec(U)


class ExactNaturalGradient(_NaturalGradientBase):
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
        self.curvature = curvature
        F = curvature
        self.n = F.num_pairs
        self.solver = WoodburySolver(F.JtJ(), self.damping, 1.0 / F.scale, F.J, F.Jt)

    def _solve(self, U: torch.Tensor) -> torch.Tensor:
        return self.solver.solve(U)

    def __repr__(self) -> str:
        return f"ExactNaturalGradient(p={self.p}, n={self.n}, damping={self.damping:g})"


class BlockNaturalGradient(_NaturalGradientBase):
    """ζ_i = (F_ii + λI)⁻¹u[i] for every layer i (4.51)–(4.52), by Woodbury on J_iᵀJ_i.

    Block-diagonal, with blocks ``slices`` (the layers): a first level for
    :func:`~curvlib.coarse.api.two_level` whose block inverse is exact.

    Args:
        curvature: a :class:`~curvlib.curvatures.operator.CurvatureOperator`.
        damping: λ > 0.

    Attributes:
        damping, n, slices (``F.layers[i].slice``), blocks (one
        :class:`~curvlib.linalg.WoodburySolver` per layer).
    """

    def __init__(self, curvature: Any, damping: float) -> None:
        self.damping = _check(curvature, damping, "block_natural_gradient")
        self.curvature = curvature
        F = curvature
        self.n = F.num_pairs
        self.slices: list[slice] = [L.slice for L in F.layers]
        self.blocks: list[WoodburySolver] = [
            WoodburySolver(F.JtJ_i(i), self.damping, 1.0 / F.scale,
                           lambda w, i=i: F.J_i(i, w), lambda u, i=i: F.Jt_i(i, u))
            for i in range(len(F.layers))
        ]

    def _solve(self, U: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(U)
        for s, solver in zip(self.slices, self.blocks):
            out[s] = solver.solve(U[s])
        return out

    def __repr__(self) -> str:
        return f"BlockNaturalGradient(p={self.p}, layers={len(self.slices)}, n={self.n}, damping={self.damping:g})"
