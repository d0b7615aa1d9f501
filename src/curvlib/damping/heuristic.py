"""``heuristic``: KFAC's factored ("π-split") damping, (2.95)–(2.96) and end of §3.1.2.

λ enters through the leading Kronecker term only, split between its two factors:

    one term:   M = (A_1 + π√λ I) ⊗ (B_1 + π⁻¹√λ I)
                  = A_1⊗B_1 + π√λ I⊗B_1 + π⁻¹√λ A_1⊗I + λI,
    two terms:  M = (A_1 + π√λ I) ⊗ (B_1 + π⁻¹√λ I) + A_2⊗B_2        (§3.2.5),

    π = sqrt( (tr A_1 / d_a) / (tr B_1 / d_g) )                        (2.96)

(d_a = d_in + 1 and d_g = d_out for a Linear layer); the inverse applied is M⁻¹.  So λ is
the coefficient of I in the expansion, as in ``tikhonov``, but M also carries the two
cross terms that §4.4.2 credits for KFAC's success over block-diagonal natural gradient.

- One term: both damped factors are inverted once per inversion, exactly, by Cholesky
  (:class:`PiSplitInverse`), and applied as B_d⁻¹ X A_d⁻¹.  A_1 and B_1 are PSD in exact
  arithmetic, so the damped factors are positive definite; a damped factor that is not
  (Cholesky fails: the undamped factor has eigenvalues below −shift) is eigendecomposed
  instead and its eigenvalues below the shift are raised to it, i.e. the undamped
  factor's eigenvalues are clamped at 0 (``info.n_clamped`` counts those below by more
  than rounding).
- Two terms: :class:`curvlib.linalg.TwoTermKroneckerInverse` on
  (A_1 + π√λI, B_1 + π⁻¹√λI, A_2, B_2): the damped factors whitened by Cholesky, one
  eigendecomposition per whitened correction.  Its rule for an indefinite correction: with
  μ_ji = 1 + s2_j s1_i the joint eigenvalues of M relative to the damped leading term,
  every μ_ji is raised to max(μ_ji, ``floor``), so the operator inverted is symmetric
  positive definite, ⪰ floor·(A_1 + π√λI)⊗(B_1 + π⁻¹√λI) ⪰ floor·λI, and equal to M on
  every joint eigendirection with μ ≥ floor; ``info.n_clamped`` counts the clamps.
  If a damped leading factor is not numerically positive definite (a leading factor with
  eigenvalues below −shift), its eigenvalues are clamped at the shift as in the one-term
  case, with a :class:`NumericalWarning` (``info.fallback = "psd_leading_factors"``).
  When the shift itself is below the factor's rounding level (√λ tiny against the
  largest eigenvalue, e.g. huge activations in float32), the clamp is raised to that
  level, 4·d·u·|e|_max (u the dtype's unit roundoff): the smallest damping at which the
  factor is positive definite in its dtype — the damping is increased, never a raise.
- More than two terms: refused (:class:`ConfigError`), use ``tikhonov``.
- Exact blocks: refused (:class:`ConfigError`), the π-split needs Kronecker factors; use
  ``tikhonov``.

Sign convention: A⊗B = (−A)⊗(−B); a leading term with tr A_1 < 0 and tr B_1 < 0 is
flipped to positive traces before the split.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from curvlib.config import StrictModel
from curvlib.damping.base import BlockInverse, BlockRequirement, Damping, InverseInfo
from curvlib.errors import ConfigError, NotPSDError, NumericalWarning, warn
from curvlib.linalg import (
    DampedKroneckerFactors,
    FactorEigenbasis,
    KroneckerEigen,
    KroneckerFactored,
    TwoTermKroneckerInverse,
    cholesky_inverses,
    eigh_safe,
    host_values,
    pi_split,
    row_aligned,
    two_sided,
)

__all__ = ["HeuristicOptions", "HeuristicDamping", "PiSplitInverse", "TwoTermHeuristicInverse"]


class HeuristicOptions(StrictModel):
    """Options of the ``heuristic`` damping: M = (A_1 + π√λI)⊗(B_1 + π⁻¹√λI) [+ A_2⊗B_2].

    Attributes:
        value: λ > 0 of the π-split (2.95); π from (2.96).
        floor: the floor on the joint eigenvalues μ of §3.2.5 for two-term sums, > 0
            (scale-free: μ is measured in units of the damped leading term).
    """

    value: float = Field(gt=0, allow_inf_nan=False, description="λ > 0 of the π-split (2.95)")
    floor: float = Field(1e-2, gt=0, allow_inf_nan=False, description="floor on μ = 1 + s2 s1ᵀ (§3.2.5)")


def _sign_normalized(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    (A, B), _ = _sign_normalized_traced(A, B, (float(torch.diagonal(A).sum()), float(torch.diagonal(B).sum())))
    return A, B


def _sign_normalized_traced(
    A: torch.Tensor, B: torch.Tensor, traces: tuple[float, float]
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[float, float]]:
    """(A, B) flipped to positive traces when both are negative, with the traces that go with them."""
    if traces[0] < 0 and traces[1] < 0:
        return (-A, -B), (-traces[0], -traces[1])
    return (A, B), traces


class HeuristicDamping(Damping):
    """``heuristic``: M = (A_1 + π√λI)⊗(B_1 + π⁻¹√λI) [+ A_2⊗B_2], π-split (2.95)–(2.96); applies M⁻¹."""

    kind = "heuristic"
    options_model = HeuristicOptions
    requires = BlockRequirement(
        (KroneckerFactored,), max_terms=2,
        reason="the π-split (2.95)–(2.96) damps the leading term's two Kronecker factors, and the inversion of "
               "§3.2.5 handles one or two terms; use the 'tikhonov' damping",
    )

    def inverse_capabilities(self, block: tuple[type, ...], terms: int | None) -> tuple[type, ...]:
        """One Kronecker term: the eigenbasis and the damped factors (:class:`PiSplitInverse`);
        two: the damped leading factors (:class:`TwoTermHeuristicInverse`); nothing otherwise
        (such blocks are refused)."""
        if not any(issubclass(c, KroneckerFactored) for c in block):
            return ()
        return {1: (FactorEigenbasis, DampedKroneckerFactors), 2: (DampedKroneckerFactors,)}.get(terms, ())

    def invert_many(self, blocks: Sequence[Any], previous: Sequence[BlockInverse | None]) -> list[BlockInverse]:
        """:meth:`invert` for every block, the one-term blocks' damped factors inverted together.

        Every one-term block's traces and finiteness screen are read in one host
        synchronisation, and its two damped factors go to :func:`~curvlib.linalg.cholesky_inverses`,
        which factors the factors of equal shape in one batched call (one more synchronisation
        for all).  The results equal :meth:`invert`'s block by block to rounding (the same
        routine on the same matrices; see there), and the same blocks give the same bits.
        Other blocks, a factor that fails Cholesky (the eigenvalue rule) and a block whose
        screen fails (the exact check, then the ``previous`` fallback) take the per-block
        path, with its warnings and errors.
        """
        self._check_many(blocks, previous)
        caller = f"{type(self).__name__}.invert"
        batched = [i for i, b in enumerate(blocks) if isinstance(b, KroneckerFactored) and len(b.terms) == 1]
        for i in batched:
            if previous[i] is not None:
                self._check_previous(blocks[i], previous[i], caller)
        if len(batched) < 2:
            return super().invert_many(blocks, previous)
        scalars = [
            torch.stack([torch.diagonal(A).sum(), torch.diagonal(B).sum(), A.sum(), B.sum()]).to(torch.float64)
            for A, B in (blocks[i].terms[0] for i in batched)
        ]
        read = host_values(scalars)  # one host synchronisation
        lam = self.value
        split: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for i, (tr_a, tr_b, sum_a, sum_b) in zip(batched, read):
            if math.isfinite(sum_a) and math.isfinite(sum_b):  # else the exact check of invert()
                (A, B), traces = _sign_normalized_traced(*blocks[i].terms[0], (tr_a, tr_b))
                split[i] = pi_split(A, B, lam, traces=traces)
        factors = cholesky_inverses([M for i in split for M in split[i][:2]])
        position = {i: 2 * n for n, i in enumerate(split)}
        out = []
        for i, (block, prev) in enumerate(zip(blocks, previous)):
            if i not in split:
                out.append(self.invert(block, previous=prev))
                continue
            j = position[i]
            Ad, Bd, pi = split[i]
            build = functools.partial(PiSplitInverse.from_damped, Ad, Bd, pi, lam, factors[j:j + 2], kind=self.kind)
            out.append(self._or_previous(build, prev, caller))
        return out

    def _invert(self, block: Any) -> BlockInverse:
        if not isinstance(block, KroneckerFactored):
            raise ConfigError(
                f"damping 'heuristic': the π-split (2.95) needs Kronecker factors, but {type(block).__name__} "
                "is not KroneckerFactored (an exact block); use the 'tikhonov' damping for it"
            )
        terms = block.terms
        lam = self.value
        if len(terms) == 1:
            A, B = _sign_normalized(*terms[0])
            return PiSplitInverse(A, B, lam, kind=self.kind)
        if len(terms) == 2:
            A, B = _sign_normalized(*terms[0])
            C, D = terms[1]
            return TwoTermHeuristicInverse(A, B, C, D, lam, floor=self.options.floor, kind=self.kind)
        raise ConfigError(
            f"damping 'heuristic' handles Kronecker sums of one or two terms (§3.2.5); got {len(terms)} terms: "
            "use the 'tikhonov' damping (PCG) for longer sums"
        )


def _shifts(lam: float, pi: float) -> tuple[float, float]:
    root = math.sqrt(lam)
    return pi * root, root / pi


class PiSplitInverse(BlockInverse, FactorEigenbasis, DampedKroneckerFactors):
    """[(A + π√λI) ⊗ (B + π⁻¹√λI)]⁻¹, exact, applied with two GEMMs: Y = B_d⁻¹ X A_d⁻¹.

    At the inversion (once per T2) the explicit inverses of the damped factors are formed.
    A damped factor M_d = M + shift·I that is positive definite (``torch.linalg.cholesky_ex``
    succeeds, in its dtype) is inverted exactly by ``cholesky_inverse``: about a fifth of the
    work of an eigendecomposition.  Otherwise (the undamped M has eigenvalues below −shift)
    it takes the eigenvalue rule of the module docstring: M_d is eigendecomposed
    (:func:`~curvlib.linalg.eigh_safe`, with its float64 retry), its eigenvalues clamped at
    the shift, and M_d⁻¹ = Q diag(1/e) Qᵀ formed (``info.n_clamped`` counts the eigenvalues
    below the shift by more than rounding).  ``info.method`` is ``"cholesky"`` when both
    factors took the first route, ``"eigen"`` otherwise.  Since the joint eigenvalues e_b,i·e_a,j factorise, B_d⁻¹ X A_d⁻¹ =
    Q_b [(Q_bᵀ X Q_a) ⊘ (e_b e_aᵀ)] Q_aᵀ — the eigenbasis form at half its per-step cost.

    The eigendecomposition (:attr:`eigen`, e.g. for the spectral coarse space (4.28)–(4.30))
    of the factors actually inverted is computed at first use (or kept from the eigenvalue
    rule), so that Q_b [(Q_bᵀ X Q_a) ⊘ (e_b e_aᵀ)] Q_aᵀ equals the applied inverse.

    Args:
        A: ``[d_a, d_a]`` symmetric PSD (sign-normalized).
        B: ``[d_g, d_g]`` symmetric PSD.
        lam: λ > 0.

    Attributes:
        pi: π of (2.96).
        damped_factors: ``(A + π√λI [d_a, d_a], B + π⁻¹√λI [d_g, d_g])``.
        eigen: the :class:`~curvlib.linalg.KroneckerEigen` of the damped factors as inverted
            (clamped where the eigenvalue rule was taken), computed at first use.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor, lam: float, *, kind: str = "heuristic") -> None:
        Ad, Bd, pi = pi_split(A, B, lam)
        self._build(Ad, Bd, pi, lam, cholesky_inverses([Ad, Bd]), kind)

    @classmethod
    def from_damped(
        cls,
        Ad: torch.Tensor,
        Bd: torch.Tensor,
        pi: float,
        lam: float,
        cholesky: Sequence[torch.Tensor | None],
        *,
        kind: str = "heuristic",
    ) -> PiSplitInverse:
        """The inverse from the π-split's damped factors and their Cholesky inverses
        (:func:`~curvlib.linalg.cholesky_inverses`, ``None`` where it failed: the eigenvalue
        rule is taken for that factor here) — :meth:`HeuristicDamping.invert_many`'s path."""
        self = cls.__new__(cls)
        self._build(Ad, Bd, pi, lam, cholesky, kind)
        return self

    def _build(self, Ad: torch.Tensor, Bd: torch.Tensor, pi: float, lam: float,
               cholesky: Sequence[torch.Tensor | None], kind: str) -> None:
        self._shifts = _shifts(lam, pi)
        (self._A_inv, eig_a, clamped_a), (self._B_inv, eig_b, clamped_b) = (
            (inv, None, 0) if inv is not None else _eigenvalue_rule(Md, shift)
            for inv, Md, shift in zip(cholesky, (Ad, Bd), self._shifts)
        )
        # applied at every step: rows on cache-line boundaries (linalg.two_sided)
        self._A_inv, self._B_inv = row_aligned(self._A_inv), row_aligned(self._B_inv)
        self._eig = [eig_a, eig_b]
        self._eigen: KroneckerEigen | None = None
        self.pi = float(pi)
        self._damped_factors = (Ad, Bd)
        method = "cholesky" if eig_a is None and eig_b is None else "eigen"
        super().__init__(
            a_dim=Ad.shape[0],
            b_dim=Bd.shape[0],
            dtype=Ad.dtype,
            device=Ad.device,
            info=InverseInfo(kind=kind, method=method, lam=float(lam), pi=self.pi, n_clamped=clamped_a + clamped_b),
        )

    @property
    def damped_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._damped_factors

    @property
    def eigen_computed(self) -> bool:
        return self._eigen is not None or all(e is not None for e in self._eig)

    @property
    def eigen(self) -> KroneckerEigen:
        if self._eigen is None:
            for i, (Md, shift) in enumerate(zip(self._damped_factors, self._shifts)):
                if self._eig[i] is None:  # a Cholesky-inverted factor: positive definite, nothing to clamp
                    self._eig[i] = eigh_safe(Md)
            (e_a, Q_a), (e_b, Q_b) = self._eig
            self._eigen = KroneckerEigen(eval_a=e_a, evec_a=Q_a, eval_b=e_b, evec_b=Q_b)
        return self._eigen

    def condition_numbers(self) -> torch.Tensor:
        """(κ_A, κ_G) of the damped factors: the eigenvalue ratios when :attr:`eigen` is at hand,
        else κ₁ = ‖M_d‖₁·‖M_d⁻¹‖₁ from the explicit inverse (LAPACK's condition number of a
        Cholesky-factored matrix; never below the eigenvalue ratio, at most d times it).  Both
        matrices are symmetric, so ‖·‖₁ is the largest absolute row sum: one contiguous pass
        each (``matrix_norm(ord=1)`` reduces over columns, ~4× slower on one CPU thread)."""
        if self.eigen_computed:
            return super().condition_numbers()
        norm1 = lambda M: M.abs().sum(-1).amax()  # noqa: E731
        return torch.stack([norm1(Md) * norm1(Mi) for Md, Mi in zip(self._damped_factors, (self._A_inv, self._B_inv))])

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        return _two_sided(self._B_inv, X, self._A_inv)

    def for_transfer(self) -> PiSplitInverse:
        """A copy without the damped factors: the receivers rebuild them from the block (half the bytes)."""
        sent = copy.copy(self)
        sent._damped_factors = None
        # an inverse factored in a batch is a view into it: send its own entries, not the batch's
        sent._A_inv, sent._B_inv = (_own_storage(M) for M in (self._A_inv, self._B_inv))
        return sent

    def after_transfer(self, block: Any) -> None:
        if self._damped_factors is None:
            Ad, Bd, _ = pi_split(*_sign_normalized(*block.terms[0]), self.info.lam)
            self._damped_factors = (Ad, Bd)


