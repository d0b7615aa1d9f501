"""The block EKFAC fits: a diagonal matrix in the Kronecker eigenbasis of KFAC's factors.

With A = Q_A diag(e_A) Q_Aᵀ ``[d_a, d_a]`` and G = Q_G diag(e_G) Q_Gᵀ ``[d_g, d_g]`` the
KFAC factors of a layer (thesis (3.19), (3.29)), U = Q_A ⊗ Q_G is an orthonormal basis of
the layer's parameter space R^{p_i}, p_i = d_a·d_g, and

    F_EKFAC = U diag(vec(S)) Uᵀ,         S ``[d_g, d_a]``, S ≥ 0 entrywise,

with vec the column-major vectorisation of curvlib (Def. 3.2), so that entry (i, j) of S
is the scaling of the basis vector q_A,j ⊗ q_G,i = vec(q_G,i q_A,jᵀ).  Since
Uᵀ vec(X) = vec(Q_Gᵀ X Q_A) (Thm 3.13), every product is two small GEMMs on each side:

    F_EKFAC vec(X)        = vec(Q_G [(Q_Gᵀ X Q_A) ⊙ S] Q_Aᵀ),
    (F_EKFAC + λI)⁻¹ vec(X) = vec(Q_G [(Q_Gᵀ X Q_A) ⊘ (S + λ)] Q_Aᵀ).

KFAC itself is the special case S = e_G e_Aᵀ; EKFAC (George et al., 2018) re-fits S (see
:mod:`curvlib_ekfac.approximator`).  The block is *not* a Kronecker sum: it declares the
:class:`curvlib.linalg.ShiftSolvable` capability (:meth:`EKFACBlock.tikhonov_solve`), so
curvlib's ``tikhonov`` damping applies the exact inverse above by delegating to it, as it
does for curvlib's ``exact_block``.  The π-split ``heuristic`` damping needs a
:class:`curvlib.linalg.KroneckerFactored` block and refuses it.  Products, ``@``, the
operator algebra and ``to_scipy`` come from curvlib's operator base.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from curvlib.errors import ConfigError, DTypeDeviceError, PerformanceWarning, ShapeError
from curvlib.linalg import ShiftSolvable, vec

__all__ = ["EKFACBlock"]

_DENSE_WARN = 4096  # to_dense() of a larger block emits a PerformanceWarning


class EKFACBlock(ShiftSolvable):
    """F_EKFAC = (Q_A ⊗ Q_G) diag(vec(S)) (Q_A ⊗ Q_G)ᵀ ``[p_i, p_i]`` (module docstring).

    Args:
        evec_a: Q_A ``[d_a, d_a]``, orthonormal columns (eigenvectors of A).
        evec_g: Q_G ``[d_g, d_g]``, orthonormal columns (eigenvectors of G).
        scalings: S ``[d_g, d_a]``, the (non-negative) diagonal in that basis.

    Raises:
        ShapeError: the shapes do not fit together.
        DTypeDeviceError: the tensors differ in dtype or device.
    """

    def __init__(self, evec_a: torch.Tensor, evec_g: torch.Tensor, scalings: torch.Tensor) -> None:
        d_a, d_g = evec_a.shape[-1], evec_g.shape[-1]
        if evec_a.shape != (d_a, d_a) or evec_g.shape != (d_g, d_g) or scalings.shape != (d_g, d_a):
            raise ShapeError(
                "EKFACBlock: expected evec_a [d_a, d_a], evec_g [d_g, d_g] and scalings [d_g, d_a]; got "
                f"{list(evec_a.shape)}, {list(evec_g.shape)} and {list(scalings.shape)}"
            )
        for name, t in (("evec_g", evec_g), ("scalings", scalings)):
            if t.dtype != evec_a.dtype or t.device != evec_a.device:
                raise DTypeDeviceError(
                    f"EKFACBlock: evec_a is {evec_a.dtype} on {evec_a.device}, {name} is {t.dtype} on {t.device}; "
                    "expected the same"
                )
        self.evec_a = evec_a
        self.evec_g = evec_g
        self.scalings = scalings

    # -- description ----------------------------------------------------------------------
    @property
    def a_dim(self) -> int:
        """d_a, the activation side (d_in + 1 with a bias)."""
        return self.evec_a.shape[0]

    @property
    def b_dim(self) -> int:
        """d_g, the gradient side (d_out)."""
        return self.evec_g.shape[0]

    @property
    def p(self) -> int:
        return self.a_dim * self.b_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.evec_a.dtype

    @property
    def device(self) -> torch.device:
        return self.evec_a.device

    def __repr__(self) -> str:
        return f"EKFACBlock(a_dim={self.a_dim}, b_dim={self.b_dim}, dtype={self.dtype}, device={self.device})"

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> EKFACBlock:
        """A copy in ``dtype`` and/or on ``device``."""
        return EKFACBlock(*(t.to(device=device, dtype=dtype) for t in (self.evec_a, self.evec_g, self.scalings)))

    # -- products -----------------------------------------------------------------------------
    def _rotated(self, X: torch.Tensor) -> torch.Tensor:
        """Q_Gᵀ X Q_A: coordinates of vec(X) in the basis U, ``[..., d_g, d_a]``."""
        return self.evec_g.T @ X @ self.evec_a

    def _back(self, Y: torch.Tensor) -> torch.Tensor:
        """Q_G Y Q_Aᵀ: back from the basis U."""
        return self.evec_g @ Y @ self.evec_a.T

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        """F_EKFAC vec(X) in matrix form, Q_G [(Q_Gᵀ X Q_A) ⊙ S] Q_Aᵀ, for ``X [k, d_g, d_a]``;
        cost O(k·d_a·d_g·(d_a + d_g))."""
        return self._back(self._rotated(X) * self.scalings)

    def tikhonov_solve(self, X: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """(F_EKFAC + λI)⁻¹ vec(X) in matrix form, exact: Q_G [(Q_Gᵀ X Q_A) ⊘ (S + λ)] Q_Aᵀ.

        Called by curvlib's ``tikhonov`` damping (its exact-block path).

        Args:
            X: ``[..., d_g, d_a]``.
            lam: λ > 0.

        Returns:
            ``[..., d_g, d_a]``.

        Raises:
            ConfigError: λ is not finite and > 0.
        """
        lam_f = float(lam)
        if not (math.isfinite(lam_f) and lam_f > 0):
            raise ConfigError(f"EKFACBlock.tikhonov_solve: the damping λ must be finite and > 0, got {lam_f}")
        self._check_matrix(X, "EKFACBlock.tikhonov_solve")
        return self._back(self._rotated(X) / (self.scalings + lam_f))

    def to_dense(self) -> torch.Tensor:
        """F_EKFAC as a dense ``[p_i, p_i]`` matrix (tests and small blocks; PerformanceWarning above p_i = 4096)."""
        if self.p > _DENSE_WARN:
            warnings.warn(f"EKFACBlock.to_dense() forms a dense {self.p} × {self.p} matrix", PerformanceWarning, stacklevel=2)
        U = torch.kron(self.evec_a, self.evec_g)  # columns q_A,j ⊗ q_G,i, in vec order
        return (U * vec(self.scalings)) @ U.T

    def trace(self) -> torch.Tensor:
        """tr F_EKFAC = Σ S (U is orthonormal).  0-d tensor."""
        return self.scalings.sum()

    def frobenius_norm(self) -> torch.Tensor:
        """‖F_EKFAC‖_F = ‖S‖_F.  0-d tensor."""
        return torch.linalg.vector_norm(self.scalings)

    # -- plain-container serialization --------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Tensors only (``torch.load(weights_only=True)`` compatible); see :meth:`from_state_dict`."""
        return {"evec_a": self.evec_a, "evec_g": self.evec_g, "scalings": self.scalings}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> EKFACBlock:
        """Inverse of :meth:`state_dict`."""
        try:
            return cls(data["evec_a"], data["evec_g"], data["scalings"])
        except KeyError as exc:
            raise ConfigError(
                f"EKFACBlock.from_state_dict: missing key {exc}; expected 'evec_a', 'evec_g' and 'scalings'"
            ) from None
