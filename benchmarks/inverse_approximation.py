"""How well Kronecker products approximate the damped *inverse* of one layer block (docs/beyond_kfac.md).

For the block M = F_ii + λI of the true Fisher (one Monte Carlo sample, float64) of one
layer, after ``--steps`` Adam steps of the problem's network, prints for each λ the relative
residual ‖I − P M‖_F / ‖I‖_F (exact, from the statistics:
:func:`curvlib.damping.kron_inverse.kron_inverse_residual`) of

* KFAC's π-split inverse P = (A + π√λI)⁻¹ ⊗ (G + π⁻¹√λI)⁻¹ (2.95)–(2.96);
* the same π-split inverse of TNT's factors (``tnt``);
* ``kron_inverse``: the C ⊗ D fitted to M⁻¹ by alternating least squares, its greedy sum of
  ``--rank`` terms, and the joint fit of that many terms (``fit="joint"``: each term refitted
  against all the others until the sum is stationary), with the joint fit's time relative to
  the greedy one's;
* ``inverse_free`` with diagonal and with block-diagonal (blocks of ``--block-size``) factors:
  the inverse of the structured part of the π-split's factors, by Newton–Schulz steps;

and the time of one ``kron_inverse`` fit relative to one KFAC refresh plus its π-split
inversion (median of ``--repeats``).  0 is a perfect inverse; 1 is the residual of P = 0.

Usage::

    python benchmarks/inverse_approximation.py [--problem mnist_autoencoder] [--layer 4] [--steps 100]
        [--lams 1e-4,1e-3,1e-2] [--threads 1] [--path DIR]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from curvlib.approximators import approximate
from curvlib.bench.problems import PROBLEMS
from curvlib.curvatures.api import curvature
from curvlib.curvatures.factors import kfac_factors
from curvlib.damping import InverseFreeDamping
from curvlib.damping.kron_inverse import fit_kron_inverse, fit_kron_inverse_terms, kron_inverse_residual
from curvlib.linalg import KroneckerSum, pi_split

from _common import PATH_HELP, median_time  # benchmarks/_common.py (this folder is on sys.path)


def pi_split_inverse(A: torch.Tensor, G: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    Ad, Gd, _ = pi_split(A, G, lam)
    return torch.linalg.inv(Ad), torch.linalg.inv(Gd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="mnist_autoencoder", choices=("mnist_autoencoder", "mnist_conv_autoencoder", "mnist_resnet"))
    parser.add_argument("--layer", type=int, default=4, help="index of the preconditioned layer")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps before the measurement")
    parser.add_argument("--lams", default="1e-4,1e-3,1e-2", help="comma-separated λ values")
    parser.add_argument("--max-iters", type=int, default=30, help="kron_inverse's sweeps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=16, help="block size of inverse_free's block-diagonal factors")
    parser.add_argument("--rank", type=int, default=3, help="terms of kron_inverse's greedy and joint sums")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--path", help=PATH_HELP)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    problem = PROBLEMS[args.problem](seed=args.seed, path=args.path)
    model = problem.model_fn(args.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    stream = iter(())
    for _ in range(args.steps + 1):
        try:
            X, Y = next(stream)
        except StopIteration:
            stream = iter(problem.batches(gen, drop_last=True))
            X, Y = next(stream)
        if _ == args.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        problem.loss_fn(model(X), Y).backward()
        optimizer.step()
    model64 = copy.deepcopy(model).to(torch.float64)
    F = curvature("fisher", model64, problem.loss_fn, (X.double(), Y.double() if Y.is_floating_point() else Y),
                  generator=torch.Generator().manual_seed(args.seed + 1), mc_samples=1)
    stats = F.statistics(args.layer)
    L = F.layers[args.layer]
    (A, G), = approximate(F, "kfac", layers=[args.layer])[args.layer].terms
    (At, Gt), = approximate(F, "tnt", layers=[args.layer])[args.layer].terms
    print(f"{args.problem}, layer {args.layer + 1} ({L.name}: d_a {L.a_dim}, d_g {L.g_dim}, p = {L.p_i:,}), true Fisher "
          f"(1 MC sample) after {args.steps} Adam steps, batch {stats.m}, float64, {torch.get_num_threads()} threads")
    print("relative residual ‖I − P (F + λI)‖_F / ‖I‖_F")
    print(f"{'λ':>8}{'KFAC π-split':>15}{'TNT π-split':>14}{'kron_inverse':>15}{'sweeps':>8}{f'rank {args.rank}':>10}"
          f"{'joint':>8}{'joint ÷ greedy time':>21}{'inv.-free diag':>16}{f'inv.-free b{args.block_size}':>16}")
    for lam in (float(x) for x in args.lams.split(",")):
        r_kfac = kron_inverse_residual(stats, lam, *pi_split_inverse(A, G, lam))
        r_tnt = kron_inverse_residual(stats, lam, *pi_split_inverse(At, Gt, lam))
        C, D, report = fit_kron_inverse(stats, lam, max_iters=args.max_iters, tol=1e-6)
        structured = []
        for block_size in (1, args.block_size):
            inv = InverseFreeDamping(value=lam, block_size=block_size).invert(KroneckerSum([(A, G)]))
            structured.append(kron_inverse_residual(stats, lam, inv.PA, inv.PG))
        t0 = time.perf_counter()
        _, report_k = fit_kron_inverse_terms(stats, lam, rank=args.rank, max_iters=args.max_iters, tol=1e-6)
        t1 = time.perf_counter()
        _, report_j = fit_kron_inverse_terms(stats, lam, rank=args.rank, max_iters=args.max_iters, tol=1e-6, fit="joint")
        t2 = time.perf_counter()
        print(f"{lam:>8.0e}{r_kfac:>15.4f}{r_tnt:>14.4f}{report['relative_residual']:>15.4f}{report['iterations']:>8d}"
              f"{report_k['relative_residual']:>10.4f}{report_j['relative_residual']:>8.4f}{(t2 - t1) / (t1 - t0):>21.1f}"
              f"{structured[0]:>16.4f}{structured[1]:>16.4f}")
    lam = float(args.lams.split(",")[1 if "," in args.lams else 0])
    stats32 = stats.to(torch.float32)

    def kfac_refresh_and_invert():
        (A32, G32), = kfac_factors(stats32)
        pi_split_inverse(A32, G32, lam)

    t_kfac = median_time(kfac_refresh_and_invert, args.repeats)
    t_kinv = median_time(lambda: fit_kron_inverse(stats32, lam, max_iters=args.max_iters, tol=1e-6), args.repeats)
    print(f"time at λ = {lam:g}, float32: KFAC refresh + π-split inversion {t_kfac * 1e3:.2f} ms, kron_inverse fit "
          f"{t_kinv * 1e3:.2f} ms ({t_kinv / t_kfac:.1f}×)")


if __name__ == "__main__":
    main()
