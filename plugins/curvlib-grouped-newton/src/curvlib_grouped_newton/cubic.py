"""The anisotropic Nesterov cubic regularization of seed 004 (§4.2, appendix D).

Notation (seed 004): S groups, the summary gradient ḡ ``[S]``, the summary Hessian
H̄ ``[S, S]`` (symmetric, possibly indefinite), the order-3 diagonal D̄ ``[S]`` with
D̄_s = ∇³L[u_s, u_s, u_s], and the diagonal scaling

    D = diag(d),  d_s = |D̄_s|^{1/3} > 0                                          (§4.2)

(:func:`cubic_scales`).  The learning rates η ``[S]`` of the step θ ← θ − Σ_s η_s u_s
minimize the cubic model of L(θ − Uη) − L(θ):

    m(η) = −ḡᵀη + ½ ηᵀH̄η + (λ_int/6) ‖Dη‖³                                        (§4.2)

with λ_int ≥ 0 the internal damping.  A stationary point solves

    (H̄ + (λ_int/2) ‖Dη‖ D²) η = ḡ                                                   (2)

(with λ_int = 0: H̄η = ḡ, the unregularized step (1)).  With ξ = Dη, g̃ = D⁻¹ḡ and
H̃ = D⁻¹H̄D⁻¹ = QΛQᵀ (λ_1 ≤ … ≤ λ_S), (2) becomes (H̃ + c r I) ξ = g̃ with c = λ_int/2 and
r = ‖ξ‖ (appendix D, (3)–(4)), so every solution is ξ(r) = Q (Λ + c r)⁻¹ Qᵀ g̃ for a
scalar r ≥ 0 that solves the secular equation

    ‖ξ(r)‖ = r                                                                         (5)/(6)

- *Case 1, H̃ (equivalently H̄) positive definite* (appendix D, (5)): r ↦ ‖ξ(r)‖ decreases
  from ‖H̃⁻¹g̃‖ at r = 0, so (5) has exactly one root in [0, ‖H̃⁻¹g̃‖]; m is then
  minimized by it.
- *Case 2, H̃ not positive definite* (appendix D, (6); Nesterov and Polyak, 2006, §5):
  the global minimizer is the solution of largest norm, the unique root of (6) with
  r > −λ_1/c, where H̃ + c r I is positive definite.  If g̃ has no component on the
  eigenvectors of λ_1 (the "hard case") and ‖ξ(r)‖ < r just above −λ_1/c, there is no
  such root: the minimizer is r = −λ_1/c, ξ = ξ_⊥ + τ v_1 with ξ_⊥ the minimum-norm
  solution on the other eigenvectors and τ = (r² − ‖ξ_⊥‖²)^{1/2} (sign fixed by making
  the largest entry of v_1 positive; both signs give the same model value).

The scalar root is bracketed and found by bisection in the variable t = r − r_lo ≥ 0
(r_lo = max(0, −λ_1/c)), whose denominators (λ_i − λ_1) + c t are computed without
cancellation; f(t) = ‖ξ‖ − r is strictly decreasing, the bracket upper end
t = (‖g̃‖/c)^{1/2} satisfies f ≤ 0, and bisection runs until the bracket is two adjacent
floats.  Everything runs in float64 (S is small; the documented upcast of this module).

Groups with d_s = 0 (no third-order information along u_s) are eliminated exactly by a
Schur complement before appendix D is applied to the others (:func:`solve_anisotropic_cubic`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from curvlib.errors import ConfigError, NotPSDError, NumericalError, NumericalWarning, ShapeError

__all__ = ["CubicSolution", "cubic_model", "cubic_scales", "solve_anisotropic_cubic"]

Case = Literal["zero", "newton", "positive_definite", "nesterov_polyak", "hard_case"]

_F64 = torch.float64
_MAX_BISECTIONS = 2100  # float64 bisection reaches adjacent floats within ~2100 halvings


@dataclass(frozen=True)
class CubicSolution:
    """The minimizer of the cubic model and how it was found.

    Attributes:
        eta: the learning rates η ``[S]`` (float64).
        radius: r = ‖Dη‖ (0 for ``"newton"`` and ``"zero"``).
        case: ``"zero"`` (ḡ = 0), ``"newton"`` (λ_int = 0: H̄η = ḡ, (1)),
            ``"positive_definite"`` (appendix D, case 1), ``"nesterov_polyak"`` (case 2),
            ``"hard_case"`` (case 2 without a root of (6) above −λ_1/c).
        min_eigenvalue: λ_1 of H̃ = D⁻¹H̄D⁻¹ (of H̄ for ``"newton"``).
        iterations: bisection steps used.
    """

    eta: torch.Tensor
    radius: float
    case: Case
    min_eigenvalue: float
    iterations: int


def cubic_scales(third: torch.Tensor) -> torch.Tensor:
    """d_s = |D̄_s|^{1/3} ``[S]`` (§4.2): the diagonal of D, in the units of 1/η_s.

    A group whose third directional derivative vanishes (a loss exactly quadratic along
    u_s, e.g. the last linear layer under a squared error) gets d_s = 0; see
    :func:`solve_anisotropic_cubic` for how such groups are solved exactly.

    Args:
        third: D̄ ``[S]``.
    """
    if third.ndim != 1:
        raise ShapeError(f"cubic_scales: expected D̄ [S], got {list(third.shape)}")
    d = third.to(_F64).abs().pow(1.0 / 3.0)
    if not bool(torch.isfinite(d).all()):
        raise NumericalError(f"cubic_scales: non-finite third derivatives D̄ = {third.tolist()}")
    return d


def cubic_model(eta: torch.Tensor, H_bar: torch.Tensor, g_bar: torch.Tensor, d: torch.Tensor,
                strength: float) -> torch.Tensor:
    """m(η) = −ḡᵀη + ½ηᵀH̄η + (λ_int/6)‖Dη‖³ (§4.2) for η ``[S]`` or ``[k, S]`` -> ``[]`` or ``[k]``."""
    E = eta.to(_F64)
    lin = E @ g_bar.to(_F64)
    quad = 0.5 * ((E @ H_bar.to(_F64)) * E).sum(-1)
    cub = strength / 6.0 * torch.linalg.vector_norm(E * d.to(_F64), dim=-1) ** 3
    return -lin + quad + cub


def _check(H_bar: torch.Tensor, g_bar: torch.Tensor, d: torch.Tensor, strength: float) -> int:
    S = g_bar.shape[0] if g_bar.ndim == 1 else -1
    if S < 1 or H_bar.shape != (S, S) or d.shape != (S,):
        raise ShapeError(
            f"solve_anisotropic_cubic: expected H̄ [S, S], ḡ [S], d [S]; got H̄ {list(H_bar.shape)}, "
            f"ḡ {list(g_bar.shape)}, d {list(d.shape)}"
        )
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
        raise ConfigError(f"solve_anisotropic_cubic: λ_int must be a finite number ≥ 0, got {strength!r}")
    for name, t in (("H̄", H_bar), ("ḡ", g_bar), ("d", d)):
        if not bool(torch.isfinite(t).all()):
            raise NumericalError(f"solve_anisotropic_cubic: {name} has non-finite entries")
    return S


def _newton(H: torch.Tensor, g: torch.Tensor) -> CubicSolution:
    """λ_int = 0: the unregularized step (1), η = H̄⁻¹ḡ (minimum-norm least squares if singular)."""
    evals = torch.linalg.eigvalsh(H)
    scale = float(evals.abs().max()) if evals.numel() else 0.0
    if scale == 0.0 or float(evals.abs().min()) <= 10 * H.shape[0] * torch.finfo(_F64).eps * scale:
        warnings.warn(
            f"grouped Newton: the summary Hessian H̄ [{H.shape[0]}×{H.shape[0]}] is singular (eigenvalues "
            f"{evals.min().item():.3e} … {evals.max().item():.3e}) and λ_int = 0; used the minimum-norm "
            "least-squares solution of H̄η = ḡ",
            NumericalWarning,
            stacklevel=3,
        )
        eta = torch.linalg.lstsq(H, g.unsqueeze(1), rcond=None, driver="gelsd").solution.squeeze(1)
    else:
        eta = torch.linalg.solve(H, g)
    return CubicSolution(eta, 0.0, "newton", float(evals.min()), 0)


def solve_anisotropic_cubic(
    H_bar: torch.Tensor,
    g_bar: torch.Tensor,
    d: torch.Tensor,
    strength: float,
) -> CubicSolution:
    """The global minimizer η of m(η) = −ḡᵀη + ½ηᵀH̄η + (λ_int/6)‖Dη‖³ (§4.2, appendix D).

    Groups with d_s = 0 (no third-order information; set K, the others P) are solved
    exactly rather than floored: m is quadratic in η_K, so when H̄_KK is positive definite
    minimizing over η_K first, η_K = H̄_KK⁻¹(ḡ_K − H̄_KP η_P), leaves appendix D's problem
    on P with the Schur complement H̄_PP − H̄_PK H̄_KK⁻¹ H̄_KP and the reduced gradient
    ḡ_P − H̄_PK H̄_KK⁻¹ ḡ_K (d_P > 0).  When H̄_KK is not positive definite, m is unbounded
    below (or has no unique minimizer) and :class:`~curvlib.errors.NotPSDError` is raised.

    Args:
        H_bar: H̄ ``[S, S]`` (symmetrized here).
        g_bar: ḡ ``[S]``.
        d: the diagonal of D ``[S]``, ≥ 0 (:func:`cubic_scales`).
        strength: λ_int ≥ 0; 0 gives the unregularized step (1), η = H̄⁻¹ḡ.

    Returns:
        a :class:`CubicSolution` (float64 η).

    Raises:
        ShapeError: inconsistent shapes.
        ConfigError: λ_int < 0 or some d_s < 0.
        NumericalError: non-finite inputs.
        NotPSDError: the model is unbounded below (H̄ restricted to the groups with
            d_s = 0 is not positive definite).
    """
    S = _check(H_bar, g_bar, d, strength)
    H = H_bar.detach().to(_F64)
    H = 0.5 * (H + H.T)
    g = g_bar.detach().to(_F64)
    dd = d.detach().to(_F64)
    if bool((dd < 0).any()):
        raise ConfigError(f"solve_anisotropic_cubic: expected scales d_s ≥ 0, got {dd.tolist()}")
    if not bool(g.abs().max() > 0):
        return CubicSolution(torch.zeros(S, dtype=_F64, device=g.device), 0.0, "zero",
                             float(torch.linalg.eigvalsh(H).min()), 0)
    if strength == 0:
        return _newton(H, g)
    K = dd == 0
    if not bool(K.any()):
        return _solve_positive_scales(H, g, dd, 0.5 * float(strength))
    P = ~K
    H_KK = H[K][:, K]
    chol, info = torch.linalg.cholesky_ex(H_KK)
    if int(info) != 0:
        raise NotPSDError(
            f"solve_anisotropic_cubic: {int(K.sum())} group(s) have d_s = 0 (no third-order term) and H̄ restricted "
            f"to them is not positive definite (smallest eigenvalue {float(torch.linalg.eigvalsh(H_KK)[0]):.3e}): "
            "the cubic model is unbounded below"
        )
    a = torch.cholesky_solve(g[K].unsqueeze(1), chol).squeeze(1)  # H̄_KK⁻¹ ḡ_K
    eta = torch.empty(S, dtype=_F64, device=g.device)
    if not bool(P.any()):  # no cubic information at all: a positive definite quadratic
        eta[K] = a
        return CubicSolution(eta, 0.0, "positive_definite", float(torch.linalg.eigvalsh(H)[0]), 0)
    A = torch.cholesky_solve(H[K][:, P], chol)  # H̄_KK⁻¹ H̄_KP
    schur = H[P][:, P] - H[P][:, K] @ A
    sol = _solve_positive_scales(0.5 * (schur + schur.T), g[P] - H[P][:, K] @ a, dd[P], 0.5 * float(strength))
    eta[P] = sol.eta
    eta[K] = a - A @ sol.eta
    return CubicSolution(eta, sol.radius, sol.case, sol.min_eigenvalue, sol.iterations)


def _solve_positive_scales(H: torch.Tensor, g: torch.Tensor, dd: torch.Tensor, c: float) -> CubicSolution:
    """Appendix D with every d_s > 0 and c = λ_int/2 > 0 (module docstring)."""
    S = g.shape[0]
    if not bool(g.abs().max() > 0):
        return CubicSolution(torch.zeros(S, dtype=_F64, device=g.device), 0.0, "zero", float("nan"), 0)
    Ht = H / dd.unsqueeze(1) / dd.unsqueeze(0)  # H̃ = D⁻¹H̄D⁻¹ (4)
    Ht = 0.5 * (Ht + Ht.T)
    gt = g / dd  # g̃ = D⁻¹ḡ
    lam, Q = torch.linalg.eigh(Ht)  # ascending
    b = Q.T @ gt  # [S]
    lam1 = float(lam[0])
    if lam1 > 0:  # case 1 (5): r ∈ [0, ‖H̃⁻¹g̃‖]
        r_lo, base, case = 0.0, lam, "positive_definite"
    else:  # case 2 (6): r > −λ_1/c; shifted denominators (λ_i − λ_1) + c t are exact at t = 0
        r_lo, base, case = -lam1 / c, lam - lam[0], "nesterov_polyak"
    b2 = b * b
    # the scalar loop runs on host floats (S is small; thousands of tiny device ops would dominate)
    b2_np = b2.cpu().numpy()
    base_np = base.cpu().numpy()
    live = b2_np != 0

    def norm_xi(t: float) -> float:
        den = base_np[live] + c * t
        with np.errstate(divide="ignore"):
            return math.sqrt(float(np.sum(b2_np[live] / (den * den))))

    # hard case: no component of g̃ on the null directions of H̃ + c r_lo I and ‖ξ_⊥(r_lo)‖ ≤ r_lo
    null = base == 0
    if bool(null.any()) and bool((b2[null] == 0).all()):
        xi_perp = torch.where(null, torch.zeros_like(b), b / torch.where(null, torch.ones_like(base), base))
        n_perp = float(torch.linalg.vector_norm(xi_perp))
        if n_perp <= r_lo:
            v = Q[:, int(null.nonzero()[0])]
            v = v * torch.sign(v[int(v.abs().argmax())])
            tau = math.sqrt(max(r_lo * r_lo - n_perp * n_perp, 0.0))
            xi = Q @ xi_perp + tau * v
            return CubicSolution(xi / dd, r_lo, "hard_case", lam1, 0)

    # bracket [t_lo, t_hi] with f(t_lo) > 0 ≥ f(t_hi), f(t) = ‖ξ(r_lo + t)‖ − (r_lo + t)
    t_lo, t_hi = 0.0, math.sqrt(float(torch.linalg.vector_norm(b)) / c)
    grow = 0
    while norm_xi(t_hi) - (r_lo + t_hi) > 0:  # rounding only; the bound above guarantees f ≤ 0
        t_hi *= 2.0
        grow += 1
        if grow > 60:
            raise NumericalError("solve_anisotropic_cubic: could not bracket the root of the secular equation (5)/(6)")
    it = 0
    while it < _MAX_BISECTIONS:
        mid = 0.5 * (t_lo + t_hi)
        if mid <= t_lo or mid >= t_hi:
            break
        if norm_xi(mid) - (r_lo + mid) > 0:
            t_lo = mid
        else:
            t_hi = mid
        it += 1
    t = t_hi if t_hi > 0 else t_lo
    den = base + c * t
    xi = Q @ (b / den)
    return CubicSolution(xi / dd, r_lo + t, case, lam1, it)
