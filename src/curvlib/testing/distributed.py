"""The workers of the multi-process tests (tests/distributed), run by
:func:`curvlib.distributed.spawn` in local CPU processes (gloo).

:func:`replica_run` trains a small model on a fixed stream of global batches, rank r taking
its shard of each, and returns the final parameters, the parameters after a resume from a
checkpoint saved on rank 0, and the communication counters; the test compares them across
ranks and with one process on the concatenated batches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from curvlib.distributed import spawn

__all__ = ["fit_run", "hostile_case", "hostile_run", "make_model", "replica_run", "shard_slices", "spawn", "train_steps"]


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
    """``steps`` global batches of ``m`` samples for :func:`make_model`'s ``kind``: 4 classes, the
    labels of a fixed random linear teacher (so that training makes progress)."""
    g = torch.Generator().manual_seed(seed)
    shape = (m, 8) if kind == "mlp" else (m, 1, 6, 6)
    teacher = torch.randn(torch.Size(shape[1:]).numel(), 4, generator=g, dtype=torch.float64)
    batches = []
    for _ in range(steps):
        X = torch.randn(*shape, generator=g, dtype=torch.float64)
        batches.append((X, (X.reshape(m, -1) @ teacher).argmax(1)))
    return batches


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
        with torch.no_grad():  # progress: the loss of all the batches, before and after
            X_all, y_all = torch.cat([X for X, _ in batches]), torch.cat([y for _, y in batches])
            before = loss_fn(make_model(case["model"])(X_all), y_all).item()
            after = loss_fn(model(X_all), y_all).item()
        result = {"final": final, "resumed": _params(model2), "losses": losses, "comm": comm,
                  "loss_before": before, "loss_after": after}
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


def fit_run(rank: int, world_size: int, sizes: Sequence[int], kinds: Sequence[Any]) -> dict[str, Any]:
    """The approximations of one global batch split in shards of ``sizes`` (any sizes: the
    factors are weighted by m_r/M), fitted by each approximator kind on this rank's shard, and —
    on rank 0 — the same fits of the whole batch in one process."""
    from curvlib.approximators import approximate
    from curvlib.curvatures.api import curvature
    from curvlib.distributed import Shard

    model, loss_fn = make_model("cnn"), nn.CrossEntropyLoss()
    (X, y), = global_batches("cnn", 1, sum(sizes))
    sl = shard_slices(len(y), world_size, sizes)[rank]
    F = curvature("ggn", model, loss_fn, (X[sl], y[sl]))
    shard = Shard(dist.group.WORLD, torch.device("cpu"))
    shard.agree("same", F.num_samples)
    out: dict[str, Any] = {"shard": {}, "whole": {}}
    for kind in kinds:
        name = kind if isinstance(kind, str) else kind["kind"]
        out["shard"][name] = [fit.terms for fit in approximate(F, kind, shard=shard).fits]
        if rank == 0:
            whole = curvature("ggn", model, loss_fn, (X, y))
            out["whole"][name] = [fit.terms for fit in approximate(whole, kind).fits]
    return out


def hostile_run(rank: int, world_size: int, whats: Sequence[str]) -> list[str | dict[str, Any]]:
    """:func:`hostile_case` for each of ``whats`` in turn (``"destroyed"`` last: it ends the group)."""
    return [hostile_case(rank, world_size, what) for what in whats]


def hostile_case(rank: int, world_size: int, what: str) -> str | dict[str, Any]:
    """Provoke one misuse under torch.distributed on every rank and return the error raised
    (``"type: message"``), or — for ``"checkpoint"`` — the optimizer state after one step."""
    from curvlib.optim import NaturalGradient

    loss_fn = nn.CrossEntropyLoss()
    (X, y), = global_batches("mlp", 1, 8)
    config: dict[str, Any] = {"curvature": "ggn", "damping": {"kind": "heuristic", "value": 1e-2}}
    model = make_model("mlp")
    try:
        if what == "config":  # the ranks' configurations differ
            config["damping"] = {"kind": "heuristic", "value": 1e-2 * (1 + rank)}
        elif what == "layers":  # the ranks' models differ (no DDP: DDP itself compares the shapes)
            model = nn.Sequential(nn.Linear(8, 16 + rank), nn.Tanh(), nn.Linear(16 + rank, 4)).double()
        elif what == "destroyed":  # a DDP model whose group was destroyed
            model = nn.parallel.DistributedDataParallel(model)
            dist.destroy_process_group()
        elif what == "exact_block":
            config.update(approximator="exact_block", damping={"kind": "tikhonov", "value": 1e-2})
        elif what == "block_natural_gradient":
            config["preconditioner"] = "block_natural_gradient"
        opt = NaturalGradient(model, loss_fn, config, lr=0.1)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step(batch=(X, y))
        return opt.state_dict() if what == "checkpoint" else "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
