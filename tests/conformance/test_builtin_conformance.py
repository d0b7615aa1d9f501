"""curvlib's own built-ins pass the conformance kit plugin authors use (curvlib.testing.conformance).

Every class here only names a kind, its options and what it promises (``psd``, exactness
on a rank-one block, supported blocks); the checks are inherited.  Dense references for
the dampings are written from their documented formulas with ``torch.kron``; those of the
curvature kinds come from ``torch.func`` (curvlib.testing.references).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from curvlib.testing import references as ref
from curvlib.testing.conformance import (
    ApproximatorConformance,
    CoarseSpaceConformance,
    CurvatureConformance,
    DampingConformance,
    LayerAdapterConformance,
)

F64 = torch.float64
# power SVD / Lanczos to (near) machine precision, so that the fitted factors are exact
# enough for float64 comparisons; float32 stops at its cap and is compared in float32
TIGHT = {"power_tol": 1e-13, "max_iters": 400}


# --------------------------------------------------------------------------- approximators
class _Builtin:
    registry_kind_installed = True
    distribution = "curvlib"


class TestKFACConformance(_Builtin, ApproximatorConformance):
    kind = "kfac"
    psd = True
    exact_on_rank_one = True


class TestKPSVDConformance(_Builtin, ApproximatorConformance):
    kind = "kpsvd"
    options = TIGHT
    bad_options = ({"power_tol": -1.0}, {"max_iters": 0}, {"ema_mode": "terms"})
    psd = True  # Prop. 3.2: symmetric PSD factors for a PSD block
    psd_rtol = 1e-9  # the factors' rank deficiency is resolved to the solver's tolerance
    exact_on_rank_one = True


class TestDeflationConformance(_Builtin, ApproximatorConformance):
    kind = "deflation"
    options = TIGHT
    bad_options = ({"rank": 0},)
    exact_on_rank_one = True  # the second term vanishes


class TestLanczosConformance(_Builtin, ApproximatorConformance):
    kind = "lanczos"
    options = TIGHT
    bad_options = ({"rank": 0}, {"rank": 3, "krylov_dim": 3})
    exact_on_rank_one = True


class TestKFACCorrectedConformance(_Builtin, ApproximatorConformance):
    kind = "kfac_corrected"
    options = TIGHT
    exact_on_rank_one = True


class TestExactBlockConformance(_Builtin, ApproximatorConformance):
    kind = "exact_block"
    bad_options = ({"dense_max": -1},)
    psd = True
    exact_on_rank_one = True


# --------------------------------------------------------------------------- dampings
def _dense(block) -> torch.Tensor:
    terms = getattr(block, "terms", None)
    if terms is None:
        return block.to_dense().to(F64)
    return ref.kron_sum_dense([(A.to(F64), B.to(F64)) for A, B in terms])


def _tikhonov_dense(block, lam: float) -> torch.Tensor:
    """Σ_k A_k⊗B_k + λI (exact blocks: F_ii + λI), (2.94), (4.54)."""
    D = _dense(block)
    return D + lam * torch.eye(D.shape[0], dtype=F64)


class TestTikhonovConformance(_Builtin, DampingConformance):
    kind = "tikhonov"
    options = {"value": 0.1, "pcg_tol": 1e-13, "pcg_max_iters": 500}
    bad_options = ({"method": "cholesky"}, {"pcg_tol": 1.5}, {"dense_max": 0})

    def dense_reference(self, block, options):
        return _tikhonov_dense(block, options.value)


class TestTikhonovExactMethodConformance(TestTikhonovConformance):
    options = {"value": 0.1, "method": "exact"}


class TestHeuristicConformance(_Builtin, DampingConformance):
    kind = "heuristic"
    options = {"value": 0.1}
    bad_options = ({"floor": 0.0},)
    block_types = ("kronecker_1", "kronecker_2")
    unsupported_block_types = ("exact",)

    def dense_reference(self, block, options):
        """(A_1 + π√λI) ⊗ (B_1 + π⁻¹√λI) [+ A_2⊗B_2], π = sqrt((tr A_1/d_a)/(tr B_1/d_g)) (2.95)–(2.96);
        the drawn corrections are PSD, so no joint eigenvalue μ is below the floor (§3.2.5)."""
        (A, B), *rest = [(P.to(F64), Q.to(F64)) for P, Q in block.terms]
        lam = options.value
        pi = math.sqrt((torch.trace(A).item() / A.shape[0]) / (torch.trace(B).item() / B.shape[0]))
        M = torch.kron(A + pi * math.sqrt(lam) * torch.eye(A.shape[0], dtype=F64),
                       B + math.sqrt(lam) / pi * torch.eye(B.shape[0], dtype=F64))
        for C, D in rest:
            M = M + torch.kron(C, D)
        return M


class TestLevenbergMarquardtConformance(_Builtin, DampingConformance):
    kind = "levenberg_marquardt"
    options = {"value": 0.1, "inner_options": {"pcg_tol": 1e-13, "pcg_max_iters": 500}}
    bad_options = ({"floor": 1.0, "ceiling": 0.5}, {"value": 10.0, "ceiling": 1.0}, {"inner": "pi_split"})

    def dense_reference(self, block, options):
        return _tikhonov_dense(block, options.value)  # the inner tikhonov at the current λ


# --------------------------------------------------------------------------- coarse spaces
class TestNicolaidesConformance(_Builtin, CoarseSpaceConformance):
    kind = "nicolaides"


class TestSpectralConformance(_Builtin, CoarseSpaceConformance):
    kind = "spectral"
    partitions = ("layers",)  # defined per layer block (4.27)–(4.30)
    bad_options = ({"source": "nowhere"},)


class TestKrylovConformance(_Builtin, CoarseSpaceConformance):
    kind = "krylov"
    options = {"seed": "residual", "iterations": 2}
    bad_options = ({"iterations": 0}, {"seed": "random"})


class TestResidualConformance(_Builtin, CoarseSpaceConformance):
    kind = "residual"


class TestTaylorConformance(_Builtin, CoarseSpaceConformance):
    kind = "taylor"
    options = {"order": 3}
    bad_options = ({"order": 0},)


# --------------------------------------------------------------------------- curvatures
class TestFisherConformance(_Builtin, CurvatureConformance):
    kind = "fisher"
    options = {"mc_samples": 2}
    bad_options = ({"mc_samples": 0},)

    def dense_reference(self, case, operator):
        return ref.dense_fisher(case.model, operator, case.loss_fn, case.X, operator.sampled_targets)


class TestEmpiricalFisherConformance(_Builtin, CurvatureConformance):
    kind = "empirical_fisher"

    def dense_reference(self, case, operator):
        return ref.dense_empirical_fisher(case.model, operator, case.loss_fn, case.X, case.y)


class TestGGNConformance(_Builtin, CurvatureConformance):
    kind = "ggn"

    def dense_reference(self, case, operator):
        return ref.dense_ggn(case.model, operator, case.loss_fn, case.X, case.y)


# --------------------------------------------------------------------------- layer adapters
class TestLinearAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "linear"

    def make_modules(self):
        return [nn.Linear(3, 2), nn.Linear(4, 3, bias=False)]


class TestConv2dAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "conv2d"

    def make_modules(self):
        return [
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Conv2d(2, 2, (2, 3), stride=2, bias=False),
            nn.Conv2d(1, 2, 3, dilation=2, padding="same", padding_mode="reflect"),
        ]


class TestConvTranspose2dAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "conv_transpose2d"

    def make_modules(self):
        return [
            nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1),
            nn.ConvTranspose2d(3, 2, (2, 3), stride=(1, 2), dilation=2, bias=False),
        ]
