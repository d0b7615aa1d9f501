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


class TestKFACLowRankConformance(_Builtin, ApproximatorConformance):
    kind = "kfac_lowrank"
    options = {"rank": 3, "tol": 1e-12, "max_iters": 400}
    bad_options = ({"rank": 0}, {"depth": 1}, {"tol": 1.0})
    psd = True  # A⊗G plus the positive part of the residual's top eigenpairs
    exact_on_rank_one = True  # the residual vanishes


class TestKPSVDTensorConformance(_Builtin, ApproximatorConformance):
    kind = "kpsvd_tensor"
    options = {"tol": 0.0, "max_iters": 400}
    bad_options = ({"max_iters": 0}, {"tol": 1.0}, {"a_modes": "2x2"})
    psd = True  # Gram sums from PSD starts (Prop. 3.2's argument)
    exact_on_rank_one = True


class TestKPSVDTensorRank2Conformance(_Builtin, ApproximatorConformance):
    kind = "kpsvd_tensor"
    options = {"tol": 0.0, "max_iters": 400, "rank": 2}
    bad_options = ({"rank": 0}, {"g_modes": "balanced"})
    exact_on_rank_one = True  # the residual vanishes


class TestSINGDConformance(_Builtin, ApproximatorConformance):
    kind = "singd"
    own_inverse = True  # K Kᵀ ⊗ C Cᵀ, applied by inverse_factors
    bad_options = ({"lr_cov": 0.0}, {"alpha1": 1.0}, {"block_size": 0})


class TestTNTConformance(_Builtin, ApproximatorConformance):
    kind = "tnt"
    bad_options = ({"ema": 1.5}, {"weight_sharing": "reduce"})
    psd = True
    exact_on_rank_one = True  # one sample: C_a ⊗ C_g / t = D Dᵀ ⊗ ... = F


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


class TestConv1dAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "conv1d"

    def make_modules(self):
        return [nn.Conv1d(2, 4, 3, padding=1, groups=2), nn.Conv1d(2, 2, 2, stride=2, dilation=2, bias=False)]


class TestConv3dAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "conv3d"
    spatial = 3

    def make_modules(self):
        return [nn.Conv3d(2, 3, 2, padding=(1, 0, 0)), nn.Conv3d(2, 2, (1, 2, 2), groups=2, bias=False)]


class TestConvTranspose1dAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "conv_transpose1d"

    def make_modules(self):
        return [nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1), nn.ConvTranspose1d(4, 2, 2, groups=2, bias=False)]


class TestConvTranspose3dAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "conv_transpose3d"
    spatial = 2

    def make_modules(self):
        return [nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1))]


class TestEmbeddingAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "embedding"

    def make_modules(self):
        return [nn.Embedding(7, 3), nn.Embedding(5, 2, padding_idx=0)]

    def make_input(self, module, m, generator):
        return torch.randint(0, module.num_embeddings, (m, 4), generator=generator)


class _NormInput:
    def make_input(self, module, m, generator):
        dtype = next(module.parameters()).dtype
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            shape = (2, *module.normalized_shape)
        else:
            C = module.num_channels if isinstance(module, nn.GroupNorm) else module.num_features
            shape = (C, 3)
        return torch.randn(m, *shape, generator=generator, dtype=torch.float64).to(dtype)


class TestLayerNormAdapterConformance(_NormInput, _Builtin, LayerAdapterConformance):
    kind = "layer_norm"

    def make_modules(self):
        return [nn.LayerNorm(4), nn.LayerNorm((2, 3), bias=False)]


class TestRMSNormAdapterConformance(_NormInput, _Builtin, LayerAdapterConformance):
    kind = "rms_norm"

    def make_modules(self):
        return [nn.RMSNorm(4, eps=1e-5)]


class TestGroupNormAdapterConformance(_NormInput, _Builtin, LayerAdapterConformance):
    kind = "group_norm"

    def make_modules(self):
        return [nn.GroupNorm(2, 4)]


class TestBatchNormAdapterConformance(_NormInput, _Builtin, LayerAdapterConformance):
    kind = "batch_norm"

    def make_modules(self):
        bn = nn.BatchNorm1d(3)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
        return [bn.eval()]  # running statistics: samples are independent


class TestMultiheadAttentionAdapterConformance(_Builtin, LayerAdapterConformance):
    kind = "multihead_attention"

    def make_modules(self):
        return [nn.MultiheadAttention(4, 2, batch_first=True), nn.MultiheadAttention(4, 1, batch_first=True, bias=False)]

    def make_input(self, module, m, generator):
        x = torch.randn(m, 5, 4, generator=generator, dtype=torch.float64).to(next(module.parameters()).dtype)
        return (x, x, x)
