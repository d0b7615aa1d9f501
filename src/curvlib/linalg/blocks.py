"""Layer-block operators and the capabilities a block declares (DESIGN.md §3 "Block capabilities").

A *layer block* is an operator M ``[p_i, p_i]`` on one layer's flat vector vec(X), X
``[d_g, d_a]`` (= W̄'s shape), p_i = d_a·d_g, with the column-major ``vec`` of Def. 3.2.
What a block can do beyond products is declared by deriving from a capability class, and
the families dispatch with ``isinstance`` on these classes — never by probing attributes:

- :class:`KroneckerFactored` — the block is Σ_k A_k ⊗ B_k and exposes its ``terms``
  (every Kronecker-sum approximation; dampings invert it from the factors);
- :class:`ShiftSolvable` — the block solves (M + λI) vec(Y) = vec(X) exactly itself
  (an exact block, EKFAC's diagonal in an eigenbasis); the ``tikhonov`` damping uses it;
- :class:`SampledBlock` — the block is scale·J_i J_iᵀ and exposes its statistics (the exact
  block); the ``kron_inverse`` damping fits an approximate inverse from them;
- :class:`FactorEigenbasis` — an applied inverse that eigendecomposed its (damped) leading
  factors and exposes them as a :class:`~curvlib.linalg.KroneckerEigen` (the ``spectral``
  coarse space reuses it instead of decomposing again);
- :class:`DampedKroneckerFactors` — an applied inverse (A + δ_A I)⁻¹ ⊗ (B + δ_B I)⁻¹ that
  exposes the damped factors it inverts (the ``previous`` coarse mode, the spectral space
  when no eigenbasis is exposed).

:class:`BlockDiagonalOperator` places layer blocks on the diagonal of the flat parameter
vector (rows no block covers are multiplied by a fixed scale: 0 for an approximation, 1/λ
for a damped inverse); approximations and damped inverses are block-diagonal operators.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from curvlib.errors import DTypeDeviceError, PerformanceWarning, ShapeError, warn
from curvlib.linalg.inverse import KroneckerEigen
from curvlib.linalg.kron import unvec, vec
from curvlib.linalg.operator import LinearOperator, VectorLayout

__all__ = [
    "BlockDiagonalOperator",
    "DampedKroneckerFactors",
    "FactorEigenbasis",
    "InverseFactored",
    "KroneckerFactored",
    "LayerBlockOperator",
    "SampledBlock",
    "ShiftSolvable",
    "structured_part",
]


class LayerBlockOperator(LinearOperator):
    """A symmetric operator M ``[p_i, p_i]`` on vec(X), X ``[d_g, d_a]``, applied in matrix form.

    Subclasses define :attr:`a_dim`, :attr:`b_dim`, :attr:`dtype`, :attr:`device` and
    :meth:`_apply` on a checked batch of matrices; :meth:`apply` is the public matrix form,
    ``matvec``/``@`` the flat form of the operator base.
    """

    symmetric = True

    @property
    @abc.abstractmethod
    def a_dim(self) -> int:
        """d_a, the activation side (``d_in + 1`` for a Linear layer with bias)."""

    @property
    @abc.abstractmethod
    def b_dim(self) -> int:
        """d_g, the gradient side (``d_out``)."""

    @property
    def shape(self) -> tuple[int, int]:
        p = self.a_dim * self.b_dim
        return (p, p)

    @abc.abstractmethod
    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        """M vec(X) in matrix form for a checked ``X [k, d_g, d_a]`` -> ``[k, d_g, d_a]``."""

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        """M vec(X) in matrix form: ``[..., d_g, d_a]`` -> ``[..., d_g, d_a]``."""
        caller = f"{type(self).__name__}.apply"
        self._check_matrix(X, caller)
        Y = self._apply(X.reshape(-1, self.b_dim, self.a_dim)).reshape(X.shape)
        self._check_result(Y, X, caller)
        return Y

    def _check_matrix(self, X: torch.Tensor, caller: str) -> None:
        if not isinstance(X, torch.Tensor):
            raise ShapeError(f"{caller}: expected a torch.Tensor, got {type(X).__name__}")
        if X.dtype != self.dtype or X.device != self.device:
            raise DTypeDeviceError(f"{caller}: the block is {self.dtype} on {self.device}, X is {X.dtype} on {X.device}")
        if X.ndim < 2 or tuple(X.shape[-2:]) != (self.b_dim, self.a_dim):
            raise ShapeError(
                f"{caller}: expected X [..., d_g, d_a] = [..., {self.b_dim}, {self.a_dim}], got {list(X.shape)}"
            )

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        # columns -> a batch [k, d_g, d_a] of matrices, applied at once
        return vec(self._apply(unvec(X.T, self.b_dim, self.a_dim))).T


class KroneckerFactored(LayerBlockOperator):
    """Capability: the block is Σ_k A_k ⊗ B_k with A_k ``[d_a, d_a]``, B_k ``[d_g, d_g]``."""

    @property
    @abc.abstractmethod
    def terms(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The pairs ``(A_k [d_a, d_a], B_k [d_g, d_g])``."""


