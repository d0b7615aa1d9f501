"""``curvlib bench --nproc N``: the step cost of data-parallel training next to one process.

N local processes (``torch.multiprocessing``, gloo on the CPU, NCCL on GPUs) train each method
with the model wrapped in ``DistributedDataParallel``, rank r taking its shard of each global
batch of ``--batch-size`` samples.  Between two distributed steps rank 0 takes one step of
the same method alone on the whole global batch (the others wait), so the two are measured
interleaved in one run (A B A B …), with the same threads per process.  Every step is timed
from a barrier to a barrier (the slowest rank counts).

Per method the report gives the median step of each kind — plain, refresh (statistics
captured and refitted, T1), refresh+invert (T2) — for N processes and for one, their ratio,
the mean step over the run (amortized), and the bytes each rank sends per refresh
(statistics all-reduces, inverse broadcasts, agreement checks; :class:`curvlib.distributed.
Communication`) and per step (DDP's gradient all-reduce, and the directions in the
``"direction"`` inversion mode).  At the end the ranks' parameters are compared: identical
replicas are part of the result.

Written to the output folder: ``distributed.json`` (everything), ``distributed.md`` (the
table) and ``distributed.png`` (step time per method and kind, one process against N).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from curvlib.bench.methods import resolve_method
from curvlib.bench.problems import PROBLEMS
from curvlib.bench.training_step import build_training_step
from curvlib.distributed import spawn
from curvlib.errors import ConfigError
from curvlib.plugins import load_registry

__all__ = ["DistributedBenchSpec", "format_table", "run_distributed_bench"]

KINDS = ("plain", "refresh", "refresh+invert")


@dataclass(frozen=True)
class DistributedBenchSpec:
    """What ``curvlib bench --nproc`` runs (the command's options)."""

    nproc: int
    problem: str = "mnist_autoencoder"
    small: bool = False
    path: str | None = None
    methods: tuple[str, ...] = ("sgd", "kfac", "kpsvd", "kfac+residual")
    steps: int = 40
    batch_size: int = 512
    threads: int = 1
    seed: int = 0
    update_every: int | None = None
    invert_every: int | None = None
    inversion: str | None = None
    backend: str = "gloo"

    def __post_init__(self) -> None:
        if self.nproc < 2:
            raise ConfigError(f"--nproc: expected at least 2 processes, got {self.nproc}")
        if self.steps < 3:
            raise ConfigError(f"--steps: expected at least 3 steps for a distributed timing, got {self.steps}")
        if self.batch_size < self.nproc:
            raise ConfigError(f"--batch-size {self.batch_size}: every one of the {self.nproc} processes needs a sample")
        if self.problem not in PROBLEMS:
            raise ConfigError(f"--problem {self.problem!r}: unknown; known problems: {', '.join(PROBLEMS)}")


def _hyperparameters(method: Any, spec: DistributedBenchSpec) -> Any:
    if not method.is_natural_gradient:
        return method.default_hyperparameters()
    return method.default_hyperparameters(update_every=spec.update_every, invert_every=spec.invert_every,
                                          distributed_inversion=spec.inversion)


def _kind(metrics: dict[str, Any]) -> str:
    if metrics.get("inverted"):
        return "refresh+invert"
    return "refresh" if metrics.get("refreshed") else "plain"


def _comm(pre: Any) -> dict[str, int] | None:
    shard = getattr(pre, "shard", None)
    return None if shard is None else shard.comm.as_dict()


def _worker(rank: int, world_size: int, spec: DistributedBenchSpec) -> dict[str, Any] | None:
    registry = load_registry()
    problem = PROBLEMS[spec.problem](small=spec.small, seed=spec.seed, path=spec.path)
    data = problem.dataset
    n, B = data.X_train.shape[0], min(spec.batch_size, data.X_train.shape[0])
    bounds = [B * r // world_size for r in range(world_size + 1)]
    mine = slice(bounds[rank], bounds[rank + 1])
    out: dict[str, Any] = {}
    for name in spec.methods:
        method = resolve_method(name, registry)
        hp = _hyperparameters(method, spec)
        model = problem.model_fn(spec.seed)
        ddp = nn.parallel.DistributedDataParallel(model)
        step = build_training_step(method, ddp, problem.loss_fn, hp, registry=registry,
                                   generator=torch.Generator().manual_seed(spec.seed + 1))
        alone = None
        if rank == 0:
            alone = build_training_step(method, problem.model_fn(spec.seed), problem.loss_fn, hp, registry=registry,
                                        generator=torch.Generator().manual_seed(spec.seed + 1), process_group=None)
        pre = getattr(step.optimizer, "preconditioner", None)
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        rows = []
        for s in range(spec.steps):
            start = (s * B) % max(1, n - B + 1)
            X = data.X_train[start:start + B]
            y = None if data.y_train is None else data.y_train[start:start + B]
            target = problem.targets(X, y)
            before = _comm(pre)
            dist.barrier()
            t0 = time.perf_counter()
            step.step(X[mine], target[mine])
            dist.barrier()
            t_dist = time.perf_counter() - t0
            metrics = getattr(step.optimizer, "metrics", {}) or {}
            after = _comm(pre)
            sent = {k: after[k] - before[k] for k in after} if after is not None else {}
            t_alone = None
            if alone is not None:
                t0 = time.perf_counter()
                alone.step(X, target)
                t_alone = time.perf_counter() - t0
            dist.barrier()
            rows.append({"step": s, "kind": _kind(metrics) if pre is not None else "plain", "seconds": t_dist,
                         "seconds_one_process": t_alone, "bytes": sent, "ddp_gradient_bytes": grad_bytes})
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        every = [torch.empty_like(flat) for _ in range(world_size)]
        dist.all_gather(every, flat)
        out[name] = {"steps": rows, "identical_replicas": all(torch.equal(every[0], f) for f in every[1:]),
                     "config": step.preconditioner_config, "update_every": hp.update_every if pre else None,
                     "invert_every": hp.invert_every if pre else None}
        if rank == 0:
            print(f"  {name}: {spec.steps} steps on {world_size} processes and on one, interleaved", flush=True)
    return out if rank == 0 else None


def summarize(raw: dict[str, Any], spec: DistributedBenchSpec) -> dict[str, Any]:
    """Per method: median seconds per step kind (N processes, one), their ratios, the mean step
    after the first (amortized), bytes per refresh and per step, and the replica check."""
    out = {}
    for name, run in raw.items():
        rows = run["steps"][1:]  # the first step builds everything (first refresh and inversion)
        kinds: dict[str, Any] = {}
        for kind in KINDS:
            sel = [r for r in rows if r["kind"] == kind]
            if sel:
                many = statistics.median(r["seconds"] for r in sel)
                one = statistics.median(r["seconds_one_process"] for r in sel)
                kinds[kind] = {"count": len(sel), "seconds": many, "seconds_one_process": one, "ratio": many / one}
        mean_many = statistics.fmean(r["seconds"] for r in rows)
        mean_one = statistics.fmean(r["seconds_one_process"] for r in rows)
        refreshes = [r for r in run["steps"] if r["kind"] != "plain"]
        plain = [r for r in rows if r["kind"] == "plain"]

        def per(sel: list[dict], keys: Sequence[str]) -> float | None:
            return statistics.fmean(sum(r["bytes"].get(k, 0) for k in keys) for r in sel) if sel else None

        out[name] = {
            "kinds": kinds,
            "amortized": {"seconds": mean_many, "seconds_one_process": mean_one, "ratio": mean_many / mean_one},
            "bytes_per_refresh": per(refreshes, ("statistics", "inverses", "control")),
            "bytes_per_refresh_parts": {k: per(refreshes, (k,)) for k in ("statistics", "inverses", "control")},
            "curvlib_bytes_per_plain_step": per(plain, ("directions",)),
            "ddp_gradient_bytes_per_step": run["steps"][0]["ddp_gradient_bytes"],
            "identical_replicas": run["identical_replicas"],
            "update_every": run["update_every"], "invert_every": run["invert_every"],
        }
    return {"spec": asdict(spec), "torch": torch.__version__, "methods": out}


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.2f} {unit}"
    return f"{b:.0f} B"


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (times in ms; ratio = N processes / one)."""
    spec = summary["spec"]
    head = (f"{spec['nproc']} processes ({spec['backend']}, {spec['threads']} thread(s) each, inversions "
            f"{spec['inversion'] or 'broadcast'}) vs one, "
            f"{spec['problem']}{' (small)' if spec['small'] else ''}, global batch {spec['batch_size']}, "
            f"{spec['steps']} steps, torch {summary['torch']}")
    lines = [head, "", "| method | T1/T2 | plain ms (1 / N, ratio) | refresh ms (1 / N, ratio) | refresh+invert ms "
             "(1 / N, ratio) | amortized ratio | bytes per refresh | bytes per step (DDP + curvlib) | replicas |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in summary["methods"].items():
        cells = []
        for kind in KINDS:
            k = m["kinds"].get(kind)
            cells.append("-" if k is None else
                         f"{k['seconds_one_process'] * 1e3:.1f} / {k['seconds'] * 1e3:.1f} ({k['ratio']:.2f})")
        sched = "-" if m["update_every"] is None else f"{m['update_every']}/{m['invert_every']}"
        per_step = m["ddp_gradient_bytes_per_step"] + (m["curvlib_bytes_per_plain_step"] or 0)
        lines.append(f"| {name} | {sched} | {' | '.join(cells)} | {m['amortized']['ratio']:.2f} | "
                     f"{_fmt_bytes(m['bytes_per_refresh'])} | {_fmt_bytes(per_step)} | "
                     f"{'identical' if m['identical_replicas'] else 'DIFFER'} |")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary["methods"])
    n = summary["spec"]["nproc"]
    fig, axes = plt.subplots(1, len(KINDS), figsize=(4.2 * len(KINDS), 3.6), sharey=False)
    for ax, kind in zip(axes, KINDS):
        one = [summary["methods"][m]["kinds"].get(kind, {}).get("seconds_one_process", float("nan")) * 1e3 for m in methods]
        many = [summary["methods"][m]["kinds"].get(kind, {}).get("seconds", float("nan")) * 1e3 for m in methods]
        x = range(len(methods))
        ax.bar([i - 0.2 for i in x], one, width=0.4, label="1 process, whole batch")
        ax.bar([i + 0.2 for i in x], many, width=0.4, label=f"{n} processes, one shard each")
        ax.set_xticks(list(x), methods, rotation=30, ha="right")
        ax.set_title(f"{kind} step")
        ax.set_ylabel("ms (median)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"step time, global batch {summary['spec']['batch_size']} ({summary['spec']['problem']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_distributed_bench(spec: DistributedBenchSpec, out: str | Path, *, plots: bool = True) -> dict[str, Any]:
    """Run the measurement (module docstring), write its files into ``out`` and return the summary."""
    registry = load_registry()
    from curvlib.precond import PreconditionerConfig

    for name in spec.methods:  # an unknown method or an invalid configuration fails here, before any process starts
        method = resolve_method(name, registry)
        if method.is_natural_gradient:
            PreconditionerConfig(**method.preconditioner_config(_hyperparameters(method, spec)))
    raw = spawn(_worker, spec.nproc, spec, backend=spec.backend, threads=spec.threads)[0]
    summary = summarize(raw, spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps({"summary": summary, "raw": raw}, indent=1, default=str))
    table = format_table(summary)
    (out / "distributed.md").write_text(table + "\n")
    if plots:
        _plot(summary, out / "distributed.png")
    return summary
