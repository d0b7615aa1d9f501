"""FLOP model of one KFAC-family optimizer step, as a multiple of one SGD step: the limit
that a measured step-cost ratio of ``step_cost.py`` would reach if every kernel ran at
the same FLOP rate and nothing else (Python, memory traffic, small-matrix overheads) cost
anything.  Imported as ``_flops`` by the scripts in ``benchmarks/``.

Counts, per ``nn.Linear`` layer with d_in inputs, d_out outputs, d_a = d_in + 1 (the bias
column of ā = [a; 1]), d_g = d_out, a batch of m, one multiply-add = 2 FLOPs; every layer
is counted alike (the first layer's unneeded input gradient included):

* SGD step (the denominator): forward 2·m·d_in·d_out + backward 4·m·d_in·d_out (input and
  weight gradients) = **6·m·d_in·d_out**; the O(#params) update is not counted.
* Monte Carlo Fisher capture (1 sample), what the library runs besides the SGD step's
  forward and backward: a second forward 2·m·d_in·d_out if it re-runs the forward, and a
  backward of the sampled targets, 2·m·d_in·d_out when only output gradients are
  propagated (``autograd.grad`` to the layer outputs, or parameter gradients skipped) or
  4·m·d_in·d_out when weight gradients are computed too (``autograd.grad`` to the
  parameters, ``loss.backward()``).  An empirical-Fisher library captures in the loss's
  own backward: 0.
* Factors per refresh: A = āᵀā/m and G = gᵀg/m, **2·m·(d_a² + d_g²)** (SINGD forms
  S = Kᵀā then SSᵀ: twice that, plus 4·d³ per factor for KᵀK and K·m_K).
* Preconditioner applied to the gradient [d_g, d_a] every step: explicit inverses
  B⁻¹ X A⁻¹, two GEMMs, **2·d_g·d_a·(d_a + d_g)**; eigenbasis Q_g[(Q_gᵀ X Q_a) ⊘ E]Q_aᵀ
  (or SINGD's C Cᵀ X K Kᵀ), four GEMMs, **4·d_g·d_a·(d_a + d_g)**.
* Inversion, per d×d factor (constants of Golub & Van Loan, *Matrix Computations*, 4th ed.,
  and the LAPACK operation counts of LAPACK Working Note 41 — textbook counts, not
  measured ones; divide-and-conquer eigensolvers such as LAPACK's ``syevd`` that torch
  calls often do less than 9·d³):

  - :data:`CHOLESKY_INVERSE` = d³: Cholesky ``potrf`` d³/3 (GVL Alg. 4.2.2) + inverse
    from the factor ``potri`` 2·d³/3 (LAWN 41);
  - :data:`LU_INVERSE` = 8·d³/3: ``torch.linalg.inv`` = LU 2·d³/3 (GVL §3.2) + a solve
    against I, two triangular solves with d right-hand sides, 2·d³;
  - :data:`EIGH` = 9·d³: symmetric eigenvalues and eigenvectors (GVL §8.3, symmetric QR
    algorithm with accumulated Q: "about 9n³ flops").

The limit of a step kind is its FLOPs over the SGD step's; the amortized limit combines
the three kinds with the schedule formula :func:`amortized`, like the measured ratios.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["CHOLESKY_INVERSE", "EIGH", "LU_INVERSE", "StepAlgorithm", "StepLimits", "amortized",
           "linear_shapes", "sgd_flops", "step_limits"]

CHOLESKY_INVERSE = 1.0
LU_INVERSE = 8.0 / 3.0
EIGH = 9.0


@dataclass(frozen=True)
class StepAlgorithm:
    """What one library's KFAC-family step computes, in the terms of the module docstring.

    Attributes:
        second_forward: the curvature capture re-runs the forward (2·m·d_in·d_out).
        sampled_backward: FLOPs of the backward of sampled targets in units of
            m·d_in·d_out: 0 (empirical Fisher), 2 (output gradients only), 4 (weight
            gradients too).
        factor_gemms: products of m·d² per factor and refresh (KFAC 1, SINGD 2).
        refresh_cubic: d³ per factor at every refresh besides the factors (SINGD 4).
        apply_gemms: GEMMs [d_g, d_a]·[d_a, d_a] or [d_g, d_g]·[d_g, d_a] per step, in
            pairs (2 explicit inverses, 4 eigenbasis or SINGD).
        inversion_cubic: d³ per factor at an inversion (:data:`CHOLESKY_INVERSE`,
            :data:`LU_INVERSE`, :data:`EIGH`; 0: inverse-free).
    """

    second_forward: bool
    sampled_backward: float
    apply_gemms: int
    inversion_cubic: float
    factor_gemms: int = 1
    refresh_cubic: float = 0.0


@dataclass(frozen=True)
class StepLimits:
    """FLOPs of the three step kinds over one SGD step's."""

    plain: float
    refresh: float
    full: float

    def amortized(self, T1: int, T2: int) -> float:
        return amortized(self.plain, self.refresh, self.full, T1, T2)


def amortized(plain: float, refresh: float, full: float, T1: int, T2: int) -> float:
    """Mean cost of a step over T2 steps: a refresh every T1 steps, an inversion (with its
    refresh) every T2 (a multiple of T1): [(T2 − T2/T1)·plain + (T2/T1 − 1)·refresh + full] / T2."""
    return ((T2 - T2 // T1) * plain + (T2 // T1 - 1) * refresh + full) / T2


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(d_in, d_out) of every ``nn.Linear`` of ``model``, in module order."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def sgd_flops(shapes: list[tuple[int, int]], m: int) -> float:
    """Forward and backward of a batch of m: Σ 6·m·d_in·d_out."""
    return sum(6.0 * m * d_in * d_out for d_in, d_out in shapes)


def step_limits(algorithm: StepAlgorithm, shapes: list[tuple[int, int]], m: int) -> StepLimits:
    """The FLOP-model limits of ``algorithm``'s plain, refresh and refresh+invert steps."""
    plain = refresh = inversion = 0.0
    for d_in, d_out in shapes:
        d_a, d_g = d_in + 1, d_out
        plain += algorithm.apply_gemms * d_g * d_a * (d_a + d_g)
        capture = (2.0 * algorithm.second_forward + algorithm.sampled_backward) * m * d_in * d_out
        factors = algorithm.factor_gemms * 2.0 * m * (d_a**2 + d_g**2)
        refresh += capture + factors + algorithm.refresh_cubic * (d_a**3 + d_g**3)
        inversion += algorithm.inversion_cubic * (d_a**3 + d_g**3)
    sgd = sgd_flops(shapes, m)
    return StepLimits(plain=1 + plain / sgd, refresh=1 + (plain + refresh) / sgd,
                      full=1 + (plain + refresh + inversion) / sgd)


#: curvlib's ``kfac`` (``heuristic`` damping) in the training-loop pattern of docs/optimizer.md
#: (``opt.capture``): capture = hooks on the training forward and ``autograd.grad`` of the
#: sampled targets to the recorded layer outputs (no second forward); π-split damping
#: applied with the explicit inverses of the damped factors (two GEMMs); each damped factor
#: is Cholesky-inverted: d³ per factor.
CURVLIB_KFAC = StepAlgorithm(second_forward=False, sampled_backward=2, apply_gemms=2,
                             inversion_cubic=CHOLESKY_INVERSE)
