"""curvlib's built-in damping plugin, registered through the ``curvlib`` entry-point group
exactly like a third-party plugin (see pyproject.toml).

Damping kinds (λ means one thing per kind, stated with its formula):

- ``tikhonov``: M = Σ_k A_k⊗B_k + λI ("normal damping", (2.94), (4.54));
- ``heuristic``: M = (A_1 + π√λI)⊗(B_1 + π⁻¹√λI) [+ A_2⊗B_2] (π-split (2.95)–(2.96), §3.2.5);
- ``levenberg_marquardt``: either, with λ adapted by Martens & Grosse's reduction-ratio rule;
- ``inverse_free``: the π-split's inverse factors by Newton–Schulz steps (products only), dense,
  diagonal or block-diagonal;
- ``inverse_factors``: P_A ⊗ P_G, the inverse factors the block carries (``singd``; λ only for
  coordinates no block covers);
- ``kron_inverse``: P = C⊗D nearest to (F_ii + λI)⁻¹ in ‖I − P(F_ii + λI)‖_F (sampled blocks).
"""

from __future__ import annotations

from curvlib.damping.heuristic import HeuristicDamping, HeuristicOptions
from curvlib.damping.inverse_free import (
    InverseFactorsDamping,
    InverseFactorsOptions,
    InverseFreeDamping,
    InverseFreeOptions,
)
from curvlib.damping.kron_inverse import KronInverseDamping, KronInverseOptions
from curvlib.damping.levenberg_marquardt import LevenbergMarquardtDamping, LevenbergMarquardtOptions
from curvlib.damping.tikhonov import TikhonovDamping, TikhonovOptions
from curvlib.plugins import hookimpl


@hookimpl
def curvlib_register_dampings(registry):
    registry.add(
        "tikhonov",
        TikhonovDamping,
        options=TikhonovOptions,
        description="(Σ_k A_k⊗B_k + λI)⁻¹, normal damping (4.54): joint eigenbasis for one term, PCG for more",
    )
    registry.add(
        "heuristic",
        HeuristicDamping,
        options=HeuristicOptions,
        description="KFAC's π-split (A_1 + π√λI)⊗(B_1 + π⁻¹√λI) (2.95)–(2.96); two terms by §3.2.5 with a floor on μ",
    )
    registry.add(
        "levenberg_marquardt",
        LevenbergMarquardtDamping,
        options=LevenbergMarquardtOptions,
        description="tikhonov or heuristic with λ adapted from the reduction ratio (Martens & Grosse's rule)",
    )
    registry.add(
        "kron_inverse",
        KronInverseDamping,
        options=KronInverseOptions,
        description="C⊗D minimising ‖I − (C⊗D)(F_ii + λI)‖_F by alternating least squares (exact_block's blocks)",
    )
    registry.add(
        "inverse_free",
        InverseFreeDamping,
        options=InverseFreeOptions,
        description="the π-split's inverse factors by Newton–Schulz steps, no decomposition; dense, diagonal or block",
    )
    registry.add(
        "inverse_factors",
        InverseFactorsDamping,
        options=InverseFactorsOptions,
        description="the inverse factors a block carries (singd's K Kᵀ ⊗ C Cᵀ), applied by two GEMMs",
    )
