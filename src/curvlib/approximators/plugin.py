"""curvlib's built-in approximators plugin, registered through the ``curvlib`` entry-point group
exactly like a third-party plugin (see pyproject.toml).

Kinds: ``kfac``, ``kpsvd``, ``deflation``, ``lanczos``, ``kfac_corrected``, ``kfac_lowrank``, ``kpsvd_tensor``, ``tnt``,
``singd`` and ``exact_block``; each factory is a :class:`~curvlib.approximators.base.BlockApproximator`
class called with its validated options model.
"""

from __future__ import annotations

from curvlib.approximators.exact import ExactBlockApproximator, ExactBlockOptions
from curvlib.approximators.kfac import KFACApproximator, KFACOptions
from curvlib.approximators.lowrank import KFACLowRankApproximator, KFACLowRankOptions
from curvlib.approximators.singd import SINGDApproximator, SINGDOptions
from curvlib.approximators.tensor import KPSVDTensorApproximator, KPSVDTensorOptions
from curvlib.approximators.tnt import TNTApproximator, TNTOptions
from curvlib.approximators.svd_based import (
    DeflationApproximator,
    DeflationOptions,
    KFACCorrectedApproximator,
    KFACCorrectedOptions,
    KPSVDApproximator,
    KPSVDOptions,
    LanczosApproximator,
    LanczosOptions,
)
from curvlib.plugins import hookimpl

BUILTIN_APPROXIMATORS = (
    ("kfac", KFACApproximator, KFACOptions, "KFAC A⊗G (3.19); KFC for Conv2d/ConvTranspose2d (3.29), §5.2.3", {}),
    ("kpsvd", KPSVDApproximator, KPSVDOptions, "best single Kronecker product (3.22) by power SVD of Z(F)", {}),
    ("deflation", DeflationApproximator, DeflationOptions, "Kronecker rank-r by successive deflated power SVDs (§3.2.3.1)", {}),
    ("lanczos", LanczosApproximator, LanczosOptions, "Kronecker rank-r by restarted Lanczos bidiagonalization (§3.2.3.2)", {}),
    ("kfac_corrected", KFACCorrectedApproximator, KFACCorrectedOptions, "KFAC plus the best rank-1 correction of F − A⊗G (3.26)", {}),
    ("kpsvd_tensor", KPSVDTensorApproximator, KPSVDTensorOptions,
     "best A_1⊗…⊗A_K over the modes of the weight tensor (HOPM, matrix-free), exact Tikhonov inverse per mode",
     {"default_damping": "tikhonov"}),
    ("tnt", TNTApproximator, TNTOptions, "tensor normal training: trace-normalised mode covariances C_a⊗C_g/tr F", {}),
    # Kronecker plus low rank: ShiftSolvable, inverted exactly by Woodbury under tikhonov (no π-split)
    ("kfac_lowrank", KFACLowRankApproximator, KFACLowRankOptions,
     "KFAC A⊗G plus the top-r positive eigenpairs of F − A⊗G, inverted by Woodbury", {"default_damping": "tikhonov"}),
    # the inverse factors themselves: applied by inverse_factors, nothing to decompose
    ("singd", SINGDApproximator, SINGDOptions,
     "SINGD: K Kᵀ ⊗ C Cᵀ ≈ F⁻¹ by one running momentum step per refresh, dense/diagonal/block, inverse-free",
     {"default_damping": "inverse_factors"}),
    # no Kronecker factors for the π-split: front ends default to tikhonov, which solves it exactly
    ("exact_block", ExactBlockApproximator, ExactBlockOptions, "the exact sampled block scale·J_i J_iᵀ; (F_ii + λI)⁻¹ by (4.52)",
     {"default_damping": "tikhonov"}),
)
"""(kind, approximator class, options model, description, registration metadata) of every built-in
approximator; ``default_damping`` tells front ends (``curvlib bench``) which damping suits the kind's
blocks (``heuristic`` when absent)."""


@hookimpl
def curvlib_register_approximators(registry):
    for kind, factory, options, description, metadata in BUILTIN_APPROXIMATORS:
        registry.add(kind, factory, options=options, description=description, **metadata)
