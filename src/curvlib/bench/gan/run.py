"""``curvlib bench --problem mnist_gan``: WGAN-GP on MNIST with SGDA, Adam and KFAC1/2/3 (thesis §5.3.2).

One run = one method and one seed, from the same seeded generator and critic:

1. Algorithm 4 of the thesis (minibatch SGDA for WGAN-GP, with each player's own optimizer):
   per iteration ``n_critic`` critic steps on fresh real batches and fresh noise, then one
   generator step; an **epoch** is one pass of the critic over the real training images.
   A player trained with KFAC captures its curvature from its own training forward
   (:meth:`curvlib.NaturalGradient.capture`) — the critic's on the fakes and reals, the
   generator's on its noise (no targets).
2. FID (:mod:`curvlib.bench.gan.fid`, MNIST-classifier features) of ``fid_samples`` images
   generated from a fixed noise batch (generator in eval mode) against the real test images,
   before training and after every epoch. Timing excludes the evaluation.
3. A non-finite loss ends the run as ``diverged`` (its curves are kept).

Results (the folder ``out``): ``runs/<method>-seed<k>.json`` per run, ``summary.json`` and
``summary.txt`` (rewritten after every run), ``mnist_gan_fid_vs_epoch.png``,
``mnist_gan_fid_vs_time.png`` (median over seeds, band = min–max) and
``mnist_gan_samples_<method>.png`` (a grid of 64 samples of seed 0 at the end).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from curvlib.bench.data import Dataset, load_mnist
from curvlib.capture.adapters import BatchCouplingWarning
from curvlib.bench.gan.fid import FEATURES, FIDScorer, load_or_train_classifier
from curvlib.bench.gan.players import (
    LATENT,
    METHODS,
    critic_objective,
    generator_objective,
    make_critic,
    make_generator,
    make_optimizer,
)
from curvlib.bench.progress import ProgressReporter
from curvlib.bench.record import versions, write_text_atomic
from curvlib.errors import ConfigError
from curvlib.optim import NaturalGradient

__all__ = ["GanSpec", "format_gan_summary", "run_gan_bench"]

SCHEMA = "curvlib.bench.gan/1"


@dataclass(frozen=True)
class GanSpec:
    """What one ``mnist_gan`` job runs (defaults: a few minutes per method on 2 CPU cores)."""

    methods: tuple[str, ...] = tuple(METHODS)
    seeds: int = 1
    seed: int = 0
    epochs: int = 5
    batch_size: int = 64
    n_critic: int = 2
    gp_weight: float = 10.0
    fid_samples: int = 1000
    small: bool = False
    path: str | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"mnist_gan: unknown method(s) {unknown}; the methods are {list(METHODS)}")
        for name in ("seeds", "epochs", "batch_size", "n_critic", "fid_samples"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"mnist_gan: {name} must be ≥ 1, got {getattr(self, name)!r}")
        if not (self.gp_weight >= 0 and math.isfinite(self.gp_weight)):
            raise ConfigError(f"mnist_gan: gp_weight must be a finite number ≥ 0, got {self.gp_weight!r}")


def _data(spec: GanSpec) -> Dataset:
    data = load_mnist(spec.path, seed=spec.seed)
    if data.image_shape != (1, 28, 28):
        raise ConfigError(f"mnist_gan: expected 28×28 images, got image_shape {data.image_shape}")
    return data.subset(n_train=min(1024, data.n_train), n_test=min(256, data.n_test)) if spec.small else data


def _seeded(seed: int, build: Any) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, weight: float,
                     generator: torch.Generator) -> torch.Tensor:
    """weight · mean_b (‖∇_x D(x̂_b)‖ − 1)², x̂_b = ε_b x_real + (1 − ε_b) x_fake, ε_b ~ U[0, 1]."""
    eps = torch.rand(real.shape[0], 1, generator=generator)
    xi = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (g,) = torch.autograd.grad(critic(xi).sum(), xi, create_graph=True)
    return weight * ((g.norm(dim=1) - 1) ** 2).mean()


def _capturing(opt: torch.optim.Optimizer, batch: Any) -> Any:
    return opt.capture(batch) if isinstance(opt, NaturalGradient) else contextlib.nullcontext()


@dataclass
class GanRun:
    method: str
    seed: int
    generator: str
    critic: str
    status: str = "ok"
    epochs: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    generator_steps: int = 0


def train_gan(spec: GanSpec, method: str, seed: int, data: Dataset, scorer: FIDScorer,
              progress: ProgressReporter, samples_png: Path | None = None) -> GanRun:
    """One run (module docstring). The generator's batch norms couple the samples of its
    batch (training mode, as DCGAN trains them): its KFAC statistics are those of the coupled
    batch, the :class:`~curvlib.BatchCouplingWarning` that says so is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BatchCouplingWarning)
        return _train_gan(spec, method, seed, data, scorer, progress, samples_png)


