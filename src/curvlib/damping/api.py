"""``damped_inverse``: a damping applied to every layer block of an approximation.

    inv = curvlib.damped_inverse(approx, "tikhonov", value=1e-3)    # or "heuristic", ...
    direction = inv @ grad                                          # [p] or [p, k]

``approx`` is a :class:`~curvlib.linalg.BlockDiagonalOperator` (e.g. the result of
``curvlib.approximate``: one block per layer, see :mod:`curvlib.damping.base`, and each
layer's slice of the flat parameter vector, in curvlib's order: the column-major vec of the
layer's ``[d_g, d_a]`` gradient matrix), or a single block (a
:class:`~curvlib.linalg.KroneckerFactored` one such as a :class:`~curvlib.linalg.KroneckerSum`,
or a :class:`~curvlib.linalg.ShiftSolvable` one) covering the whole vector.

Layers an approximation does not cover (fitted with ``layers=[...]``) are zero blocks of
F̂.  Every built-in damping turns a zero block into λI (``tikhonov``: 0 + λI; ``heuristic``:
(0 + √λI)⊗(0 + √λI), π = 1), so those coordinates are multiplied by 1/λ (the damping's
``value``).

:func:`damped_inverse` is where curvlib receives every damping's inverses.  For an
approximation made by :func:`curvlib.approximate` it first runs the check deferred to the
inversion (a single-term block must be positive semi-definite,
:meth:`~curvlib.plugins.hookspecs.CheckedApproximation.check_before_inversion`); then each
inverse must be a :class:`~curvlib.damping.BlockInverse` of its block's size, dtype and
device, with the capabilities its kind declares and finite exposed factors
(:func:`~curvlib.damping.base.inverse_structure_problem`,
:func:`~curvlib.damping.base.inverse_value_flag`: one host synchronisation for all layers).
A failure raises :class:`~curvlib.errors.PluginOutputError` naming the damping kind, its
distribution and the layer; a non-finite product raises :class:`~curvlib.errors.NumericalError`
naming them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel

from curvlib.damping.base import (
    BlockInverse,
    Damping,
    block_capabilities,
    inverse_structure_problem,
    inverse_value_flag,
    inverse_value_problem,
)
from curvlib.errors import ConfigError, NumericalError, ShapeError
from curvlib.linalg import (
    BlockDiagonalOperator,
    InverseFactored,
    KroneckerFactored,
    LayerBlockOperator,
    ShiftSolvable,
    VectorLayout,
    host_values,
)
from curvlib.plugins import load_registry
from curvlib.plugins.hookspecs import CheckedApproximation, KindOrigin

__all__ = ["BlockDiagonalInverse", "RemoteInverse", "damped_inverse"]


class BlockDiagonalInverse(BlockDiagonalOperator):
    """diag(M_1⁻¹, …, M_ℓ⁻¹) over the flat parameter vector: one :class:`BlockInverse` per layer.

    A :class:`~curvlib.linalg.BlockDiagonalOperator` (``@`` on ``[p]``, ``[p, k]`` or a list
    when a layout is known; the operator algebra).

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
        layout: the list form of the flat vector (the approximation's).
        names: the layer of each block (named in messages); default ``"block <i>"``.
        block_dampings: the damping that built each block, when they differ (a preconditioner
            composed by rules); default: ``damping`` for every block.

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
        layout: VectorLayout | None = None,
        names: Sequence[str] | None = None,
        block_dampings: Sequence[Damping] | None = None,
    ) -> None:
        # rows of no layer: zero blocks of F̂, damped to λI, so multiplied by 1/λ
        super().__init__(blocks, slices, p=p, uncovered_scale=1.0 / damping.value, layout=layout)
        self.damping = damping
        self.kept_previous = tuple(int(i) for i in kept_previous)
        if names is not None and len(names) != len(self.blocks):
            raise ShapeError(f"BlockDiagonalInverse: {len(names)} names for {len(self.blocks)} blocks")
        self.names: tuple[str, ...] = tuple(names) if names is not None else tuple(
            f"block {i}" for i in range(len(self.blocks)))
        if block_dampings is not None and len(block_dampings) != len(self.blocks):
            raise ShapeError(f"BlockDiagonalInverse: {len(block_dampings)} dampings for {len(self.blocks)} blocks")
        self.block_dampings: tuple[Damping, ...] = (tuple(block_dampings) if block_dampings is not None
                                                    else (damping,) * len(self.blocks))

    @property
    def infos(self) -> tuple[Any, ...]:
        """Each block's :class:`~curvlib.damping.base.InverseInfo`."""
        return tuple(b.info for b in self.blocks)

    def __repr__(self) -> str:
        return (
            f"BlockDiagonalInverse(layers={len(self.blocks)}, p={self.p}, damping={self.damping!r}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    def _check_result(self, Y: torch.Tensor, X: torch.Tensor, caller: str) -> None:
        # one host sync for the whole direction (DESIGN §8), not one per layer
        if not bool(torch.isfinite(Y).all()):
            bad = [i for i, s in enumerate(self.slices) if not bool(torch.isfinite(Y[s]).all())]
            if not bool(torch.isfinite(X).all()):
                why = "the right-hand side already has non-finite entries"
            else:
                origins = list(dict.fromkeys(str(d.origin or KindOrigin("dampings", d.kind))
                                             for d in (self.block_dampings[i] for i in bad)))
                why = (f"the inverse produced them from a finite right-hand side (layers "
                       f"{[self.names[i] for i in bad]}, inverted by the {' and the '.join(origins)})")
            raise NumericalError(f"{caller}: the direction has non-finite entries in layer block(s) {bad}: {why}")


def damped_inverse(
    approx: Any,
    kind: str | Mapping[str, Any] | BaseModel | Damping,
    *,
    previous: BlockDiagonalInverse | None = None,
    registry: Any = None,
    shard: Any = None,
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
        shard: under ``torch.distributed`` the :class:`~curvlib.distributed.Shard`: the layers
            are inverted by their owner ranks and exchanged per its ``inversion`` mode
            (:mod:`curvlib.distributed`; every rank must call with the same ``approx``).
        **options: the kind's options (e.g. ``value=1e-3``), validated by its model.

    Returns:
        :class:`BlockDiagonalInverse`; ``inv @ grad`` is the preconditioned direction (in the
        ``"direction"`` mode only the owned layers' part of it: the caller all-reduces).

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
            registry = load_registry()
        spec, opts = registry.dampings.resolve(kind, **options)
        damping = spec.factory(opts)
        if not isinstance(damping, Damping):
            raise KindOrigin.of(spec).error(
                None, f"{caller}: the factory built a {type(damping).__name__}; expected a curvlib.damping.Damping"
            )
        damping.origin = KindOrigin.of(spec)

    layout: VectorLayout | None = None
    if isinstance(approx, (KroneckerFactored, ShiftSolvable, InverseFactored)):
        blocks_in: Sequence[LayerBlockOperator] = [approx]
        p = approx.shape[0]
        slices: Sequence[slice] = [slice(0, p)]
    elif isinstance(approx, BlockDiagonalOperator):
        blocks_in, slices, p, layout = approx.blocks, approx.slices, approx.p, approx.layout
    else:
        raise ShapeError(
            f"{caller}: expected a block-diagonal approximation (a BlockDiagonalOperator such as the result of "
            f"curvlib.approximate) or a single KroneckerFactored / ShiftSolvable / InverseFactored block; got {type(approx).__name__}"
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

    names: tuple[str, ...] = tuple(f"block {i}" for i in range(len(blocks_in)))
    if isinstance(approx, CheckedApproximation):
        approx.check_before_inversion()
        names = approx.layer_names
    origin = damping.origin or KindOrigin("dampings", damping.kind)

    def invert(indices: Sequence[int]) -> tuple[dict[int, BlockInverse], list[int]]:
        inverses, kept, flags = {}, [], []
        indices = list(indices)
        built = list(damping.invert_many([blocks_in[i] for i in indices], [prev_blocks[i] for i in indices]))
        if len(built) != len(indices):
            raise origin.error(None, f"invert_many returned {len(built)} inverses for {len(indices)} blocks")
        for i, inv in zip(indices, built):
            block, prev = blocks_in[i], prev_blocks[i]
            if prev is not None and inv is prev:
                kept.append(i)  # checked when it was built
            else:
                problem = inverse_structure_problem(inv, block, damping.inverse_capabilities(*block_capabilities(block)))
                if problem is not None:
                    raise origin.error(names[i], problem)
                flag = inverse_value_flag(inv)
                if flag is not None:
                    flags.append((i, flag))
            inverses[i] = inv
        if flags:  # one host synchronisation for every layer
            ok = host_values([f for _, f in flags])
            for (i, _), good in zip(flags, ok):
                problem = None if good else inverse_value_problem(inverses[i])
                if problem is not None:  # None: a false alarm of the finiteness screen
                    raise origin.error(names[i], problem)
        return inverses, kept

    if shard is None or shard.inversion == "replicated":
        by_layer, kept = invert(range(len(blocks_in)))
    else:
        by_layer, kept = _invert_in_shards(shard, blocks_in, invert)
    inverses = [by_layer[i] for i in range(len(blocks_in))]
    return BlockDiagonalInverse(inverses, slices, damping, p=p, kept_previous=sorted(kept), layout=layout, names=names)


class RemoteInverse(BlockInverse):
    """The place of a layer another rank inverts and applies (``distributed_inversion="direction"``,
    :mod:`curvlib.distributed`): its product is zero here, and the all-reduce of the directions
    adds the owner's.  It carries the owner's :class:`~curvlib.damping.base.InverseInfo` and
    condition numbers (for the inversion report)."""

    def __init__(self, *, a_dim: int, b_dim: int, dtype: torch.dtype, device: torch.device, info: Any,
                 owner: int, kappa: torch.Tensor | None) -> None:
        super().__init__(a_dim=a_dim, b_dim=b_dim, dtype=dtype, device=device, info=info)
        self.owner = int(owner)
        self._kappa = kappa

    def condition_numbers(self) -> torch.Tensor | None:
        return self._kappa

    def _solve(self, X: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(X)


def _invert_in_shards(shard: Any, blocks: Sequence[Any], invert: Any) -> tuple[dict[int, BlockInverse], list[int]]:
    """Each rank inverts the layers it owns (:func:`curvlib.distributed.owners`, by d_a³ + d_g³)
    and sends them (``"broadcast"``) or their reports (``"direction"``) to the others.  An
    error on the owner is raised on every rank (the same exception), so no rank goes on alone."""
    from curvlib.distributed import owners

    dims = [(int(b.a_dim), int(b.b_dim)) for b in blocks]
    owner = owners([a**3 + b**3 for a, b in dims], shard.world_size)
    mine = [i for i, r in enumerate(owner) if r == shard.rank]
    try:
        local, kept = invert(mine)
        payload: Any = ("ok", local, kept)
    except Exception as exc:  # sent to every rank, raised below by all
        payload, local = ("error", exc, None), {}
    direction = shard.inversion == "direction"
    by_layer: dict[int, BlockInverse] = {}
    kept_all: list[int] = []
    error = None
    for src in range(shard.world_size):
        if src not in owner:
            continue
        send = None
        if src == shard.rank:
            send = payload
            if direction and payload[0] == "ok":  # the reports only: the inverses stay here
                send = ("ok", {i: (inv.info, inv.condition_numbers()) for i, inv in local.items()}, payload[2])
            elif payload[0] == "ok":
                send = ("ok", {i: inv.for_transfer() for i, inv in local.items()}, payload[2])
        status, got, kept = shard.broadcast_object(send, src)
        if status == "error":
            error = error or got
            continue
        kept_all += kept
        for i, item in got.items():
            if not direction:
                item.after_transfer(blocks[i])
                by_layer[i] = item
            elif src == shard.rank:
                by_layer[i] = local[i]
            else:
                info, kappa = item
                b = blocks[i]
                by_layer[i] = RemoteInverse(a_dim=dims[i][0], b_dim=dims[i][1], dtype=b.dtype, device=b.device,
                                            info=info, owner=src, kappa=kappa)
    if error is not None:
        raise error
    return by_layer, kept_all
