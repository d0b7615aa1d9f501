"""The ``grouped_direction`` coarse space: one column per group, the direction u restricted
to that group.

Seed 004 §4.1 steps along θ ← θ − Σ_s η_s u_s, where u_s is the direction u (the gradient
or its momentum) restricted to group s and zero elsewhere.  Written with curvlib's coarse
basis (thesis (4.23)) over a :class:`~curvlib.coarse.Partition` of the flat parameter
vector into S groups,

    R₀ᵀ = U = diag(u[g_1], …, u[g_S])  ``[p, S]``,   V_s = u[g_s]  ``[p_s, 1]``,

so that R₀ᵀη = Σ_s η_s u_s, R₀∇L = ḡ (ḡ_s = u_sᵀ∇L) and the coarse operator with a zero
first level and no damping is exactly seed 004's summary Hessian

    R₀ H R₀ᵀ = Uᵀ H U = H̄,   H̄_st = u_sᵀ H u_t                                     (§4.1, (1))

(:func:`curvlib.coarse.exact_coarse_operator` with ``damping=0`` on the ``hessian``
curvature).  With a damping λ > 0, ``curvlib.two_level(None, H, "grouped_direction",
damping=λ, partition=...)`` applied to the gradient g is
U (H̄ + λ UᵀU)⁻¹ Uᵀ g: the step (1) with a Levenberg–Marquardt term λ‖u_s‖² per group.
The partition is the caller's: ``Partition.parameter_tensors(F)`` for seed 004's canonical
partition (one group per weight and bias tensor), or any other.

Options: ``direction="input"`` (default) takes u from the vector being preconditioned
(``CoarseContext.u``: the gradient in a two-level preconditioner), so the basis depends on
the input; ``direction="gradient"`` takes the loss gradient the curvature operator captured
(``F.gradient_vector()``), fixed for that operator.
"""

from __future__ import annotations

from typing import Literal

import torch

from curvlib.coarse import CoarseBasis, CoarseContext, CoarseSpace
from curvlib.config import StrictModel
from curvlib.errors import ConfigError, DTypeDeviceError, ShapeError

__all__ = ["GroupedDirectionCoarseSpace", "GroupedDirectionOptions"]


class GroupedDirectionOptions(StrictModel):
    """Options of the ``grouped_direction`` coarse space.

    Attributes:
        direction: where u comes from: ``"input"`` — the vector being preconditioned
            (``ctx.u``); ``"gradient"`` — the curvature's captured gradient
            (``ctx.curvature.gradient_vector()``).
    """

    direction: Literal["input", "gradient"] = "input"


class GroupedDirectionCoarseSpace(CoarseSpace):
    """V_s = u[g_s] ``[p_s, 1]`` for every group s, N = S: R₀ᵀ = diag(u_1, …, u_S) (seed 004 §4.1).

    A group on which u vanishes gives a zero column (two-level preconditioners drop it).
    """

    kind = "grouped_direction"
    Options = GroupedDirectionOptions

    @property
    def depends_on_input(self) -> bool:
        return self.options.direction == "input"

    def _direction(self, ctx: CoarseContext) -> torch.Tensor:
        if self.options.direction == "input":
            if ctx.u is None:
                raise ConfigError(
                    "coarse space 'grouped_direction' (direction='input') needs the vector u being preconditioned "
                    "(CoarseContext.u); got None — pass u, or use direction='gradient'"
                )
            u = ctx.u
        else:
            gradient = getattr(ctx.curvature, "gradient_vector", None)
            if not callable(gradient):
                raise ConfigError(
                    "coarse space 'grouped_direction' (direction='gradient') needs a curvature with gradient_vector(); "
                    f"got {type(ctx.curvature).__name__}"
                )
            u = gradient()
        if not isinstance(u, torch.Tensor) or u.shape != (ctx.p,):
            raise ShapeError(f"coarse space 'grouped_direction': expected u [{ctx.p}], got "
                             f"{list(getattr(u, 'shape', [])) or type(u).__name__}")
        if u.dtype != ctx.dtype or u.device != ctx.device:
            raise DTypeDeviceError(f"coarse space 'grouped_direction': the curvature is {ctx.dtype} on {ctx.device}, "
                                   f"u is {u.dtype} on {u.device}")
        return u

    def basis(self, ctx: CoarseContext) -> CoarseBasis:
        """R₀ᵀ = diag(u[g_1], …, u[g_S]) ``[p, S]`` over ``ctx.partition``."""
        u = self._direction(ctx)
        part = ctx.partition
        cols = [part.take(u, s).unsqueeze(1) for s in range(len(part))]
        return CoarseBasis(part, cols, meta={"direction": self.options.direction})