def _train_gan(spec: GanSpec, method: str, seed: int, data: Dataset, scorer: FIDScorer,
               progress: ProgressReporter, samples_png: Path | None) -> GanRun:
    g_spec, d_spec = METHODS[method]
    G = _seeded(1000 + seed, make_generator)
    D = _seeded(2000 + seed, make_critic)
    gen_objective = generator_objective(D)
    opt_g = make_optimizer(g_spec, G, gen_objective, seed=seed)
    critic = critic_objective()
    opt_d = make_optimizer(d_spec, D, critic, seed=seed + 1)
    run = GanRun(method, seed, g_spec.describe(), d_spec.describe())
    rng = torch.Generator().manual_seed(3000 + seed)
    fixed_z = torch.randn(spec.fid_samples, LATENT, generator=torch.Generator().manual_seed(4000))
    m, n = min(spec.batch_size, data.n_train), data.n_train
    critic_batches = n // m
    iters = max(1, critic_batches // spec.n_critic)
    label = f"mnist_gan {method} seed {seed}"
    progress.start(label, spec.epochs * iters)

    def evaluate(epoch: int, loss_d: float | None, loss_g: float | None) -> None:
        G.eval()
        with torch.no_grad():
            fid = scorer(G(fixed_z))
        G.train()
        run.epochs.append({"epoch": epoch, "generator_steps": run.generator_steps, "seconds": run.train_seconds,
                           "fid": fid if math.isfinite(fid) else None, "critic_loss": loss_d, "generator_loss": loss_g})

    evaluate(0, None, None)
    loss_d = loss_g = math.nan
    for epoch in range(1, spec.epochs + 1):
        order = torch.randperm(n, generator=rng)
        start = time.perf_counter()
        for it in range(iters):
            for j in range(spec.n_critic):
                k = it * spec.n_critic + j
                real = data.X_train[order[k * m : (k + 1) * m]]
                with torch.no_grad():
                    fake = G(torch.randn(m, LATENT, generator=rng))
                x = torch.cat([fake, real])
                sign = torch.cat([torch.ones(m), -torch.ones(m)])
                opt_d.zero_grad()
                with _capturing(opt_d, (x, sign)):
                    out = D(x)  # the critic's one call in the block: its statistics' forward
                loss = critic(out, sign) + gradient_penalty(D, real, fake, spec.gp_weight, rng)  # the penalty: outside
                loss.backward()
                opt_d.step()
                loss_d = float(loss.detach())
            D.requires_grad_(False)  # the generator's step needs ∇ through D, not D's own gradients
            z = torch.randn(m, LATENT, generator=rng)
            opt_g.zero_grad()
            with _capturing(opt_g, (z, None)):
                images = G(z)
            loss = gen_objective(images)
            loss.backward()
            opt_g.step()
            D.requires_grad_(True)
            loss_g = float(loss.detach())
            run.generator_steps += 1
            if not (math.isfinite(loss_d) and math.isfinite(loss_g)):
                run.status = "diverged"
                break
            progress.update(label, (epoch - 1) * iters + it + 1, loss_d, run.train_seconds + time.perf_counter() - start)
        run.train_seconds += time.perf_counter() - start
        evaluate(epoch, loss_d, loss_g)
        if run.epochs[-1]["fid"] is None:
            run.status = "diverged"
        if run.status != "ok":
            break
    progress.finish(label, run.status, None if math.isnan(loss_d) else loss_d)
    if samples_png is not None:
        G.eval()
        with torch.no_grad():
            _sample_grid(G(fixed_z[:64]), samples_png, f"{method} (seed {seed}) after {run.epochs[-1]['epoch']} epochs, "
                         f"{FEATURES} {run.epochs[-1]['fid']:.1f}")
    return run


def _sample_grid(images: torch.Tensor, file: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = images.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = torch.ones(rows * 29 + 1, cols * 29 + 1)
    for i, img in enumerate(images.reshape(n, 28, 28)):
        r, c = divmod(i, cols)
        grid[1 + 29 * r : 29 * (r + 1), 1 + 29 * c : 29 * (c + 1)] = img
    fig = Figure(figsize=(5, 5.3), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file)


def _summary(spec: GanSpec, runs: Sequence[GanRun], floor: float, accuracy: float) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for method in spec.methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        final = [_fid(r.epochs[-1]["fid"]) for r in mine]  # a diverged run: +inf (None in the JSON)
        best = [min(_fid(e["fid"]) for e in r.epochs[1:] or r.epochs) for r in mine]
        per_epoch = [r.train_seconds / max(1, r.epochs[-1]["epoch"]) for r in mine]
        methods[method] = {
            "generator": mine[0].generator, "critic": mine[0].critic, "seeds": len(mine),
            "final_fid": _finite(statistics.median(final)), "best_fid": _finite(statistics.median(best)),
            "final_fid_range": [_finite(min(final)), _finite(max(final))],
            "seconds_per_epoch": statistics.median(per_epoch),
            "status": ",".join(sorted({r.status for r in mine})),
        }
    adam = methods.get("adam", {}).get("seconds_per_epoch")
    target = methods.get("adam", {}).get("final_fid")
    for method, v in methods.items():
        v["time_per_epoch_over_adam"] = None if not adam else v["seconds_per_epoch"] / adam
        # the training seconds at the first evaluation with FID ≤ Adam's median final FID, median
        # over the seeds with a seed that never reaches it counted as +∞ (None: most do not)
        hits = [next((e["seconds"] for e in r.epochs if e["fid"] is not None and e["fid"] <= target), math.inf)
                for r in runs if r.method == method] if target is not None else [math.inf]
        v["seconds_to_adam_final_fid"] = _finite(statistics.median(hits))
    adam_hit = methods.get("adam", {}).get("seconds_to_adam_final_fid")
    for v in methods.values():
        hit = v["seconds_to_adam_final_fid"]
        v["time_to_adam_final_fid_over_adam"] = None if hit is None or not adam_hit else hit / adam_hit
    return {"schema": SCHEMA, "problem": "mnist_gan", "metric": FEATURES, "spec": asdict(spec),
            "fid_real_floor": floor, "classifier_accuracy": accuracy, "methods": methods, "versions": versions()}


def _fid(value: float | None) -> float:
    return math.inf if value is None else value


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_gan_summary(summary: dict[str, Any]) -> str:
    """The summary as a text table."""
    lines = [f"mnist_gan: WGAN-GP, {summary['metric']} (real test images vs {summary['spec']['fid_samples']} "
             f"samples; real-vs-real floor {summary['fid_real_floor']:.2f}; classifier test accuracy "
             f"{summary['classifier_accuracy']:.3f}); batch {summary['spec']['batch_size']}, "
             f"{summary['spec']['epochs']} epochs, n_critic {summary['spec']['n_critic']}"]
    rows = [("method", "final FID", "best FID", "s/epoch", "÷ adam", "t→adam FID ÷ adam", "status")]
    for name, v in summary["methods"].items():
        rows.append((name, _cell(v["final_fid"]), _cell(v["best_fid"]), f"{v['seconds_per_epoch']:.1f}",
                     _cell(v["time_per_epoch_over_adam"]), _cell(v.get("time_to_adam_final_fid_over_adam")),
                     v["status"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i in (0, len(r) - 1) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0:
            lines.append("-" * len(lines[-1]))
    lines.append("players (generator / critic):")
    lines += [f"  {name:<7} {v['generator']} / {v['critic']}" for name, v in summary["methods"].items()]
    lines.append("t→adam FID: training seconds until the FID is ≤ Adam's median final FID (median over seeds, "
                 "a seed that never does counted as +∞; '-': most never do)")
    return "\n".join(lines)


def _plots(runs: Sequence[GanRun], out: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    files = []
    for xkey, xlabel, name in (("epoch", "epoch", "epoch"), ("seconds", "training time [s]", "time")):
        fig = Figure(figsize=(6.4, 4.4), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.set_title(f"mnist_gan (WGAN-GP): {FEATURES}, median over seeds, band min–max", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(FEATURES)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        for method in dict.fromkeys(r.method for r in runs):
            mine = [r for r in runs if r.method == method]
            length = min(len(r.epochs) for r in mine)
            xs = [statistics.median(r.epochs[i][xkey] for r in mine) for i in range(length)]
            ys = [[_fid(r.epochs[i]["fid"]) for r in mine] for i in range(length)]
            (line,) = ax.plot(xs, [statistics.median(y) for y in ys], marker="o", ms=3, label=method)
            if len(mine) > 1:
                ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=line.get_color(), alpha=0.2)
        ax.legend(fontsize=8)
        file = out / f"mnist_gan_fid_vs_{name}.png"
        fig.savefig(file)
        files.append(file)
    return files


def run_gan_bench(spec: GanSpec, out: str | Path, *, progress: ProgressReporter | None = None,
                  plots: bool = True) -> dict[str, Any]:
    """Every method of ``spec`` on every seed; the results folder (module docstring); the summary."""
    out = Path(out)
    progress = progress if progress is not None else ProgressReporter()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    data = _data(spec)
    classifier, accuracy = load_or_train_classifier(data, seed=spec.seed, cache=out, log=progress.message)
    real_test = data.X_test if data.n_test else data.X_train
    scorer = FIDScorer.of(classifier, real_test)
    floor = scorer(data.X_train[: min(spec.fid_samples, data.n_train)])  # real training images vs real test
    progress.message(f"{FEATURES}: real training vs test images {floor:.2f} (the floor)")
    runs: list[GanRun] = []
    summary: dict[str, Any] = {}
    for method in spec.methods:
        for k in range(spec.seeds):
            seed = spec.seed + k
            png = out / f"mnist_gan_samples_{method}.png" if plots and k == 0 else None
            run = train_gan(spec, method, seed, data, scorer, progress, png)
            runs.append(run)
            write_text_atomic(out / "runs" / f"{method}-seed{seed}.json", json.dumps(asdict(run), indent=1))
            summary = _summary(spec, runs, floor, accuracy)
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=1))
            write_text_atomic(out / "summary.txt", format_gan_summary(summary) + "\n")
    if plots:
        _plots(runs, out)
    return summary
