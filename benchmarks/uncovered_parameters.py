"""Parameters no layer adapter covers: first-order fallback against their own blocks (``uncovered``).

Problem: the small MNIST auto-encoder of ``curvlib.bench.problems.PROBLEMS["mnist_autoencoder"]``
(784-100-50-25-10-25-50-100-784, ReLU, Bernoulli output, batch 512, 1,024 training images of the
bundled MNIST; ``--path`` for the full set), changed so that part of it is invisible to the layer
adapters:

- a learnable per-feature gain after each hidden layer (``Gain``: x ⊙ s, like LayerScale), and
- the two bottleneck layers 25→10 and 10→25 written by hand (``Dense``: x Wᵀ + b with ``@``, no
  ``nn.Linear``).

Methods, from the same initial weights and on the same batches, advanced in lockstep (one step of
each in turn, so that a change of the machine's load affects all alike; only the steps timed,
after untimed warm-up steps on throwaway copies):

- ``adam``: ``torch.optim.Adam``, learning rate 3e-3;
- ``<kfac|tnt>_fallback``: :class:`~curvlib.optim.NaturalGradient` with the default config
  (true Fisher, one Monte Carlo sample, π-split damping λ = 1e-3, EMA 0.95), ``update_every``
  10 / ``invert_every`` 20, learning rate 1 and KL clipping c = 1e-3 (``curvlib bench``'s
  defaults; without the clipping, at learning rate 0.1, the per-sample runs diverged and the
  fallback runs stalled); the uncovered parameters are left out of the curvature and updated
  by the Adam fallback, in a parameter group of their own with Adam's learning rate
  (``--fallback sgd``: SGD with the natural gradient's learning rate);
- ``<kfac|tnt>_per_sample``: the same with ``uncovered="per_sample"``: every parameter in the
  curvature, the uncovered ones as blocks of the ``parameter`` layer kind.

The table: final training loss (whole training set), steps to reach ``--target``, and step time
÷ Adam's and ÷ the same method's fallback run, all measured in this one run.

    python benchmarks/uncovered_parameters.py [--steps 200] [--threads 1] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

from curvlib.bench.problems import PROBLEMS
from curvlib.optim import NaturalGradient

from _common import PATH_HELP, LockstepRun, run_lockstep  # benchmarks/_common.py (this folder is on sys.path)


class Gain(nn.Module):
    """x ⊙ s, one learnable gain per feature (no adapter)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class Dense(nn.Module):
    """x Wᵀ + b written with ``@`` (no adapter), initialised as the Linear layer it replaces."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.W = nn.Parameter(linear.weight.detach().clone())
        self.b = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W.T + self.b


def changed(model: nn.Sequential) -> nn.Sequential:
    """The auto-encoder with a gain after each hidden ReLU and its bottleneck pair as ``Dense``."""
    layers = list(model)
    linears = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    code = linears[len(linears) // 2 - 1 : len(linears) // 2 + 1]  # 25 -> 10 and 10 -> 25
    out = []
    for i, m in enumerate(layers):
        out.append(Dense(m) if i in code else m)
        if isinstance(m, nn.ReLU):
            out.append(Gain(layers[i - 1].out_features))
    return nn.Sequential(*out)


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: best on a shared 2-core machine)")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each method on a throwaway copy")
    ap.add_argument("--lr", type=float, default=1.0, help="the natural-gradient methods' learning rate (curvlib bench's)")
    ap.add_argument("--kl-clip", type=float, default=1e-3, help="c of the KL clipping (curvlib bench's; 0: none)")
    ap.add_argument("--adam-lr", type=float, default=3e-3, help="Adam's learning rate")
    ap.add_argument("--fallback", choices=("adam", "sgd"), default="adam", help="the fallback of the *_fallback runs")
    ap.add_argument("--target", type=float, default=0.25, help="training loss of the steps-to-target column")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--plot", type=Path, default=None, help="a PNG of the training curves (needs matplotlib)")
    ap.add_argument("--path", help=PATH_HELP)
    return ap.parse_args(argv)


METHODS = ("adam", "kfac_fallback", "kfac_per_sample", "tnt_fallback", "tnt_per_sample")


def _build(name: str, model: nn.Module, loss_fn, args) -> LockstepRun:
    if name == "adam":
        return LockstepRun(name, model, loss_fn, torch.optim.Adam(model.parameters(), lr=args.adam_lr), False)
    approximator, uncovered = name.split("_", 1)
    config = {"approximator": approximator, "uncovered": uncovered, "update_every": 10, "invert_every": 20}
    params = None
    if uncovered == "fallback" and args.fallback == "adam":
        own = [q for m in model.modules() if isinstance(m, (Gain, Dense)) for q in m.parameters()]
        rest = [q for q in model.parameters() if all(q is not o for o in own)]
        params = [{"params": rest}, {"params": own, "lr": args.adam_lr}]
    opt = NaturalGradient(model, loss_fn, config, lr=args.lr, params=params, fallback=args.fallback,
                          kl_clip=args.kl_clip or None,
                          generator=torch.Generator().manual_seed(args.seed))
    return LockstepRun(name, model, loss_fn, opt, True)


def _steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((k for k, v in curve if v <= target), None)


def main(argv=None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    problem = PROBLEMS["mnist_autoencoder"](small=True, seed=args.seed, path=args.path)
    init = changed(problem.model_fn(args.seed))
    own = sum(q.numel() for m in init.modules() if isinstance(m, (Gain, Dense)) for q in m.parameters())
    print(f"problem: {problem.description} with gains and a hand-written bottleneck; {problem.dataset.n_train} "
          f"training images, batch {problem.batch_size}; {sum(q.numel() for q in init.parameters())} parameters, "
          f"{own} of them in modules without an adapter; {args.steps} steps; torch threads {args.threads}")

    runs = run_lockstep(lambda name, model: _build(name, model, problem.loss_fn, args), METHODS, init, problem,
                        steps=args.steps, eval_every=args.eval_every, warmup=args.warmup, seed=args.seed)
    covered = {r.name: (len(r.opt.preconditioner.curvature.layers), len(r.opt.preconditioner.curvature.excluded))
               for r in runs if r.needs_batch}

    by = {r.name: r for r in runs}
    print()
    print(f"{'method':18s} {'blocks':>6s} {'left out':>8s} {'final loss':>10s} {'steps→' + format(args.target, 'g'):>11s} "
          f"{'time ÷ Adam':>11s} {'time ÷ fallback':>15s}")
    rows = {}
    for r in runs:
        blocks, left = covered.get(r.name, (0, 0))
        base = by.get(r.name.split("_")[0] + "_fallback")
        vs_fallback = r.seconds / base.seconds if base is not None else float("nan")
        reach = _steps_to(r.curve, args.target)
        rows[r.name] = {"curve": r.curve, "final_train_loss": r.curve[-1][1], "steps_to_target": reach,
                        "diverged": r.diverged, "blocks": blocks, "left_out": left,
                        "time_vs_adam": r.seconds / by["adam"].seconds, "time_vs_fallback": vs_fallback}
        print(f"{r.name:18s} {blocks:6d} {left:8d} {r.curve[-1][1]:10.4f} {str(reach):>11s} "
              f"{r.seconds / by['adam'].seconds:11.2f} {vs_fallback:15.2f}" + ("  (diverged)" if r.diverged else ""))
    results = {"problem": "mnist_autoencoder (small) with gains and a hand-written bottleneck", "path": args.path,
               "steps": args.steps, "seed": args.seed, "threads": args.threads, "lr": args.lr, "kl_clip": args.kl_clip, "adam_lr": args.adam_lr,
               "fallback": args.fallback, "target": args.target, "runs": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            ks, vs = zip(*r.curve)
            ax.plot(ks, vs, label=r.name, linestyle="--" if r.name.endswith("fallback") else "-")
        later = [v for r in runs for k, v in r.curve if k > 0 and math.isfinite(v)]
        if later:  # the first evaluation onwards: the initial drop would flatten the differences
            ax.set_ylim(0.98 * min(later), 1.02 * max(later))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (BCE)")
        ax.set_title("uncovered parameters: fallback vs per-sample blocks")
        ax.legend()
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return results


if __name__ == "__main__":
    main()
