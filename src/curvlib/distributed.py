"""Data-parallel curvlib under ``torch.distributed``: one global batch in shards (DESIGN.md §9).

Each process (rank) holds a shard of every global batch: ``m_r`` of its ``M = Σ_r m_r``
samples.  Every quantity curvlib fits is an average over samples, so the global value is

    X = Σ_r (m_r / M) · X_r            (X_r: the average over rank r's own samples)

— for KFAC's factors A and G, for every matrix-free product Z(F)·V of the power and Lanczos
iterations of the SVD methods, for every curvature product F·V of a coarse correction (and
hence the coarse matrix R₀F•R₀ᵀ), for the loss, the gradient and the quadratic model of the
Levenberg–Marquardt damping.  :meth:`Shard.average` computes it with one ``all_reduce``
(SUM) of the weighted local values on one flat buffer: the statistics are reduced, never
the per-sample data.  A summed all-reduce gives every rank the same bits (gloo and NCCL
reduce each chunk once and distribute it), so the fits that follow are identical on every
rank and no further check is needed.

Inversions are spread over the ranks (:func:`owners`: each layer's inversion has one owner,
the layers assigned longest-first to the least loaded rank by the cost d_a³ + d_g³ of
inverting its two factors).  ``PreconditionerConfig.distributed_inversion`` chooses what
happens next — KAISA's trade-off (Pauloski et al., SC'21) between memory and communication:

``"broadcast"`` (default)
    the owner sends its layers' inverses (:meth:`Shard.broadcast_object`) at each inversion;
    every rank holds every inverse and applies it locally (:meth:`~curvlib.damping.BlockInverse.
    for_transfer`: a kind may leave out what the receivers rebuild).  Communication: the
    inverses' bytes once per T2 steps (d_a² + d_g² numbers per layer for a π-split inverse);
    per step none.  Memory: every inverse on every rank.
``"direction"``
    only the owner holds a layer's inverse; at each step it computes that layer's direction
    and one ``all_reduce`` of the directions (zero where a rank owns nothing — an exact sum)
    gives every rank the whole direction.  Communication: p numbers per step (as much as
    DDP's gradient all-reduce); per inversion only the layers' reports.  Memory: each rank
    1/world of the inverses.  Not with a coarse space (its correction applies the first
    level to vectors of every layer).
``"replicated"``
    every rank inverts every layer (no communication, world × the inversion work).

Monte Carlo targets (``fisher``): rank r draws from its own stream, reseeded at each refresh
k from (seed, r, k) (:meth:`Shard.stream_seed`, the seed broadcast from rank 0 once), so a
checkpoint saved on rank 0 restores every rank's stream.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from curvlib.errors import ConfigError, DistributedError
from curvlib.linalg.operator import LinearOperator
from curvlib.linalg.zproducts import ZOperator

__all__ = [
    "INVERSION_MODES",
    "Communication",
    "Shard",
    "ShardedCurvature",
    "ShardedZOperator",
    "owners",
    "resolve_process_group",
    "spawn",
]

INVERSION_MODES: tuple[str, ...] = ("broadcast", "direction", "replicated")


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def resolve_process_group(model: nn.Module, process_group: Any = "auto") -> Any:
    """The process group a preconditioner of ``model`` works in, or ``None`` (one process).

    ``process_group``:

    - ``"auto"`` (default): the group of a ``DistributedDataParallel`` model; else the default
      group when one is initialised with more than one rank; else ``None``;
    - a ``torch.distributed.ProcessGroup``: that group;
    - ``None``: one process, whatever is initialised (refused for a DDP model: its replicas
      would drift apart).

    A group of one rank is ``None``.

    Raises:
        DistributedError: a DDP model without an initialised process group.
        ConfigError: ``process_group`` is none of the above, or ``None`` with a DDP model.
    """
    ddp = _is_ddp(model)
    if ddp and not (dist.is_available() and dist.is_initialized()):
        raise DistributedError(
            "the model is wrapped in DistributedDataParallel but no torch.distributed process group is initialised "
            "(was destroy_process_group() called?); initialise it with torch.distributed.init_process_group(...)"
        )
    if process_group is None:
        if ddp:
            raise ConfigError("process_group=None with a DistributedDataParallel model: every rank would fit its own "
                              "curvature and the replicas would drift apart; leave process_group='auto'")
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ConfigError(f"process_group: expected 'auto', None or a torch.distributed ProcessGroup, got "
                              f"{process_group!r}")
        if ddp:
            group = model.process_group
        elif dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        else:
            return None
    elif dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        if not dist.is_initialized():
            raise DistributedError("process_group was given but torch.distributed is not initialised")
        group = process_group
    else:
        raise ConfigError(f"process_group: expected 'auto', None or a torch.distributed ProcessGroup, got "
                          f"{type(process_group).__name__}")
    return group if dist.get_world_size(group) > 1 else None


def owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that inverts each layer: longest first, each to the least loaded rank (ties:
    the lower layer index first, the lower rank) — deterministic, so every rank computes the same."""
    load = [0.0] * world_size
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


