"""Cost of one optimizer step of each curvlib method, relative to one SGD step, and of
curvlib's KFAC factors relative to peer libraries' — all measured in one run.

Problem: the thesis's MNIST auto-encoder (appendix 3.D, problem 1),
784-1000-500-250-30-250-500-1000-784 Linear layers, ReLU, Bernoulli output
(``BCEWithLogitsLoss`` on logits), float32 on the CPU, a batch of 512 real MNIST images
(``curvlib.bench.PROBLEMS["mnist_autoencoder"](small=False)``).

Part 1 — curvlib's natural-gradient steps. For each method three kinds of step are timed
**interleaved** with SGD and Adam (one step of each per round, ``--repeats`` rounds (at least
5) after one untimed step each; every ratio is the median over rounds of the step's time
divided by that round's SGD step), each with the optimizer's whole ``zero_grad`` / forward /
backward / ``step(batch=...)``:

* ``plain``: no curvature work (the preconditioner applied to the gradient);
* ``refresh``: the curvature captured on the batch and the approximation refitted (T1);
* ``refresh+invert``: the above and the damped inverse rebuilt (T2) — the un-amortized step.

The amortized cost over a schedule T1 = ``--update-every``, T2 = ``--invert-every`` is

    [(T2 − T2/T1)·plain + (T2/T1 − 1)·refresh + refresh+invert] / T2,

and every cost is printed divided by the median SGD step (momentum 0.9) of the same run.

Part 2 — peers. The KFAC factors of one batch from curvlib and from the peer libraries
that are installed (curvlinops' ``KFACLinearOperator``, BackPACK's ``KFAC``/``KFLR``
extensions) are first **checked against each other**, then timed:

* check: the exact-GGN ("type-2", BackPACK's KFLR) factors of every layer on a batch of
  ``--check-batch`` inputs — deterministic, so all libraries must agree; Monte Carlo
  factors cannot be compared directly (each library draws its own targets).
  Conventions. All three libraries put the 1/m of the batch mean into ``A`` and make
  A ⊗ G the layer block of the per-sample mean GGN of the mean-reduced loss module (for
  ``BCEWithLogitsLoss``/``MSELoss`` the mean also runs over the c = 784 outputs, and each
  library keeps that 1/c in ``G``), so no rescaling is needed — the scales s found by
  least squares are printed to show it:

  - curvlib: ``A = (1/m) Σ ā āᵀ`` with ā = [a; 1] (bias last), ``G`` = the KFAC factor of
    ``curvature("ggn")`` (per-sample convention of :mod:`curvlib.curvatures.losses`);
  - curvlinops (``separate_weight_and_bias=False``): the same ``A`` (bias appended last);
  - BackPACK: ``weight.kflr = [G, A_w]`` with ``A_w = (1/m) Σ a aᵀ`` (no bias row), compared
    with curvlib's ``A[:-1, :-1]``. BackPACK 1.7 supports ``BCEWithLogitsLoss`` only for
    scalar outputs, so it is compared on the same network with ``MSELoss`` (``--peer-losses``).

  Targets are binarized for the BCE comparison (curvlinops' type-2 accepts only 0/1
  targets; the GGN of a Bernoulli output does not depend on them).

  The printed errors are max|X_peer − s·X_curvlib| / max|X_curvlib| per factor (s the
  documented scale) and the relative error of (A ⊗ G)v for a random v.
* time: one Monte Carlo (1 sample) KFAC factor computation at batch ``--batch``, each
  library's own way (curvlib: ``curvature("fisher")`` + ``approximate(F, "kfac")``;
  curvlinops: ``KFACLinearOperator(fisher_type="mc").compute_kronecker_factors()``;
  BackPACK: ``loss.backward()`` under ``backpack(KFAC(mc_samples=1))``), as a ratio to the
  SGD step and to curvlib's.

Peers are optional: install them into a separate environment with the torch pin, e.g.::

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install -c constraints.txt -e ".[bench]" curvlinops-for-pytorch backpack-for-pytorch
    .venv-peers/bin/python benchmarks/step_cost.py

Usage::

    python benchmarks/step_cost.py [--batch 512] [--repeats 3] [--threads N]
        [--methods kfac kpsvd ...] [--skip-peers] [--small]

Absolute times are printed only for context; the ratios are the result.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import warnings

import torch
from torch import nn

from curvlib.bench.methods import resolve_method
from curvlib.bench.problems import PROBLEMS
from curvlib.bench.training_step import build_training_step
from curvlib.plugins import load_registry

from _common import interleaved, median_time  # benchmarks/_common.py (this folder is on sys.path)

METHODS = ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "kfac+residual", "block_ng", "exact_ng")
NEVER = 10**9  # a T1/T2 no run reaches: "never refresh / never invert again"



def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


# --------------------------------------------------------------------------- part 1


def stepper_for(problem, method_name: str, registry, X, Y, T1: int, T2: int):
    """One step of ``method_name`` under schedule (T1, T2), as a callable (a fresh model each)."""
    method = resolve_method(method_name, registry)
    model = problem.model_fn(0)
    hp = method.default_hyperparameters(lr=1e-6, update_every=T1, invert_every=T2, kl_clip=0) \
        if method.is_natural_gradient else method.default_hyperparameters(lr=1e-6)
    stepper = build_training_step(method, model, problem.loss_fn, hp,
                                  generator=torch.Generator().manual_seed(1), registry=registry)
    return lambda: stepper.step(X, Y)


def step_timer(problem, method_name: str, registry, X, Y, T1: int, T2: int, repeats: int) -> float:
    """Median time of the steps of ``method_name`` under schedule (T1, T2), from the second step on."""
    return median_time(stepper_for(problem, method_name, registry, X, Y, T1, T2), repeats)


def part1(problem, registry, X, Y, methods, repeats: int, T1: int, T2: int) -> tuple[float, list[list[str]]]:
    """Every step kind of every method timed interleaved with SGD (one step of each per round;
    each ratio is the median over rounds of time / that round's SGD step)."""
    fns = {"sgd": stepper_for(problem, "sgd", registry, X, Y, 1, 1),
           "adam": stepper_for(problem, "adam", registry, X, Y, 1, 1)}
    failed = {}
    for name in methods:
        try:
            fns[(name, "plain")] = stepper_for(problem, name, registry, X, Y, NEVER, NEVER)
            fns[(name, "refresh")] = stepper_for(problem, name, registry, X, Y, 1, NEVER)
            fns[(name, "full")] = stepper_for(problem, name, registry, X, Y, 1, 1)
        except Exception as exc:  # report and go on: one method must not hide the others
            failed[name] = exc
    ratio, seconds = interleaved(fns, max(repeats, 5), reference="sgd")
    sgd = seconds["sgd"]
    rows = [["sgd", "1.00", "-", "-", "1.00", "1.00", f"{sgd * 1e3:.1f}"],
            ["adam", fmt_ratio(ratio["adam"]), "-", "-", fmt_ratio(ratio["adam"]), fmt_ratio(ratio["adam"]),
             f"{seconds['adam'] * 1e3:.1f}"]]
    for name in methods:
        if name in failed:
            exc = failed[name]
            print(f"  {name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append([name, "error", "", "", "", "", type(exc).__name__])
            continue
        plain, refresh, full = (ratio[(name, k)] for k in ("plain", "refresh", "full"))
        amortized = ((T2 - T2 // T1) * plain + (T2 // T1 - 1) * refresh + full) / T2
        rows.append([name, fmt_ratio(plain), fmt_ratio(refresh), fmt_ratio(full), fmt_ratio(amortized),
                     fmt_ratio(full), f"{amortized * sgd * 1e3:.1f}"])
        print(f"  {name}: plain {seconds[(name, 'plain')] * 1e3:.1f} ms, refresh {seconds[(name, 'refresh')] * 1e3:.1f} ms, "
              f"refresh+invert {seconds[(name, 'full')] * 1e3:.1f} ms", flush=True)
    return sgd, rows


# --------------------------------------------------------------------------- part 2


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def curvlib_factors(model, loss_fn, X, Y, kind: str, registry, generator=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A [d_in+1, d_in+1], G [d_out, d_out]) per Linear layer, curvlib's KFAC."""
    from curvlib.approximators.api import approximate
    from curvlib.curvatures.api import curvature

    options = {"mc_samples": 1} if kind == "fisher" else {}
    F = curvature(kind, model, loss_fn, (X, Y), generator=generator, registry=registry, **options)
    approx = approximate(F, "kfac", registry=registry)
    return [fit.terms[0] for fit in approx]


def curvlinops_factors(model, loss_fn, X, Y, fisher_type: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(model, loss_fn, params, [(X, Y)], fisher_type=fisher_type, mc_samples=1,
                            separate_weight_and_bias=False, check_deterministic=False, num_data=X.shape[0],
                            num_per_example_loss_terms=1)
    op.compute_kronecker_factors()
    return [(op._input_covariances[n], op._gradient_covariances[n]) for n, _ in linear_layers(model)]


def backpack_factors(model, loss_fn, X, Y, extension: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A_w [d_in, d_in], G [d_out, d_out]) per Linear layer from BackPACK (weight.kfac / .kflr = [G, A])."""
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    ext = {"kfac": lambda: KFAC(mc_samples=1), "kflr": KFLR}[extension]()
    model = extend(model)
    lossf = extend(loss_fn)
    model.zero_grad(set_to_none=True)
    # BackPACK's BCEWithLogitsLoss accepts only binary targets; the Fisher and the GGN of a
    # Bernoulli output do not depend on the targets, so binarized ones give the same factors.
    Yb = (Y > 0.5).to(Y.dtype)
    with backpack(ext):
        lossf(model(X), Yb).backward()
    out = []
    for _, layer in linear_layers(model):
        G, A = getattr(layer.weight, extension)
        out.append((A, G))
    return out


def rel_max(peer: torch.Tensor, ref: torch.Tensor) -> float:
    return float((peer - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def scale_of(peer: torch.Tensor, ref: torch.Tensor) -> float:
    """Least-squares s with peer ≈ s·ref."""
    return float((peer * ref).sum() / (ref * ref).sum().clamp_min(1e-30))


def kron_apply_error(A1, G1, A2, G2, generator) -> float:
    """‖(A2⊗G2)v − (A1⊗G1)v‖ / ‖(A1⊗G1)v‖, v random, via (A⊗G) vec(V) = vec(G V Aᵀ)."""
    V = torch.randn(G1.shape[0], A1.shape[0], generator=generator, dtype=A1.dtype)
    ref = G1 @ V @ A1.T
    return float(torch.linalg.norm(G2 @ V @ A2.T - ref) / torch.linalg.norm(ref))


def binary(Y: torch.Tensor) -> torch.Tensor:
    """Binarized targets: curvlinops' type-2 and BackPACK accept only 0/1 targets with
    ``BCEWithLogitsLoss``; the GGN and the Fisher of a Bernoulli output do not depend on
    the targets, so every library gets the same 0/1 targets and the factors are unchanged."""
    return (Y > 0.5).to(Y.dtype)


LOSSES = {"bce": nn.BCEWithLogitsLoss, "mse": nn.MSELoss}

#: G_peer / G_curvlib for a mean-reduced loss over c outputs and a batch of m (module docstring).
EXPECTED_G_SCALE = {"curvlinops": lambda c, m: 1.0, "backpack": lambda c, m: 1.0}


def targets(loss: str, X: torch.Tensor) -> torch.Tensor:
    return binary(X) if loss == "bce" else X


def peer_factors(peer: str, loss: str, model, X, Y, exact: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if peer == "curvlinops":
        return curvlinops_factors(model, LOSSES[loss](), X, Y, "type-2" if exact else "mc")
    return backpack_factors(model, LOSSES[loss](), X, Y, "kflr" if exact else "kfac")


def part2_check(problem, registry, X, peers: list[str], loss: str) -> list[list[str]]:
    """Exact-GGN KFAC factors of every layer: curvlib vs each peer (module docstring)."""
    c = X.shape[1]
    m = X.shape[0]
    gen = torch.Generator().manual_seed(0)
    Xd = X.double()
    Yd = targets(loss, Xd)
    ref = curvlib_factors(problem.model_fn(0).double(), LOSSES[loss](), Xd, Yd, "ggn", registry)
    rows = []
    for peer in peers:
        try:
            got = peer_factors(peer, loss, problem.model_fn(0).double(), Xd, Yd, exact=True)
        except NotImplementedError as exc:
            rows.append([f"{peer} ({loss})", "unsupported", "", "", "", "", "", str(exc)])
            continue
        expected_g = EXPECTED_G_SCALE[peer](c, m)
        if peer == "curvlinops":
            pairs = [(A, G, Ar, Gr) for (A, G), (Ar, Gr) in zip(got, ref)]
        else:
            pairs = [(A, G, Ar[:-1, :-1], Gr) for (A, G), (Ar, Gr) in zip(got, ref)]
        for i, (A, G, Ar, Gr) in enumerate(pairs):
            s_a, s_g = scale_of(A, Ar), scale_of(G, Gr)
            rows.append([f"{peer} ({loss}) L{i + 1}", f"{Ar.shape[0]}x{Gr.shape[0]}",
                         f"{s_a:.4g}", f"{s_g:.4g}", f"{expected_g:.4g}",
                         f"{rel_max(A, Ar):.1e}", f"{rel_max(G, expected_g * Gr):.1e}",
                         f"{kron_apply_error(Ar, expected_g * Gr, A, G, gen):.1e}"])
    return rows


def part2_time(problem, registry, X, peers: list[str], sgd: float, repeats: int, *, exact: bool,
               loss: str) -> list[list[str]]:
    loss_fn = LOSSES[loss]()
    Y = targets(loss, X)
    model = problem.model_fn(0)
    gen = torch.Generator().manual_seed(0)
    kind = "ggn" if exact else "fisher"
    t_curvlib = median_time(lambda: curvlib_factors(model, loss_fn, X, Y, kind, registry, gen), repeats)
    rows = [[f"curvlib ({loss})", f"curvature('{kind}') + approximate('kfac')", f"{t_curvlib / sgd:.2f}", "1.00",
             f"{t_curvlib * 1e3:.1f}"]]
    for peer in peers:
        what = {("curvlinops", False): "KFACLinearOperator(fisher_type='mc')",
                ("curvlinops", True): "KFACLinearOperator(fisher_type='type-2')",
                ("backpack", False): "KFAC(mc_samples=1) backward",
                ("backpack", True): "KFLR backward"}[(peer, exact)]
        pm = problem.model_fn(0)
        try:
            t = median_time(lambda: peer_factors(peer, loss, pm, X, Y, exact), repeats)
        except NotImplementedError as exc:
            rows.append([f"{peer} ({loss})", what, "n/a", "n/a", f"unsupported: {exc}"])
            continue
        rows.append([f"{peer} ({loss})", what, f"{t / sgd:.2f}", f"{t / t_curvlib:.2f}", f"{t * 1e3:.1f}"])
    return rows


def installed_peers() -> tuple[list[str], list[str]]:
    peers, missing = [], []
    for name, module in (("curvlinops", "curvlinops"), ("backpack", "backpack")):
        (peers if importlib.util.find_spec(module) is not None else missing).append(name)
    return peers, missing


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--check-batch", type=int, default=16, help="batch of the exact-GGN factor check")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--invert-every", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--peer-losses", nargs="+", choices=tuple(LOSSES), default=["bce", "mse"],
                        help="losses of the peer comparison: the problem's BCE, and squared error on the same "
                        "network (BackPACK supports BCEWithLogitsLoss only for scalar outputs)")
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--small", action="store_true", help="the shrunk auto-encoder (a quick smoke run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    problem = PROBLEMS["mnist_autoencoder"](small=args.small, seed=0)
    X = problem.dataset.X_train[: args.batch]
    Y = X
    registry = load_registry()
    print(f"MNIST auto-encoder {'-'.join(map(str, problem.widths))}, batch {X.shape[0]}, float32, CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    sgd = step_timer(problem, "sgd", registry, X, Y, 1, 1, max(args.repeats, 5))
    if not args.skip_methods:
        T1, T2 = args.update_every, args.invert_every
        print(f"\n[1] one optimizer step relative to one SGD step (T1 = {T1}, T2 = {T2})", flush=True)
        sgd, rows = part1(problem, registry, X, Y, args.methods, args.repeats, T1, T2)
        print(table(["method", "plain", "refresh", "refresh+invert", f"amortized T1={T1},T2={T2}",
                     "un-amortized", "amortized [ms]"], rows))

    if args.skip_peers:
        return
    peers, missing = installed_peers()
    for name in missing:
        print(f"\npeer {name}: not installed, skipped")
    if not peers:
        return
    Xc = problem.dataset.X_train[: args.check_batch]
    print(f"\n[2a] exact-GGN KFAC factors, curvlib vs peers (batch {args.check_batch}, float64): "
          "scale found, expected scale, max relative errors after conversion", flush=True)
    rows = [row for loss in args.peer_losses for row in part2_check(problem, registry, Xc, peers, loss)]
    print(table(["layer", "A x G", "s(A)", "s(G)", "expected s(G)", "err A", "err G", "err (A⊗G)v"], rows))
    print(f"\n[2b] Monte Carlo (1 sample) KFAC factors of one batch of {X.shape[0]}: time relative to one SGD "
          f"step (batch {X.shape[0]}, BCE) and to curvlib", flush=True)
    rows = [row for loss in args.peer_losses
            for row in part2_time(problem, registry, X, peers, sgd, args.repeats, exact=False, loss=loss)]
    print(table(["library", "what", "÷ sgd step", "÷ curvlib", "time [ms]"], rows))
    sgd_small = step_timer(problem, "sgd", registry, Xc, Xc, 1, 1, max(args.repeats, 5))
    print(f"\n[2c] exact-GGN KFAC factors ({Xc.shape[1]} back-propagated columns) of a batch of {Xc.shape[0]}: "
          f"time relative to one SGD step (batch {Xc.shape[0]}, BCE) and to curvlib", flush=True)
    rows = [row for loss in args.peer_losses
            for row in part2_time(problem, registry, Xc, peers, sgd_small, args.repeats, exact=True, loss=loss)]
    print(table(["library", "what", "÷ sgd step", "÷ curvlib", "time [ms]"], rows))


if __name__ == "__main__":
    main()
