"""Position geometry of weight-shared layer statistics: which positions a use has and which
position pairs an ∞-norm band keeps.

A layer applied at several *positions* with the same weight — a convolution at every
output pixel, a Linear layer at every token of a sequence — has the per-sample gradient
DW̄ = Σ_t g_t ā_tᵀ (3.27) and the Fisher block a double sum over position pairs (t, t')
(3.28).  :class:`Geometry` says how those positions are laid out:

==========  ====================  ====================================================
kind        ``shape``             example
==========  ====================  ====================================================
``none``    ``()`` (T = 1)         a Linear layer on ``[m, d_in]``, a norm layer's block
``sequence`` ``(T,)``              a Linear layer on tokens ``[m, T, d_in]``, Conv1d
``grid``    ``(H, W)``, ``(D, H, W)``  Conv2d / Conv3d output grids, Linear on ``[m, H, W, d]``
==========  ====================  ====================================================

Positions are flattened row-major (the last axis fastest), t = ((i_1·S_2 + i_2)·S_3 + …).
The band of (3.35) is the ∞-norm band ‖t − t'‖∞ = max_j |i_j − i'_j| ≤ r on the N-D
positions — never on the flattened index, which would wrap at row ends and miss the
neighbours along the other axes (DESIGN.md §10).  ``kernel`` is the kernel size of a
convolution (the thesis's default band radius, §3.4.3); it is ``None`` for positions
without a kernel.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch

from curvlib.errors import ConfigError, ShapeError

__all__ = ["Geometry", "band_mask"]

GeometryKind = Literal["none", "sequence", "grid"]


@dataclass(frozen=True)
class Geometry:
    """The positions of one use of a layer (module docstring).

    Attributes:
        kind: ``"none"``, ``"sequence"`` or ``"grid"``.
        shape: the position grid, ``()`` for ``none``; its product is T.
        kernel: the convolution kernel size per axis (``len(kernel) == len(shape)``), or
            ``None`` for positions without a kernel.
    """

    kind: GeometryKind = "none"
    shape: tuple[int, ...] = ()
    kernel: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if self.kind not in ("none", "sequence", "grid"):
            raise ConfigError(f"Geometry: kind must be 'none', 'sequence' or 'grid', got {self.kind!r}")
        if self.kind == "none" and shape:
            raise ShapeError(f"Geometry: kind 'none' has no position axes, got shape {list(shape)}")
        if self.kind != "none" and not shape:
            raise ShapeError(f"Geometry: kind {self.kind!r} needs at least one position axis, got shape ()")
        if any(s < 1 for s in shape):
            raise ShapeError(f"Geometry: every position axis must have size ≥ 1, got {list(shape)}")
        if self.kernel is not None:
            kernel = tuple(int(k) for k in self.kernel)
            if len(kernel) != len(shape) or any(k < 1 for k in kernel):
                raise ShapeError(f"Geometry: kernel {list(kernel)} must have one size ≥ 1 per position axis {list(shape)}")
            object.__setattr__(self, "kernel", kernel)

    # -- constructors ----------------------------------------------------------------------
    @classmethod
    def none(cls) -> Geometry:
        """No positions (T = 1)."""
        return cls("none", ())

    @classmethod
    def sequence(cls, length: int, kernel: int | None = None) -> Geometry:
        """A sequence of ``length`` positions (tokens; a Conv1d output with ``kernel``)."""
        return cls("sequence", (int(length),), None if kernel is None else (int(kernel),))

    @classmethod
    def grid(cls, shape: tuple[int, ...], kernel: tuple[int, ...] | None = None) -> Geometry:
        """An N-D grid of positions (a convolution's output, ``kernel`` its kernel size)."""
        return cls("grid", tuple(shape), kernel)

    @classmethod
    def of_positions(cls, shape: tuple[int, ...], kernel: tuple[int, ...] | None = None) -> Geometry:
        """``none`` for no axis, ``sequence`` for one, ``grid`` for more."""
        shape = tuple(int(s) for s in shape)
        if not shape:
            return cls.none()
        return cls("sequence" if len(shape) == 1 else "grid", shape, kernel)

    # -- description -----------------------------------------------------------------------
    @property
    def T(self) -> int:
        """The number of positions, prod(shape) (1 for ``none``)."""
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def kernel_radius(self) -> int:
        """The default band radius r of §3.4.3: max(kernel), or 0 without a kernel (positions
        treated as independent, the block of KFAC-expand)."""
        return max(self.kernel) if self.kernel else 0

    def covers_all_pairs(self, radius: int | None) -> bool:
        """Whether the band ‖t − t'‖∞ ≤ ``radius`` keeps every pair (``None``: yes)."""
        return radius is None or radius >= max(self.shape, default=1) - 1

    def band_offsets(self, radius: int) -> Iterator[tuple[tuple[slice, ...], tuple[slice, ...]]]:
        """The offsets δ of every axis but the last, |δ_j| ≤ radius, clipped to the grid.

        Yields ``(sl_t, sl_s)``: tuples of slices (one per axis but the last) such that the
        positions selected by ``sl_t`` meet the positions selected by ``sl_s`` shifted by δ.
        The last axis is handled by a ``[S_N, S_N]`` band mask (:func:`band_mask`).  For a
        sequence there is one empty offset.
        """
        ranges = []
        for size in self.shape[:-1]:
            rh = min(radius, size - 1)
            ranges.append(
                [(slice(max(0, -d), size - max(0, d)), slice(max(0, d), size - max(0, -d))) for d in range(-rh, rh + 1)]
            )
        for combo in itertools.product(*ranges):
            yield tuple(c[0] for c in combo), tuple(c[1] for c in combo)

    def __repr__(self) -> str:
        k = "" if self.kernel is None else f", kernel={self.kernel}"
        return f"Geometry({self.kind!r}, {self.shape}{k})"


def band_mask(size: int, radius: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[size, size]`` 0/1 mask of the index pairs (j, l) with |j − l| ≤ radius."""
    j = torch.arange(size, device=device)
    return ((j[:, None] - j[None, :]).abs() <= radius).to(dtype)
