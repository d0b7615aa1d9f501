"""Run curvlib under ``torch.distributed`` in local CPU processes (gloo): the launcher of the
multi-process tests and of ``curvlib bench --nproc``, and the replica check of docs/distributed.md.

:func:`spawn` starts ``world_size`` processes with ``torch.multiprocessing`` (one thread each,
a file rendezvous in a temporary directory), runs ``fn(rank, world_size, *args)`` in each
inside an initialised gloo group, and returns each rank's result (a ``torch.save``-able value)
— or raises the first rank's error with its traceback.

:func:`replica_run` trains a small model on a fixed stream of global batches, rank r taking
its shard of each, and returns the final parameters, the parameters after a resume from a
checkpoint saved on rank 0, and the communication counters; the test compares them across
ranks and with one process on the concatenated batches.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

__all__ = ["make_model", "replica_run", "shard_slices", "spawn", "train_steps"]


def _entry(rank: int, world_size: int, fn: Callable[..., Any], args: tuple, tmp: str, backend: str) -> None:
    torch.set_num_threads(1)
    out = Path(tmp) / f"result{rank}.pt"
    try:
        dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": result}, out)
    except BaseException as exc:  # reported by the parent with the rank's traceback
        torch.save({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}, out)
        raise


def spawn(fn: Callable[..., Any], world_size: int, *args: Any, backend: str = "gloo") -> list[Any]:
    """``[fn(0, world_size, *args), …, fn(world_size − 1, world_size, *args)]``, each run in its own
    process inside an initialised process group (``fn`` must be importable: a module-level function).

    Raises:
        RuntimeError: a rank raised (the message holds its error and traceback).
    """
    with tempfile.TemporaryDirectory(prefix="curvlib-dist-") as tmp:
        try:
            mp.spawn(_entry, args=(world_size, fn, args, tmp, backend), nprocs=world_size, join=True)
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


# --------------------------------------------------------------------------- the replica check
def make_model(kind: str, seed: int = 0) -> nn.Module:
    """A small float64 model: ``"mlp"`` (8-16-4, tanh) or ``"cnn"`` (Conv2d 1→3, 3×3, on 6×6 → Linear 4)."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    else:
        raise ValueError(f"unknown model {kind!r}")
    return model.double()


def global_batches(kind: str, steps: int, m: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` global batches of ``m`` samples for :func:`make_model`'s ``kind`` (classification, 4 classes)."""
    g = torch.Generator().manual_seed(seed)
    shape = (m, 8) if kind == "mlp" else (m, 1, 6, 6)
    return [(torch.randn(*shape, generator=g, dtype=torch.float64), torch.randint(0, 4, (m,), generator=g))
            for _ in range(steps)]


def shard_slices(m: int, world_size: int, sizes: Sequence[int] | None = None) -> list[slice]:
    """Each rank's samples of a global batch of ``m``: ``sizes`` given, or as equal as possible."""
    if sizes is None:
        sizes = [m // world_size + (r < m % world_size) for r in range(world_size)]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    if bounds[-1] != m:
        raise ValueError(f"shard sizes {list(sizes)} do not add up to {m}")
    return [slice(bounds[r], bounds[r + 1]) for r in range(world_size)]


def train_steps(opt: Any, model: nn.Module, loss_fn: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                capture: bool = False) -> list[float]:
    """One optimizer step per batch (the documented loop; ``capture``: statistics from the own pass)."""
    losses = []
    for X, y in batches:
        opt.zero_grad()
        if capture:
            with opt.capture((X, y)):
                loss = loss_fn(model(X), y)
            loss.backward()
            opt.step()
        else:
            loss = loss_fn(model(X), y)
            loss.backward()
            opt.step(batch=(X, y))
        losses.append(loss.item())
    return losses


def _optimizer(model: nn.Module, case: Mapping[str, Any], **kwargs: Any) -> Any:
    from curvlib.optim import NaturalGradient

    return NaturalGradient(model, nn.CrossEntropyLoss(), case["config"], lr=case.get("lr", 0.1),
                           momentum=case.get("momentum", 0.5), kl_clip=case.get("kl_clip"),
                           generator=torch.Generator().manual_seed(5), **kwargs)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def replica_run(rank: int, world_size: int, cases: Sequence[Mapping[str, Any]], tmp: str) -> list[dict[str, Any]]:
    """For each case (``model``, ``config``, ``steps``, ``m``, optional ``sizes``, ``resume_at``,
    ``ddp``, ``capture``): train with DDP on this rank's shards, save a checkpoint on rank 0 at
    ``resume_at`` (the optimizer's ``state_dict`` called on every rank, as documented), resume
    from it in a fresh model and optimizer on every rank, and — on rank 0 — train one process
    on the whole batches (``process_group=None``) from the same start."""
    out = []
    loss_fn = nn.CrossEntropyLoss()
    for c, case in enumerate(cases):
        steps, m = case.get("steps", 10), case.get("m", 16)
        batches = global_batches(case["model"], steps, m)
        sl = shard_slices(m, world_size, case.get("sizes"))[rank]
        mine = [(X[sl], y[sl]) for X, y in batches]
        model = make_model(case["model"])
        wrapped = nn.parallel.DistributedDataParallel(model) if case.get("ddp", True) else model
        opt = _optimizer(wrapped, case)
        k = case.get("resume_at", steps // 2)
        losses = train_steps(opt, wrapped, loss_fn, mine[:k], case.get("capture", False))
        state = {"model": model.state_dict(), "opt": opt.state_dict()}  # every rank (a collective with a coarse space)
        ckpt = Path(tmp) / f"case{c}.pt"
        if rank == 0:
            torch.save(state, ckpt)
        dist.barrier()
        losses += train_steps(opt, wrapped, loss_fn, mine[k:], case.get("capture", False))
        comm = opt.preconditioner.shard.comm.as_dict() if opt.preconditioner.shard is not None else None
        final = _params(model)
        # resume from rank 0's checkpoint on every rank
        saved = torch.load(ckpt, weights_only=True)
        model2 = make_model(case["model"], seed=99)
        model2.load_state_dict(saved["model"])
        wrapped2 = nn.parallel.DistributedDataParallel(model2) if case.get("ddp", True) else model2
        opt2 = _optimizer(wrapped2, case)
        opt2.load_state_dict(saved["opt"])
        train_steps(opt2, wrapped2, loss_fn, mine[k:], case.get("capture", False))
        result = {"final": final, "resumed": _params(model2), "losses": losses, "comm": comm}
        if rank == 0 and case.get("reference", True):
            ref = make_model(case["model"])
            ropt = _optimizer(ref, case, process_group=None)
            result["reference_losses"] = train_steps(ropt, ref, loss_fn, batches, case.get("capture", False))
            result["reference"] = _params(ref)
        dist.barrier()
        out.append(result)
        if rank == 0:
            os.remove(ckpt)
    return out
