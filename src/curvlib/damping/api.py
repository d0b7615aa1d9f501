"""``damped_inverse``: a damping applied to every layer block of an approximation.

    inv = curvlib.damped_inverse(approx, "tikhonov", value=1e-3)    # or "heuristic", ...
    direction = inv @ grad                                          # [p] or [p, k]

``approx`` is duck-typed: a block-diagonal approximation exposes ``blocks`` (one block per
layer, see :mod:`curvlib.damping.base`) and ``slices`` (each layer's slice of the flat
parameter vector, in curvlib's order: the column-major vec of the layer's ``[d_g, d_a]``
gradient matrix); a single block (e.g. a :class:`~curvlib.linalg.KroneckerSum`) is one
layer covering the whole vector.

Layers an approximation does not cover (fitted with ``layers=[...]``) are zero blocks of
F̂.  Every built-in damping turns a zero block into λI (``tikhonov``: 0 + λI; ``heuristic``:
(0 + √λI)⊗(0 + √λI), π = 1), so those coordinates are multiplied by 1/λ (the damping's
``value``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel

from curvlib.damping.base import BlockInverse, Damping, block_terms, is_exact_block
from curvlib.errors import ConfigError, DTypeDeviceError, NumericalError, ShapeError

__all__ = ["BlockDiagonalInverse", "damped_inverse"]


class BlockDiagonalInverse:
    """diag(M_1⁻¹, …, M_ℓ⁻¹) over the flat parameter vector: one :class:`BlockInverse` per layer.

    Args:
        blocks: the per-layer inverses.
        slices: each layer's ``slice`` of the flat vector (length p_i = d_a·d_g), without
            overlap, inside ``[0, p)``.
        damping: the :class:`Damping` that built them (e.g. to call ``update`` on a
            Levenberg–Marquardt damping).
        p: the size of the flat vector; default: the sum of the blocks' p_i (then the
            slices must tile ``[0, p)``).  Coordinates no slice covers belong to zero
            blocks of the approximation and are multiplied by 1/λ (module docstring).
        kept_previous: indices of the layers whose previous inverse was kept (a failed
            inversion, see :meth:`Damping.invert`).

    Attributes:
        shape: ``(p, p)``.
        uncovered: how many coordinates no layer covers.
    """

    def __init__(
        self,
        blocks: Sequence[BlockInverse],
        slices: Sequence[slice],
        damping: Damping,
        *,
        p: int | None = None,
        kept_previous: Sequence[int] = (),
    ) -> None:
        caller = "BlockDiagonalInverse"
        blocks = tuple(blocks)
        slices = tuple(_as_slice(s, caller) for s in slices)
        if not blocks:
            raise ShapeError(f"{caller}: expected at least one block, got none")
        if len(blocks) != len(slices):
            raise ShapeError(f"{caller}: {len(blocks)} blocks but {len(slices)} slices")
        first = blocks[0]
        for i, (b, s) in enumerate(zip(blocks, slices)):
            if b.dtype != first.dtype or b.device != first.device:
                raise DTypeDeviceError(
                    f"{caller}: block {i} is {b.dtype} on {b.device}, block 0 is {first.dtype} on {first.device}"
                )
            if s.stop - s.start != b.shape[0]:
                raise ShapeError(
                    f"{caller}: slice {i} [{s.start}:{s.stop}] has length {s.stop - s.start}, its block has "
                    f"p_i = {b.shape[0]}"
                )
        covered = sum(b.shape[0] for b in blocks)
        p = covered if p is None else int(p)
        pos = 0
        for start, stop in sorted((s.start, s.stop) for s in slices):
            if start < pos or stop > p:
                raise ShapeError(
                    f"{caller}: the slices must lie in [0, {p}) without overlaps; got "
                    f"{[(s.start, s.stop) for s in slices]}"
                )
            pos = stop
        self.blocks = blocks
        self.slices = slices
        self.damping = damping
        self.kept_previous = tuple(int(i) for i in kept_previous)
        self._p = p
        self.uncovered = p - covered
        self._uncovered_scale: float | None = None
        if self.uncovered:
            lam = getattr(damping, "value", None)
            if lam is None:
                raise ConfigError(
                    f"{caller}: {self.uncovered} of {p} coordinates belong to no layer (zero blocks, scaled by 1/λ), "
                    f"but the damping {damping!r} has no value λ"
                )
            self._uncovered_scale = 1.0 / float(lam)

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
    def infos(self) -> tuple[Any, ...]:
        """Each block's :class:`~curvlib.damping.base.InverseInfo`."""
        return tuple(b.info for b in self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return (
            f"BlockDiagonalInverse(layers={len(self.blocks)}, p={self._p}, damping={self.damping!r}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The preconditioned direction diag(M_i⁻¹) v.

        Args:
            v: ``[p]`` or ``[p, k]`` in curvlib's flat order.

        Returns:
            ``[p]`` or ``[p, k]``.
        """
        caller = "BlockDiagonalInverse.matvec"
        if not isinstance(v, torch.Tensor):
            raise ShapeError(f"{caller}: expected a torch.Tensor, got {type(v).__name__}")
        if v.ndim not in (1, 2) or v.shape[0] != self._p:
            raise ShapeError(f"{caller}: expected v [{self._p}] or [{self._p}, k], got {list(v.shape)}")
        if v.dtype != self.dtype or v.device != self.device:
            raise DTypeDeviceError(
                f"{caller}: the inverse is {self.dtype} on {self.device}, v is {v.dtype} on {v.device}"
            )
        # rows of no layer: zero blocks of F̂, damped to λI
        out = v * self._uncovered_scale if self._uncovered_scale is not None else torch.empty_like(v)
        for block, s in zip(self.blocks, self.slices):
            out[s] = block.matvec(v[s], check_finite=False)
        # one host sync for the whole direction (DESIGN §8), not one per layer
        if not bool(torch.isfinite(out).all()):
            bad = [i for i, s in enumerate(self.slices) if not bool(torch.isfinite(out[s]).all())]
            why = "the right-hand side already has non-finite entries" if not bool(torch.isfinite(v).all()) else (
                "the inverse produced them from a finite right-hand side")
            raise NumericalError(f"{caller}: the direction has non-finite entries in layer block(s) {bad}: {why}")
        return out

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor):
            return self.matvec(v)
        return NotImplemented

    def to_dense(self) -> torch.Tensor:
        """The dense ``[p, p]`` block-diagonal inverse (tests and small models only)."""
        out = torch.zeros(self._p, self._p, dtype=self.dtype, device=self.device)
        if self._uncovered_scale is not None:
            out.diagonal().fill_(self._uncovered_scale)
        for block, s in zip(self.blocks, self.slices):
            out[s, s] = block.to_dense()
        return out


def _as_slice(s: Any, caller: str) -> slice:
    if isinstance(s, slice):
        if s.step not in (None, 1) or s.start is None or s.stop is None:
            raise ShapeError(f"{caller}: layer slices must be contiguous slice(start, stop), got {s!r}")
        return slice(int(s.start), int(s.stop))
    if isinstance(s, Sequence) and len(s) == 2:
        return slice(int(s[0]), int(s[1]))
    raise ShapeError(f"{caller}: expected a slice(start, stop) per layer, got {s!r}")


def _is_block(obj: Any) -> bool:
    return block_terms(obj) is not None or is_exact_block(obj)


def damped_inverse(
    approx: Any,
    kind: str | Mapping[str, Any] | BaseModel | Damping,
    *,
    previous: BlockDiagonalInverse | None = None,
    registry: Any = None,
    **options: Any,
) -> BlockDiagonalInverse:
    """Damp and invert every layer block of ``approx``.

    Args:
        approx: a block-diagonal approximation (``blocks``, ``slices``, ``shape`` ``(p, p)``)
            or a single block (``terms`` or ``tikhonov_solve``: one layer covering the whole
            vector).  Uncovered coordinates are scaled by 1/λ (module docstring).
        kind: a damping kind (``"tikhonov"``, ``"heuristic"``, ``"levenberg_marquardt"``,
            or a plugin's), a config ``{"kind": ..., **options}``, or a :class:`Damping`
            object to reuse (its state, e.g. an adapted λ, carries over).
        previous: the inverse from the previous refresh; a layer whose inversion fails
            numerically keeps its previous block (:attr:`BlockDiagonalInverse.kept_previous`).
        registry: the plugin :class:`~curvlib.plugins.Registry` to look ``kind`` up in;
            default :func:`curvlib.plugins.load_registry`.
        **options: the kind's options (e.g. ``value=1e-3``), validated by its model.

    Returns:
        :class:`BlockDiagonalInverse`; ``inv @ grad`` is the preconditioned direction.

    Raises:
        ConfigError: unknown kind or invalid options (options given with a Damping object).
        ShapeError: ``approx`` has no blocks/slices, or ``previous`` has another layer count.
    """
    caller = "damped_inverse"
    if isinstance(kind, Damping):
        if options:
            raise ConfigError(
                f"{caller}: options {sorted(options)} were given with a Damping object; its options are fixed "
                "at construction"
            )
        damping = kind
    else:
        if registry is None:
            from curvlib.plugins import load_registry

            registry = load_registry()
        damping = registry.dampings.create(kind, **options)
        if not isinstance(damping, Damping):
            raise ConfigError(
                f"{caller}: damping kind {kind!r} built a {type(damping).__name__}, expected a curvlib Damping"
            )

    p: int | None
    if _is_block(approx):
        blocks_in = [approx]
        p = int(approx.a_dim) * int(approx.b_dim)
        slices: Sequence[Any] = [slice(0, p)]
    else:
        shape = getattr(approx, "shape", None)
        p = int(shape[0]) if shape is not None else None
        # a per-layer fit object carrying its block as ``.block`` is unwrapped
        blocks_in = [b if _is_block(b) else getattr(b, "block", b) for b in (getattr(approx, "blocks", None) or [])]
        slices = list(getattr(approx, "slices", None) or [])
        if not blocks_in or len(blocks_in) != len(slices):
            raise ShapeError(
                f"{caller}: expected a block-diagonal approximation with matching .blocks and .slices or a single "
                f"block; got {type(approx).__name__} with {len(blocks_in)} blocks and {len(slices)} slices"
            )

    prev_blocks: Sequence[BlockInverse | None]
    if previous is None:
        prev_blocks = [None] * len(blocks_in)
    else:
        if not isinstance(previous, BlockDiagonalInverse):
            raise ConfigError(f"{caller}: previous must be a BlockDiagonalInverse, got {type(previous).__name__}")
        if len(previous.blocks) != len(blocks_in):
            raise ShapeError(f"{caller}: previous has {len(previous.blocks)} layers, approx has {len(blocks_in)}")
        prev_blocks = previous.blocks

    inverses = []
    kept = []
    for i, (block, prev) in enumerate(zip(blocks_in, prev_blocks)):
        inv = damping.invert(block, previous=prev)
        if prev is not None and inv is prev:
            kept.append(i)
        inverses.append(inv)
    return BlockDiagonalInverse(inverses, slices, damping, p=p, kept_previous=kept)