@dataclass
class Communication:
    """Bytes this rank sent into collectives, by purpose (host counters; reset with :meth:`reset`).

    Attributes:
        statistics: all-reduces of fitted statistics (factors, Z-products, curvature products).
        inverses: broadcasts of inverses and inversion reports.
        directions: all-reduces of preconditioned directions (``"direction"`` mode) and gradients.
        control: agreement checks (fingerprints, batch sizes, flags).
        calls: collectives issued.
    """

    statistics: int = 0
    inverses: int = 0
    directions: int = 0
    control: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.statistics + self.inverses + self.directions + self.control

    def reset(self) -> None:
        self.statistics = self.inverses = self.directions = self.control = self.calls = 0

    def as_dict(self) -> dict[str, int]:
        return {"statistics": self.statistics, "inverses": self.inverses, "directions": self.directions,
                "control": self.control, "total": self.total, "calls": self.calls}


def _fingerprint_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


@dataclass(eq=False)
class Shard:
    """This process's share of a global batch in ``group`` (module docstring).

    Args:
        group: the process group (more than one rank).
        device: where control tensors live (the model's device: NCCL needs CUDA tensors).
        inversion: one of :data:`INVERSION_MODES`.

    Attributes:
        rank, world_size: in ``group``.
        weight: m_r / M of the current refresh (set by :meth:`agree`).
        global_samples: M of the current refresh.
        comm: the :class:`Communication` counters.
    """

    group: Any
    device: torch.device
    inversion: str = "broadcast"
    weight: float = 1.0
    global_samples: int = 0
    comm: Communication = field(default_factory=Communication)

    def __post_init__(self) -> None:
        if self.inversion not in INVERSION_MODES:
            raise ConfigError(f"distributed_inversion: expected one of {list(INVERSION_MODES)}, got {self.inversion!r}")
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self._global_ranks = list(dist.get_process_group_ranks(self.group))

    def __repr__(self) -> str:
        return f"Shard(rank={self.rank}, world_size={self.world_size}, inversion={self.inversion!r})"

    # -- collectives -----------------------------------------------------------------------
    def _all_reduce(self, buf: torch.Tensor, purpose: str) -> None:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        setattr(self.comm, purpose, getattr(self.comm, purpose) + buf.numel() * buf.element_size())
        self.comm.calls += 1

    def _reduce(self, tensors: Sequence[torch.Tensor], weight: float, purpose: str) -> list[torch.Tensor]:
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1) for t in tensors])
        if weight != 1.0:
            flat.mul_(weight)
        self._all_reduce(flat, purpose)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start:start + t.numel()].view(t.shape))
            start += t.numel()
        return out

    def average(self, tensors: Sequence[torch.Tensor], purpose: str = "statistics") -> list[torch.Tensor]:
        """Σ_r (m_r/M)·X_r of local per-sample averages X_r (one all-reduce for all of them)."""
        return self._reduce(tensors, self.weight, purpose)

    def sum(self, tensors: Sequence[torch.Tensor], purpose: str = "directions") -> list[torch.Tensor]:
        """Σ_r X_r (one all-reduce)."""
        return self._reduce(tensors, 1.0, purpose)

    def agree(self, fingerprint: str, samples: int, flag: bool = False) -> bool:
        """Check that every rank has the same ``fingerprint`` (layer layout, configuration), set
        :attr:`weight` and :attr:`global_samples` from the ranks' ``samples``, and return whether
        any rank raised ``flag`` — one all-gather of three integers.

        Raises:
            DistributedError: the fingerprints differ (the message names what differs, and the ranks).
        """
        mine = torch.tensor([_fingerprint_hash(fingerprint), int(samples), int(bool(flag))], dtype=torch.int64,
                            device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        self.comm.control += mine.numel() * 8
        self.comm.calls += 1
        rows = torch.stack(parts).cpu().tolist()
        if any(r[0] != rows[0][0] for r in rows):
            texts = [None] * self.world_size
            dist.all_gather_object(texts, fingerprint, group=self.group)
            raise DistributedError(_fingerprint_difference(texts))
        total = sum(r[1] for r in rows)
        if total <= 0:
            raise DistributedError("the ranks' batches hold no samples together")
        self.global_samples = total
        self.weight = int(samples) / total
        return any(r[2] for r in rows)

    def broadcast_object(self, obj: Any, src: int, purpose: str = "inverses", map_location: Any = None) -> Any:
        """``obj`` of rank ``src`` (a rank of the group) on every rank, serialised by ``torch.save``
        (tensors keep their dtype, strides and values; ``map_location`` places them).  Rank ``src``
        gets the deserialised copy too, so every rank computes with the same tensors."""
        size = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.rank == src:
            stream = io.BytesIO()
            torch.save(obj, stream)
            payload = torch.frombuffer(bytearray(stream.getvalue()), dtype=torch.uint8).to(self.device)
            size[0] = payload.numel()
        dist.broadcast(size, src=self._global_ranks[src], group=self.group)
        n = int(size.item())
        if self.rank != src:
            payload = torch.empty(n, dtype=torch.uint8, device=self.device)
        dist.broadcast(payload, src=self._global_ranks[src], group=self.group)
        if self.rank == src:
            setattr(self.comm, purpose, getattr(self.comm, purpose) + n + 8)
        self.comm.calls += 2
        return torch.load(io.BytesIO(payload.cpu().numpy().tobytes()), map_location=map_location or self.device,
                          weights_only=False)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (a list indexed by rank), on every rank (a checkpoint path)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        self.comm.calls += 1
        return out

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's ``seed`` on every rank."""
        t = torch.tensor([int(seed) % (2**63 - 1)], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=self._global_ranks[0], group=self.group)
        self.comm.control += 8
        self.comm.calls += 1
        return int(t.item())

    def stream_seed(self, seed: int, refresh: int) -> int:
        """The seed of this rank's Monte Carlo stream at its ``refresh``-th refresh (module docstring)."""
        digest = hashlib.blake2b(f"{int(seed)}/{self.rank}/{int(refresh)}".encode(), digest_size=7).digest()
        return int.from_bytes(digest, "little")


def _fingerprint_difference(texts: Sequence[str]) -> str:
    """Which line of the ranks' fingerprints differs from rank 0's, per rank."""
    base = texts[0].splitlines()
    lines = []
    for r, text in enumerate(texts[1:], start=1):
        mine = text.splitlines()
        for k in range(max(len(base), len(mine))):
            a = base[k] if k < len(base) else "(nothing)"
            b = mine[k] if k < len(mine) else "(nothing)"
            if a != b:
                lines.append(f"rank {r} has {b!r} where rank 0 has {a!r}")
                break
    return ("the ranks of the process group disagree (every rank must precondition the same model with the same "
            "configuration): " + "; ".join(lines))


class ShardedZOperator(ZOperator):
    """Z(F) of the global batch from a shard's Z(F_r): every product is :meth:`Shard.average`-d.

    It has no Gram form (the Gram space is spanned by the samples of every rank), so the SVD
    methods iterate on the direct products."""

    def __init__(self, op: ZOperator, shard: Shard) -> None:
        super().__init__(op.a_dim, op.b_dim, dtype=op.dtype, device=op.device)
        self.op = op
        self.shard = shard

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.shard.average([self.op._matmat(V)])[0]

    def _rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        return self.shard.average([self.op._rmatmat(U)])[0]


class ShardedCurvature(LinearOperator):
    """The curvature of the global batch from a shard's curvature operator F_r: its products
    are :meth:`Shard.average`-d (one all-reduce each).  It exposes the layers and the products,
    not the per-sample statistics (those of one rank are not the global batch's): a coarse
    space that reads statistics (``spectral``'s factors, ``coarse_mode="previous"``) is refused."""

    def __init__(self, F: Any, shard: Shard) -> None:
        self.F = F
        self.shard = shard

    @property
    def shape(self) -> tuple[int, int]:
        return self.F.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.F.dtype

    @property
    def device(self) -> torch.device:
        return self.F.device

    @property
    def layout(self) -> Any:
        return self.F.layout

    @property
    def layers(self) -> Any:
        return self.F.layers

    @property
    def symmetric(self) -> bool:  # type: ignore[override]
        return True

    def params(self) -> list[torch.Tensor]:
        return self.F.params()

    def statistics(self, i: int) -> Any:
        from curvlib.curvatures.operator import NoStatisticsError

        raise NoStatisticsError(
            "under torch.distributed each rank holds the statistics of its own shard only; this coarse space or "
            "mode reads per-layer statistics (use nicolaides, residual, krylov or taylor, in the multiplicative or "
            "additive mode)")

    def _matmat(self, X: torch.Tensor) -> torch.Tensor:
        return self.shard.average([self.F.matmat(X)])[0]

    def _rmatmat(self, Y: torch.Tensor) -> torch.Tensor:
        return self._matmat(Y)

    def __repr__(self) -> str:
        return f"ShardedCurvature({self.F!r}, {self.shard!r})"


# --------------------------------------------------------------------------- local processes
def _entry(rank: int, world_size: int, fn: Callable[..., Any], args: tuple, tmp: str, backend: str,
           threads: int) -> None:
    torch.set_num_threads(threads)
    out = Path(tmp) / f"result{rank}.pt"
    try:
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
            if dist.is_initialized():
                dist.barrier()  # every rank done before the group goes away (gloo's teardown races otherwise)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        torch.save({"ok": result}, out)
    except BaseException as exc:  # reported by the parent with the rank's traceback
        torch.save({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, out)
        raise


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo", threads: int = 1) -> list[Any]:
    """``[fn(0, world_size, *args), …, fn(world_size − 1, world_size, *args)]``, each run in its own
    local process (``torch.multiprocessing``, ``threads`` threads each) inside an initialised
    process group (a file rendezvous in a temporary directory); ``fn`` must be importable (a
    module-level function) and its result ``torch.save``-able.  For one machine and tests; on
    a cluster launch with ``torchrun`` instead.

    Raises:
        RuntimeError: a rank raised (the message holds its error and traceback).
    """
    with tempfile.TemporaryDirectory(prefix="curvlib-dist-") as tmp:
        try:
            mp.spawn(_entry, args=(world_size, fn, args, tmp, backend, threads), nprocs=world_size, join=True)
        except mp.ProcessRaisedException:
            pass  # the rank's own report is read below
        except mp.ProcessExitedException:
            pass
        results = []
        for r in range(world_size):
            path = Path(tmp) / f"result{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} exited without a result")
            got = torch.load(path, weights_only=False)
            if "error" in got:
                raise RuntimeError(f"rank {r} raised {got['error']}\n{got['traceback']}")
            results.append(got["ok"])
        return results
