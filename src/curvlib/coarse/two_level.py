"""Two-level preconditioners: a first level M ≈ F•⁻¹ (KFAC) plus a coarse correction in
the span of a block-diagonal basis R₀ᵀ (thesis §4.2).

With F• = F + λI (4.2), u the vector to precondition (the gradient), ζ_KFAC = M u (4.6),
r = u − F•ζ_KFAC (4.15) and F_coarse = R₀F•R₀ᵀ (4.14), the three modes are

- ``"multiplicative"`` (default, (4.11)–(4.17)):
  ζ = ζ_KFAC + R₀ᵀβ*,  β* = F_coarse⁻¹ R₀ r, the minimiser of 𝔈(β) = ‖ζ_KFAC + R₀ᵀβ − F•⁻¹u‖²_F• (4.12)–(4.13);
  the error propagator is the product (4.18) I − M_2L F• = [I − R₀ᵀF_coarse⁻¹R₀F•][I − M F•].
- ``"additive"`` ((4.19)): ζ = ζ_KFAC + R₀ᵀ F_coarse⁻¹ R₀ u (residual replaced by u).
- ``"previous"`` (Tselepidis–Kohler–Orvieto, (4.20) with (4.47)): additive, with the
  approximate coarse operator R₀F̄•R₀ᵀ in place of F_coarse.

F_coarse is built on each new basis by :func:`~curvlib.coarse.coarse_operator.exact_coarse_operator`
(matrix-free, (4.73)–(4.77)), R₀F̄•R₀ᵀ by :func:`~curvlib.coarse.coarse_operator.tko_coarse_operator`.

**Coarse solve and its fallback.**  The N × N system is solved in float64 by the
equilibrated pseudo-inverse of :mod:`curvlib.coarse.coarse_operator` (the documented upcast
of both modules), after

1. columns of R₀ᵀ that are zero or non-finite are dropped (a zero residual block, a
   layer with no gradient); they are reported in :attr:`CoarseSolveInfo.dropped_columns`
   (non-finite ones with a :class:`NumericalWarning`);
2. eigen-directions of the equilibrated operator below rcond·max|Λ| (default
   rcond = 10·N·eps of the curvature's dtype) are cut with a :class:`NumericalWarning`
   and counted in :attr:`CoarseSolveInfo.truncated`; for an exact F_coarse they are
   combinations of columns that cancel, so the correction R₀ᵀβ stays the unique, finite
   one of the reduced problem.

**Error reduction** (§4.3.4).  For any β, with 𝔈(β) = ‖ζ_KFAC + R₀ᵀβ − ζ‖²_F•, ζ = F•⁻¹u,

    𝔈(β) − 𝔈(0) = ⟨F•R₀ᵀβ, R₀ᵀβ⟩ − 2⟨R₀ᵀβ, r⟩ = ⟨R₀F•R₀ᵀβ, β⟩ − 2⟨β, R₀r⟩    (4.44)–(4.46)

needs neither ζ nor F•⁻¹.  :meth:`TwoLevelPreconditioner.error_reduction` evaluates it
for the mode's β (β* for multiplicative, β_TKO of (4.47b) for ``"previous"``), with the
exact F• (never F̄•), in the first form: on the correction c = R₀ᵀβ that ζ_2L actually
contains, with one product F•c.  The second form, with F_coarse, is the same number in
exact arithmetic, but F_coarse's rounding (eps·‖F_coarse‖) is amplified by ‖β‖², which is
large when columns nearly cancel (Krylov/Taylor iterates, κ(F_coarse) ≈ 1e7 is common):
it then drifts from 𝔈(β) − 𝔈(0) of the returned ζ_2L by ≈ eps·κ·|gap|.  At β* the first
form is −⟨c, r⟩ up to rounding (⟨F•c, c⟩ = ⟨c, r⟩), ≤ 0 (4.21).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from curvlib.coarse.base import CoarseContext, CoarseSpace, _OnCurvature
from curvlib.coarse.basis import CoarseBasis, Partition
from curvlib.coarse.coarse_operator import _EquilibratedPinv, exact_coarse_operator, tko_coarse_operator
from curvlib.config import positive_damping
from curvlib.curvatures.operator import NoStatisticsError
from curvlib.errors import ConfigError, DTypeDeviceError, NumericalWarning, ShapeError, warn
from curvlib.linalg import LinearOperator, VectorLayout

__all__ = [
    "CoarseSolveInfo",
    "MODES",
    "TwoLevelPreconditioner",
    "TwoLevelSolution",
]

Mode = Literal["multiplicative", "additive", "previous"]
MODES: tuple[str, ...] = ("multiplicative", "additive", "previous")


# --------------------------------------------------------------------------- coarse problem
@dataclass(frozen=True)
class CoarseSolveInfo:
    """Diagnostics of one coarse problem.

    Attributes:
        mode: the correction mode.
        N: columns of R₀ᵀ as the coarse space built them.
        dropped_columns: indices (in that basis) of the zero or non-finite columns removed.
        rank: numerical rank of the (equilibrated) coarse operator that was solved.
        truncated: eigen-directions cut by the ``rcond`` threshold (rank deficiency).
        condition_number: max|Λ| / min|Λ| of the equilibrated operator (``inf`` when singular).
        meta: notes from the coarse space (e.g. ``eigen_source`` of ``spectral``).
    """

    mode: str
    N: int
    dropped_columns: tuple[int, ...]
    rank: int
    truncated: int
    condition_number: float
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class _CoarseProblem:
    basis: CoarseBasis  # the kept columns
    operator: torch.Tensor  # the mode's coarse operator on them, float64 [n, n]
    solver: _EquilibratedPinv
    info: CoarseSolveInfo
    pending_warnings: list[str]  # emitted once, from the public method that first used the problem


@dataclass(frozen=True)
class TwoLevelSolution:
    """Everything one two-level application computed for a single vector u ``[p]``.

    Attributes:
        zeta: ζ_2L = ζ_KFAC + R₀ᵀβ ``[p]``.
        zeta_first: ζ_KFAC = M u ``[p]``.
        correction: R₀ᵀβ ``[p]``.
        residual: r = u − F•ζ_KFAC ``[p]`` (4.15).
        basis: the coarse basis actually used (dropped columns removed), N_kept columns.
        beta: β ``[N_kept]`` (float64).
        coarse_operator: the operator solved ``[N_kept, N_kept]`` (float64).
        error_reduction: 𝔈(β) − 𝔈(0) of (4.46) (0-d, the curvature's dtype) when requested, else None.
        info: :class:`CoarseSolveInfo`.
    """

    zeta: torch.Tensor
    zeta_first: torch.Tensor
    correction: torch.Tensor
    residual: torch.Tensor
    basis: CoarseBasis
    beta: torch.Tensor
    coarse_operator: torch.Tensor
    error_reduction: torch.Tensor | None
    info: CoarseSolveInfo


# --------------------------------------------------------------------------- preconditioner
class TwoLevelPreconditioner(_OnCurvature, LinearOperator):
    """ζ_2L ≈ F•⁻¹u: a first level plus a coarse correction (thesis §4.2).

    Args:
        first_level: M ≈ F•⁻¹: any object with ``@`` on flat ``[p]`` (``matmat`` or ``@`` on
            ``[p, k]`` used when present), a dense ``[p, p]`` tensor, or ``None`` (zero
            first level: then ζ = R₀ᵀ F_coarse⁻¹ R₀ u, e.g. seed 004's partitioned Newton
            step with one group per parameter tensor).
        curvature: the exact curvature operator F (a curvlib curvature: ``@``, ``layers``,
            ``dtype``, ``device``; ``statistics`` for ``spectral`` fallbacks and ``previous``).
        coarse_space: a :class:`~curvlib.coarse.base.CoarseSpace` instance.
        damping: λ > 0 of F• = F + λI (4.2), added once wherever F• appears.
        mode: ``"multiplicative"`` (4.17), ``"additive"`` (4.19) or ``"previous"`` (4.20)/(4.47).
        partition: the groups of R₀ᵀ (default: the layers, :meth:`Partition.layers`).
        rcond: relative eigenvalue cut-off of the coarse solve (default 10·N·eps of F's dtype).
        layer_eigen: optional ``i -> (v_A [a_dim], v_G [g_dim])`` for the ``spectral`` space.
        tko_diagonal: the diagonal blocks of F̄• in ``"previous"`` mode: ``"heuristic"``
            (π-split, (4.20b)) or ``"tikhonov"``.

    Products: ``pre @ u`` for u ``[p]``, ``[p, k]`` or a list shaped like ``F.params()``.
    A coarse space whose basis depends on u (residual, taylor, krylov on residual seeds)
    builds one basis and one coarse problem per column of ``[p, k]``; the others build
    theirs once per preconditioner object (same F, same first level) and reuse it.
    """

    def __init__(
        self,
        first_level: Any,
        curvature: Any,
        coarse_space: CoarseSpace,
        damping: float,
        mode: Mode = "multiplicative",
        *,
        partition: Partition | None = None,
        rcond: float | None = None,
        layer_eigen: Any = None,
        tko_diagonal: Literal["heuristic", "tikhonov"] = "heuristic",
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"two_level: mode must be one of {', '.join(MODES)}; got {mode!r}")
        lam = positive_damping(damping, "two_level")
        if not isinstance(coarse_space, CoarseSpace):
            raise ConfigError(f"two_level: coarse_space must be a CoarseSpace, got {type(coarse_space).__name__}")
        if tko_diagonal not in ("heuristic", "tikhonov"):
            raise ConfigError(f"two_level: tko_diagonal must be 'heuristic' or 'tikhonov', got {tko_diagonal!r}")
        if rcond is not None and not (math.isfinite(float(rcond)) and 0 <= float(rcond) < 1):
            raise ConfigError(f"two_level: rcond must be in [0, 1), got {rcond!r}")
        self.first_level = first_level
        self.curvature = curvature
        self.coarse_space = coarse_space
        self.damping = lam
        self.mode: str = mode
        if not isinstance(curvature, LinearOperator):
            raise ConfigError(f"two_level: curvature must be a curvlib operator (curvlib.curvature(...)), "
                              f"got {type(curvature).__name__}")
        if first_level is not None and not isinstance(first_level, LinearOperator):
            raise ConfigError(f"two_level: first_level must be a curvlib LinearOperator or None, got "
                              f"{type(first_level).__name__} (wrap a dense matrix in curvlib.linalg.DenseOperator)")
        p = curvature.shape[0]
        self.partition = partition if partition is not None else Partition.layers(curvature)
        if self.partition.p != p:
            raise ShapeError(f"two_level: the partition covers {self.partition.p} rows, the curvature has p = {p}")
        if first_level is not None:
            if tuple(first_level.shape) != (p, p):
                raise ShapeError(f"two_level: first level has shape {tuple(first_level.shape)}, expected ({p}, {p})")
            if first_level.dtype != curvature.dtype:
                raise DTypeDeviceError(f"two_level: first level dtype {first_level.dtype} differs from the curvature's "
                                       f"{curvature.dtype}")
            if torch.device(first_level.device) != torch.device(curvature.device):
                raise DTypeDeviceError(f"two_level: first level device {first_level.device} differs from the "
                                       f"curvature's {curvature.device}")
        if mode == "previous":
            try:
                curvature.statistics(0)
            except NoStatisticsError as exc:
                raise ConfigError(
                    f"two_level: mode='previous' needs per-layer Kronecker statistics; {type(curvature).__name__} "
                    "has none (use a 'fisher', 'empirical_fisher' or 'ggn' curvature)"
                ) from exc
        self.rcond = rcond
        self.layer_eigen = layer_eigen
        self.tko_diagonal = tko_diagonal
        self._static: _CoarseProblem | None = None
        self._last_infos: list[CoarseSolveInfo] = []

    # -- description ------------------------------------------------------------------------
    @property
    def p(self) -> int:
        return self.partition.p

    @property
    def shape(self) -> tuple[int, int]:
        return (self.p, self.p)

    @property
    def layout(self) -> VectorLayout | None:
        return self.curvature.layout

    @property
    def info(self) -> CoarseSolveInfo | None:
        """Diagnostics of the last coarse problem solved (``None`` before the first product)."""
        return self._last_infos[-1] if self._last_infos else None

    @property
    def infos(self) -> list[CoarseSolveInfo]:
        """Diagnostics of every coarse problem of the last call (one per column of a
        ``[p, k]`` input when the basis depends on u)."""
        return list(self._last_infos)

    def __repr__(self) -> str:
        return (f"TwoLevelPreconditioner(coarse_space={self.coarse_space!r}, mode={self.mode!r}, "
                f"damping={self.damping:g}, groups={len(self.partition)}, p={self.p})")

    # -- internals --------------------------------------------------------------------------
    def _as_matrix(self, u: Any, what: str) -> tuple[torch.Tensor, str]:
        return self._normalise(u, self.p, f"TwoLevelPreconditioner.{what}")

    def _context(self, u: torch.Tensor | None = None, zeta: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None) -> CoarseContext:
        ctx = CoarseContext(self.curvature, self.damping, self.first_level, self.partition, u=u,
                            layer_eigen=self.layer_eigen)
        if zeta is not None:
            ctx._cache["zeta_first"] = zeta
        if residual is not None:
            ctx._cache["residual"] = residual
        return ctx

    def _rcond(self, n: int) -> float:
        if self.rcond is not None:
            return float(self.rcond)
        return 10.0 * max(n, 1) * torch.finfo(self.dtype).eps

    def _problem(self, ctx: CoarseContext) -> _CoarseProblem:
        basis = self.coarse_space.checked_basis(ctx)
        if basis.p != self.p or basis.dtype != self.dtype or basis.device != self.device:
            raise ShapeError(
                f"coarse space {self.coarse_space.kind!r} returned a basis over p={basis.p} ({basis.dtype} on "
                f"{basis.device}); expected p={self.p} ({self.dtype} on {self.device})"
            )
        norms = basis.column_norms()
        finite = torch.cat([torch.isfinite(V).all(0) for V in basis.columns])  # [N]
        keep = finite & (norms > 0)
        dropped = tuple(int(k) for k in (~keep).nonzero().flatten().tolist())
        kept = basis if not dropped else basis.select(keep)
        if self.mode == "previous":
            op = tko_coarse_operator(self.curvature, kept, self.damping, self.tko_diagonal)
        else:
            op = exact_coarse_operator(self.curvature, kept, self.damping)
        solver = _EquilibratedPinv(op, self._rcond(kept.N))
        warn = []
        if solver.truncated:
            warn.append(
                f"two-level ({self.coarse_space.kind}, {self.mode}): the coarse operator [{kept.N}×{kept.N}] is "
                f"numerically singular (rank {solver.rank}); cut {solver.truncated} direction(s) below "
                f"rcond={self._rcond(kept.N):.1e}·max|eigenvalue| and used the pseudo-inverse"
            )
        if not bool(finite.all()):
            warn.insert(0, self.coarse_space.nonfinite_message(basis, finite))
        info = CoarseSolveInfo(self.mode, basis.N, dropped, solver.rank, solver.truncated, solver.cond, dict(basis.meta))
        return _CoarseProblem(kept, op, solver, info, warn)

    def _static_problem(self) -> _CoarseProblem:
        if self._static is None:
            self._static = self._problem(self._context())
        return self._static

    def _run(self, U: torch.Tensor, Z1: torch.Tensor | None = None, R: torch.Tensor | None = None):
        """U ``[p, k]`` -> (Z, Z1 = M U, R = U − F•Z1, C = Z − Z1, each ``[p, k]``;
        list of (problem, columns, β ``[n, k_j]`` float64)).  Z1 and R may be given."""
        ctx0 = self._context()
        Z1 = ctx0.apply_first(U) if Z1 is None else Z1
        R = U - ctx0.apply_damped(Z1) if R is None else R
        parts: list[tuple[_CoarseProblem, list[int], torch.Tensor]] = []
        if self.coarse_space.depends_on_input:
            groups = [([j], self._problem(self._context(U[:, j], Z1[:, j], R[:, j]))) for j in range(U.shape[1])]
        else:
            groups = [(list(range(U.shape[1])), self._static_problem())]
        C = torch.zeros_like(Z1)
        for cols, prob in groups:
            src = R if self.mode == "multiplicative" else U
            rhs = prob.basis.restrict(src[:, cols]).to(torch.float64)
            beta = prob.solver.solve(rhs)
            C[:, cols] = prob.basis.prolong(beta.to(self.dtype))
            parts.append((prob, cols, beta))
        self._last_infos = [prob.info for prob, _, _ in parts]
        for prob, _, _ in parts:
            while prob.pending_warnings:
                warn(prob.pending_warnings.pop(0), NumericalWarning)
        return Z1 + C, Z1, R, C, parts

    # -- public API ------------------------------------------------------------------------------
    def _matmat(self, U: torch.Tensor) -> torch.Tensor:
        """ζ_2L for ``U [p, k]`` (4.11)/(4.17), (4.19) or (4.47) by :attr:`mode`."""
        return self._run(U)[0]

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """The adjoint of the two-level map, for a basis that does not depend on u.

        With C = R₀ F• R₀ᵀ (or its approximation, "previous") symmetric and F• symmetric:
        additive P = M + R₀ᵀC⁻¹R₀ has Pᵀ = Mᵀ + R₀ᵀC⁻¹R₀; multiplicative
        P = M + R₀ᵀC⁻¹R₀(I − F•M) has Pᵀ = Mᵀ + (I − MᵀF•)R₀ᵀC⁻¹R₀, Mᵀ the first level's
        adjoint.  With a u-dependent basis the map is not linear and has no adjoint."""
        if self.coarse_space.depends_on_input:
            raise NotImplementedError(
                f"TwoLevelPreconditioner: coarse space {self.coarse_space.kind!r} builds its basis from u, so "
                "u -> ζ is not linear and has no adjoint"
            )
        ctx = self._context()

        def first_adjoint(X: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(X) if self.first_level is None else self.first_level.rmatmat(X)

        prob = self._static_problem()
        C = prob.basis.prolong(prob.solver.solve(prob.basis.restrict(U).to(torch.float64)).to(self.dtype))
        if self.mode == "multiplicative":
            C = C - first_adjoint(ctx.apply_damped(C))
        return first_adjoint(U) + C

    def solve(
        self,
        u: torch.Tensor,
        *,
        error_reduction: bool = False,
        zeta_first: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> TwoLevelSolution:
        """The two-level application to one vector ``u [p]`` with all its intermediates.

        Args:
            u: ``[p]``.
            error_reduction: also evaluate 𝔈(β) − 𝔈(0) (4.46).
            zeta_first: ζ_KFAC = M u ``[p]`` if the caller already has it (a training step
                does: it is the KFAC direction); trusted, not recomputed.
            residual: r = u − F•ζ_KFAC ``[p]`` if already known; trusted.
        """
        U, form = self._as_matrix(u, "solve")
        if form != "vector":
            raise ShapeError(f"TwoLevelPreconditioner.solve: expected one vector [{self.p}], got {list(u.shape)}")
        given = []
        for name, v in (("zeta_first", zeta_first), ("residual", residual)):
            if v is not None:
                V, f = self._as_matrix(v, f"solve({name}=...)")
                if f != "vector":
                    raise ShapeError(f"TwoLevelPreconditioner.solve: {name} must be [{self.p}], got {list(v.shape)}")
                given.append(V)
            else:
                given.append(None)
        Z, Z1, R, C, parts = self._run(U, *given)
        prob, _, beta = parts[0]
        er = self._error_reduction(prob, beta, R, C)[0].to(self.dtype) if error_reduction else None
        return TwoLevelSolution(
            zeta=Z[:, 0], zeta_first=Z1[:, 0], correction=C[:, 0], residual=R[:, 0], basis=prob.basis,
            beta=beta[:, 0], coarse_operator=prob.operator, error_reduction=er, info=prob.info,
        )

    def _error_reduction(self, prob: _CoarseProblem, beta: torch.Tensor, R: torch.Tensor,
                         C: torch.Tensor) -> torch.Tensor:
        """𝔈(β) − 𝔈(0) for β ``[n, k]``, residuals R ``[p, k]`` and corrections C = R₀ᵀβ ``[p, k]``
        -> ``[k]`` float64: ⟨F•c, c⟩ − 2⟨c, r⟩ per column (module docstring)."""
        FC = self.curvature.matmat(C) + self.damping * C
        C64, R64 = C.to(torch.float64), R.to(torch.float64)
        return (C64 * FC.to(torch.float64)).sum(0) - 2.0 * (C64 * R64).sum(0)

    def error_reduction(self, u: torch.Tensor) -> torch.Tensor:
        """𝔈(β) − 𝔈(0) of (4.46) for this mode's β, without the exact solution F•⁻¹u.

        𝔈(β) = ‖ζ_KFAC + R₀ᵀβ − F•⁻¹u‖²_F• (4.41); the difference is
        ⟨R₀F•R₀ᵀβ, β⟩ − 2⟨R₀ᵀβ, r⟩ with r = u − F•ζ_KFAC (4.44)–(4.46), evaluated as
        described in the module docstring.  It is ≤ 0 for β* (multiplicative, (4.21)).

        Args:
            u: ``[p]`` or ``[p, k]``.

        Returns:
            a 0-d tensor, or ``[k]`` (the curvature's dtype; computed in float64).
        """
        U, form = self._as_matrix(u, "error_reduction")
        _, _, R, C, parts = self._run(U)
        out = torch.empty(U.shape[1], dtype=torch.float64, device=self.device)
        for prob, cols, beta in parts:
            out[cols] = self._error_reduction(prob, beta, R[:, cols], C[:, cols])
        out = out.to(self.dtype)
        return out[0] if form != "matrix" else out

    def coarse_basis(self, u: torch.Tensor | None = None) -> CoarseBasis:
        """The coarse basis R₀ᵀ the coarse space builds for ``u [p]`` (as built, before
        dropping zero columns; ``u`` may be omitted for spaces that do not depend on it)."""
        return self.coarse_space.checked_basis(self._ctx_for(u, "coarse_basis"))

    def coarse_operator(self, u: torch.Tensor | None = None, *, exact: bool | None = None) -> torch.Tensor:
        """The coarse operator on :meth:`coarse_basis` ``[N, N]`` (the curvature's dtype).

        ``exact=None``: the mode's operator (R₀F•R₀ᵀ, or R₀F̄•R₀ᵀ for ``"previous"``);
        ``True``: R₀F•R₀ᵀ (4.14); ``False``: R₀F̄•R₀ᵀ (4.20).
        """
        basis = self.coarse_basis(u)
        use_exact = (self.mode != "previous") if exact is None else exact
        if use_exact:
            op = exact_coarse_operator(self.curvature, basis, self.damping)
        else:
            op = tko_coarse_operator(self.curvature, basis, self.damping, self.tko_diagonal)
        return op.to(self.dtype)

    def _ctx_for(self, u: torch.Tensor | None, what: str) -> CoarseContext:
        if u is None:
            if self.coarse_space.depends_on_input:
                raise ConfigError(f"TwoLevelPreconditioner.{what}: coarse space {self.coarse_space.kind!r} depends on u; pass it")
            return self._context()
        U, form = self._as_matrix(u, what)
        if form != "vector":
            raise ShapeError(f"TwoLevelPreconditioner.{what}: expected one vector [{self.p}], got {list(u.shape)}")
        return self._context(U[:, 0])
