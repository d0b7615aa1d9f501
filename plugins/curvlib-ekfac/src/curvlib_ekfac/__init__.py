"""curvlib-ekfac: the eigenvalue-corrected Kronecker factorization (EKFAC, George et al.,
2018) as a curvlib approximator plugin, kind ``ekfac``.

- :class:`EKFACBlock` — F_EKFAC = (Q_A ⊗ Q_G) diag(vec(S)) (Q_A ⊗ Q_G)ᵀ with its products
  and exact Tikhonov inverse;
- :class:`EKFACApproximator`, :class:`EKFACOptions` — the fit (and its moving average);
- :func:`ekfac_scalings` — S from a layer's statistics.

Installed, it is found through the ``curvlib`` entry-point group::

    import curvlib
    approx = curvlib.approximate(F, "ekfac")
    inv = curvlib.damped_inverse(approx, "tikhonov", value=1e-3)
"""

from curvlib_ekfac.approximator import EKFACApproximator, EKFACOptions, ekfac_scalings, factor_eigenvectors
from curvlib_ekfac.block import EKFACBlock

__all__ = ["EKFACApproximator", "EKFACBlock", "EKFACOptions", "ekfac_scalings", "factor_eigenvectors"]
__version__ = "0.1.0"
