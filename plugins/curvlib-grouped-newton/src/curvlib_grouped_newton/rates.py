"""Per-group learning rates η from a summary (seed 004 Method 4.1, §4.2, appendix D).

η solves the cubic-regularized system (2), (H̄ + (λ_int/2)‖Dη‖D²)η = ḡ, by
:func:`~curvlib_grouped_newton.cubic.solve_anisotropic_cubic`, with D = diag(|D̄_s|^{1/3})
(:func:`~curvlib_grouped_newton.cubic.cubic_scales`); λ_int = 0 gives the step (1),
H̄η = ḡ.  The update is θ ← θ − Σ_s η_s u_s = θ − Uη (Method 4.1: L(θ − Uη) decreases
by ≈ ḡᵀη − ½ηᵀH̄η, so η > 0 is a step *against* u when u is the gradient).

Groups on which u vanishes (zero columns of U) carry no information (zero rows of H̄, ḡ
and D̄); they are left out of the solve and get η_s = 0.

Groups with D̄_s = 0 (the loss is exactly quadratic along u_s) are solved exactly by the
solver's reduction.  Only when that leaves the cubic model unbounded below (H̄ restricted
to those groups not positive definite) is a fallback needed: those groups then get the
scale d_s = ``zero_scale``·max_t d_t (by default the largest scale seen: the most
cautious choice available without third-order information along them), with a
:class:`~curvlib.errors.NumericalWarning`; if no group has third-order information the
step (1) H̄η = ḡ is used.  The fallback is the one place where the invariance of
appendix E is given up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from curvlib.errors import ConfigError, NotPSDError, NumericalWarning, ShapeError

from curvlib_grouped_newton.cubic import CubicSolution, cubic_scales, solve_anisotropic_cubic
from curvlib_grouped_newton.summary import GroupedSummary

__all__ = ["GroupedRates", "learning_rates", "solve_summary"]


@dataclass(frozen=True)
class GroupedRates:
    """η for every group and the solve that produced it.

    Attributes:
        eta: η ``[S]`` (float64), 0 on inactive groups.
        active: which groups entered the solve ``[S]`` (bool).
        scales: d = |D̄|^{1/3} on the active groups, as used (after a fallback); ``None``
            when λ_int = 0.
        fallback: whether the zero-scale fallback was taken (module docstring).
        solution: the :class:`~curvlib_grouped_newton.cubic.CubicSolution` of the active subproblem.
    """

    eta: torch.Tensor
    active: torch.Tensor
    scales: torch.Tensor | None
    solution: CubicSolution
    fallback: bool = False


def solve_summary(
    g_bar: torch.Tensor,
    H_bar: torch.Tensor,
    D_bar: torch.Tensor | None,
    active: torch.Tensor,
    strength: float,
    *,
    zero_scale: float = 1.0,
) -> GroupedRates:
    """η ``[S]`` from ḡ ``[S]``, H̄ ``[S, S]``, D̄ ``[S]`` on the ``active`` ``[S]`` groups (module docstring).

    Raises:
        ConfigError: λ_int > 0 without D̄.
        ShapeError: inconsistent shapes.
    """
    S = g_bar.shape[0]
    if H_bar.shape != (S, S) or active.shape != (S,) or (D_bar is not None and D_bar.shape != (S,)):
        raise ShapeError(f"solve_summary: expected ḡ [S], H̄ [S, S], D̄ [S], active [S]; got {list(g_bar.shape)}, "
                         f"{list(H_bar.shape)}, {None if D_bar is None else list(D_bar.shape)}, {list(active.shape)}")
    if strength > 0 and D_bar is None:
        raise ConfigError("grouped Newton: λ_int > 0 needs the order-3 diagonal D̄ (third_order=True)")
    idx = active.nonzero().squeeze(1)
    if idx.numel() == 0:  # u = 0: nothing to step along
        zero = torch.zeros(S, dtype=torch.float64, device=g_bar.device)
        return GroupedRates(zero, active.clone(), None, CubicSolution(zero[:0], 0.0, "zero", float("nan"), 0))
    Ha = H_bar.to(torch.float64)[idx][:, idx]
    ga = g_bar.to(torch.float64)[idx]
    fallback = False
    if strength > 0:
        d = cubic_scales(D_bar.to(torch.float64)[idx])
        try:
            sol = solve_anisotropic_cubic(Ha, ga, d, float(strength))
        except NotPSDError as exc:
            fallback = True
            top = float(d.max())
            if top > 0:
                d = torch.where(d > 0, d, torch.full_like(d, zero_scale * top))
                sol = solve_anisotropic_cubic(Ha, ga, d, float(strength))
                what = f"gave them the scale d = {zero_scale:g}·max d"
            else:
                sol = solve_anisotropic_cubic(Ha, ga, d, 0.0)
                d = None
                what = "used the unregularized step (1), H̄η = ḡ"
            warnings.warn(f"grouped Newton: {exc}; {what}", NumericalWarning, stacklevel=3)
    else:
        d = None
        sol = solve_anisotropic_cubic(Ha, ga, torch.ones_like(ga), 0.0)
    eta = torch.zeros(S, dtype=torch.float64, device=g_bar.device)
    eta[idx] = sol.eta
    return GroupedRates(eta, active.clone(), d, sol, fallback)


def learning_rates(summary: GroupedSummary, strength: float, *, zero_scale: float = 1.0) -> GroupedRates:
    """η for a :class:`~curvlib_grouped_newton.summary.GroupedSummary` (module docstring).

    Args:
        summary: ḡ, H̄, D̄ along u.
        strength: λ_int ≥ 0 of the cubic term (§4.2); 0: the unregularized step (1).
        zero_scale: the fallback scale of groups with D̄_s = 0, relative to max d (module docstring).
    """
    active = (summary.basis.column_norms() > 0) & torch.isfinite(summary.basis.column_norms())
    return solve_summary(summary.g_bar, summary.H_bar, summary.D_bar, active, strength, zero_scale=zero_scale)