def _own_storage(M: torch.Tensor) -> torch.Tensor:
    return M.clone() if M.untyped_storage().nbytes() > M.numel() * M.element_size() else M


def _eigenvalue_rule(Md: torch.Tensor, shift: float) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], int]:
    """(M_d⁻¹, the clamped eigendecomposition of M_d, clamps) for a damped factor
    M_d = M + shift·I that failed Cholesky (:class:`PiSplitInverse`): M_d's eigenvalues are
    clamped at the shift.  (Cholesky reads one triangle, so the rounding-level asymmetry of M
    needs no symmetrization on that route, and ``cholesky_inverse`` returns an exactly
    symmetric matrix.)"""
    e, Q = eigh_safe(Md)
    n_clamped = _count_below(e, shift)
    e = e.clamp_min(shift)
    return _symmetrized((Q / e) @ Q.T), (e, Q), n_clamped


def _symmetrized(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.T)


def _two_sided(B: torch.Tensor, X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """B X A for symmetric A ``[d_a, d_a]``, B ``[d_g, d_g]`` and X ``[k, d_g, d_a]``: one matrix
    (every step's gradient) in the layout of :func:`~curvlib.linalg.two_sided`, several as
    ((A Xᵀ) B)ᵀ, the batched GEMMs' fastest layout for the unaligned widths of Linear layers
    (d_in + 1)."""
    if X.shape[0] == 1:
        return two_sided(B, X[0], A).unsqueeze(0)
    return ((A @ X.mT) @ B).mT


def _count_below(e: torch.Tensor, shift: float) -> int:
    # below the shift by more than the rounding of an eigensolver (eps·‖·‖ per entry)
    tol = 64 * torch.finfo(e.dtype).eps * max(float(e.abs().max()), shift)
    return int((e < shift - tol).sum())


def _clamped_factor(M: torch.Tensor, shift: float) -> torch.Tensor:
    """M's eigenvalues clamped at the shift, or at M's rounding level if that is larger (module docstring)."""
    e, Q = eigh_safe(M)
    rounding = 4 * M.shape[0] * (torch.finfo(M.dtype).eps / 2) * float(e.abs().max())
    return (Q * e.clamp_min(max(shift, rounding))) @ Q.T


class TwoTermHeuristicInverse(BlockInverse, DampedKroneckerFactors):
    """[(A + π√λI)⊗(B + π⁻¹√λI) + C⊗D]⁻¹ by §3.2.5 with the floor rule of the module docstring.

    Args:
        A: ``[d_a, d_a]`` symmetric PSD (sign-normalized), the leading term's first factor.
        B: ``[d_g, d_g]`` symmetric PSD.
        C: ``[d_a, d_a]`` symmetric, possibly indefinite.
        D: ``[d_g, d_g]`` symmetric, possibly indefinite.
        lam: λ > 0.
        floor: > 0, the floor on μ.

    Attributes:
        pi: π of (2.96).
        damped_factors: ``(A + π√λI, B + π⁻¹√λI)`` (after the fallback clamp, if taken).
        inverse: the :class:`~curvlib.linalg.TwoTermKroneckerInverse` applied.
    """

    def __init__(
        self,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
        lam: float,
        *,
        floor: float,
        kind: str = "heuristic",
    ) -> None:
        Ad, Bd, pi = pi_split(A, B, lam)
        shift_a, shift_b = _shifts(lam, pi)
        fallback = None
        try:
            inv = TwoTermKroneckerInverse(Ad, Bd, C, D, floor=floor)
        except NotPSDError as exc:
            warn(
                f"TwoTermHeuristicInverse: a damped leading factor is not positive definite ({exc}); clamping "
                f"the leading factors' eigenvalues at 0 before the π-split shifts ({shift_a:.3e}, {shift_b:.3e})",
                NumericalWarning,
            )
            Ad, Bd = _clamped_factor(Ad, shift_a), _clamped_factor(Bd, shift_b)
            inv = TwoTermKroneckerInverse(Ad, Bd, C, D, floor=floor)
            fallback = "psd_leading_factors"
        self.inverse = inv
        self.pi = float(pi)
        self._damped_factors = (Ad, Bd)
        super().__init__(
            a_dim=A.shape[0],
            b_dim=B.shape[0],
            dtype=A.dtype,
            device=A.device,
            info=InverseInfo(
                kind=kind, method="two_term", lam=float(lam), pi=self.pi, n_clamped=inv.n_clamped, fallback=fallback
            ),
        )

    @property
    def damped_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._damped_factors

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        return self.inverse.solve(X)