class ShiftSolvable(LayerBlockOperator):
    """Capability: the block solves its own Tikhonov-damped system exactly."""

    @abc.abstractmethod
    def tikhonov_solve(self, X: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
        """(M + λI)⁻¹ vec(X) in matrix form: X ``[..., d_g, d_a]`` -> ``[..., d_g, d_a]``."""


class InverseFactored(LayerBlockOperator):
    """Capability: the block carries the Kronecker factors of its own (damped) inverse,
    M⁻¹ = P_A ⊗ P_G, kept by its approximator without inverting anything (SINGD's K Kᵀ and
    C Cᵀ); the ``inverse_factors`` damping applies them."""

    @property
    @abc.abstractmethod
    def inverse_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_A [d_a, d_a], P_G [d_g, d_g])`` with M⁻¹ = P_A ⊗ P_G."""


def structured_part(M: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """M restricted to its diagonal blocks of ``block_size`` rows (all of M for ``None``, the
    diagonal for 1): the structures of SINGD's factors."""
    if block_size is None or block_size >= M.shape[0]:
        return M
    if block_size == 1:
        return torch.diag_embed(torch.diagonal(M))
    idx = torch.arange(M.shape[0], device=M.device) // block_size
    return torch.where(idx[:, None] == idx[None, :], M, torch.zeros((), dtype=M.dtype, device=M.device))


class SampledBlock(LayerBlockOperator):
    """Capability: the block is the sampled scale·J_i J_iᵀ of per-pair gradients D_n and exposes
    the layer's statistics (:class:`~curvlib.curvatures.statistics.LayerStatistics`), so that a
    damping can fit its inverse from them (``kron_inverse``)."""

    @property
    @abc.abstractmethod
    def statistics(self) -> Any:
        """The :class:`~curvlib.curvatures.statistics.LayerStatistics` the block is made of."""


class FactorEigenbasis(abc.ABC):
    """Capability of an applied inverse: the eigendecomposition of its damped leading factors."""

    @property
    @abc.abstractmethod
    def eigen(self) -> KroneckerEigen:
        """Eigenvalues and eigenvectors of the (damped) factors the inverse was built from."""

    @property
    def eigen_computed(self) -> bool:
        """Whether :attr:`eigen` is at hand without new work (an inverse that does not need the
        eigenbasis for its own products may compute it at first use)."""
        return True


class DampedKroneckerFactors(abc.ABC):
    """Capability of an applied inverse: the damped Kronecker factors it inverts."""

    @property
    @abc.abstractmethod
    def damped_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_damped [d_a, d_a], G_damped [d_g, d_g])``."""


def _as_slice(s: Any, caller: str) -> slice:
    if isinstance(s, slice):
        if s.step not in (None, 1) or s.start is None or s.stop is None:
            raise ShapeError(f"{caller}: layer slices must be contiguous slice(start, stop), got {s!r}")
        return slice(int(s.start), int(s.stop))
    if isinstance(s, Sequence) and len(s) == 2:
        return slice(int(s[0]), int(s[1]))
    raise ShapeError(f"{caller}: expected a slice(start, stop) per layer, got {s!r}")


class BlockDiagonalOperator(LinearOperator):
    """diag(M_1, …, M_ℓ) over a flat vector ``[p]``: block i acts on the rows ``slices[i]``.

    Args:
        blocks: square operators ``[p_i, p_i]`` of one dtype and device.
        slices: each block's contiguous rows, without overlap, inside ``[0, p)``.
        p: the length of the flat vector; default: the blocks tile ``[0, Σ p_i)``.
        uncovered_scale: what rows no block covers are multiplied by (0: zero blocks).
        layout: the list form of the flat vector, if any.

    Attributes:
        blocks, slices, uncovered (how many rows no block covers).
    """

    def __init__(self, blocks: Sequence[LinearOperator], slices: Sequence[Any], *, p: int | None = None,
                 uncovered_scale: float = 0.0, layout: VectorLayout | None = None) -> None:
        caller = type(self).__name__
        blocks = tuple(blocks)
        slices = tuple(_as_slice(s, caller) for s in slices)
        if not blocks:
            raise ShapeError(f"{caller}: expected at least one block, got none")
        if len(blocks) != len(slices):
            raise ShapeError(f"{caller}: {len(blocks)} blocks but {len(slices)} slices")
        first = blocks[0]
        for i, (b, s) in enumerate(zip(blocks, slices)):
            if not isinstance(b, LinearOperator):
                raise ShapeError(f"{caller}: block {i} is a {type(b).__name__}, expected a LinearOperator")
            if b.dtype != first.dtype or b.device != first.device:
                raise DTypeDeviceError(
                    f"{caller}: block {i} is {b.dtype} on {b.device}, block 0 is {first.dtype} on {first.device}"
                )
            if s.stop - s.start != b.shape[0] or b.shape[0] != b.shape[1]:
                raise ShapeError(f"{caller}: slice {i} [{s.start}:{s.stop}] has length {s.stop - s.start}, "
                                 f"its block is {list(b.shape)}")
        covered = sum(b.shape[0] for b in blocks)
        p = covered if p is None else int(p)
        pos = 0
        for start, stop in sorted((s.start, s.stop) for s in slices):
            if start < pos or stop > p:
                raise ShapeError(f"{caller}: the slices must lie in [0, {p}) without overlaps; got "
                                 f"{[(s.start, s.stop) for s in slices]}")
            pos = stop
        self.blocks = blocks
        self.slices = slices
        self.uncovered = p - covered
        self._p = p
        self._uncovered_scale = float(uncovered_scale)
        self._layout = layout

    @property
    def p(self) -> int:
        """The length of the flat vector."""
        return self._p

    @property
    def shape(self) -> tuple[int, int]:
        return (self._p, self._p)

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return all(b.symmetric for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def _apply_blocks(self, X: torch.Tensor, adjoint: bool) -> torch.Tensor:
        out = X * self._uncovered_scale if self.uncovered else torch.empty_like(X)
        for block, s in zip(self.blocks, self.slices):
            out[s] = block._rmatmat(X[s]) if adjoint else block._matmat(X[s])
        return out

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self._apply_blocks(X, adjoint=False)

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self._apply_blocks(Y, adjoint=True)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[p, p]`` matrix, block by block (PerformanceWarning above
        :attr:`dense_warning_size`)."""
        if self._p > self.dense_warning_size:
            warn(
                f"{type(self).__name__}.to_dense() forms a dense {self._p} × {self._p} matrix",
                PerformanceWarning,
            )
        out = torch.zeros(self._p, self._p, dtype=self.dtype, device=self.device)
        if self.uncovered:
            out.diagonal().fill_(self._uncovered_scale)
            for s in self.slices:
                out[s, s] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PerformanceWarning)  # warned once above, for the whole matrix
            for block, s in zip(self.blocks, self.slices):
                out[s, s] = block.to_dense()
        return out
