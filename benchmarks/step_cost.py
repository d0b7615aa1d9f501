"""Cost of one optimizer step of each curvlib method and of peer libraries' KFAC-family
optimizers relative to one SGD step, next to its FLOP-model limit, and of curvlib's KFAC
factors relative to peer libraries' — all measured in one run.

Problem: the thesis's MNIST auto-encoder (appendix 3.D, problem 1),
784-1000-500-250-30-250-500-1000-784 Linear layers, ReLU, Bernoulli output
(``BCEWithLogitsLoss`` on logits), float32 on the CPU, a batch of 512 real MNIST images
(``curvlib.bench.PROBLEMS["mnist_autoencoder"](small=False)``).

Part 1 — curvlib's natural-gradient steps. For each method three kinds of step are timed
**interleaved** with SGD and Adam (one step of each per round, ``--repeats`` rounds (at least
5) after ``--warmup`` untimed rounds (3: a process holding many optimizers settles its heap in
the first rounds, and until then an inversion's new matrices can land on fresh pages and
page-fault); every ratio is the median over rounds of the step's time
divided by that round's SGD step), each with the optimizer's whole ``zero_grad`` / forward /
backward / ``step(batch=...)``:

* ``plain``: no curvature work (the preconditioner applied to the gradient);
* ``refresh``: the curvature captured on the batch and the approximation refitted (T1);
* ``refresh+invert``: the above and the damped inverse rebuilt (T2) — the un-amortized step;
  with ``--background`` also with ``background_inversion=True`` (row "<method>, background";
  its plain and refresh steps are the method's, and the FLOP limit of its refresh+invert step
  is the refresh's: the inversion runs in a worker thread, off the step's path where a core
  is free, and each step first waits for the previous step's).

The amortized cost over a schedule T1 = ``--update-every``, T2 = ``--invert-every`` is

    [(T2 − T2/T1)·plain + (T2/T1 − 1)·refresh + refresh+invert] / T2,

and every cost is printed divided by the median SGD step (momentum 0.9) of the same run.

The row "sgd + application GEMMs" is the floor of an explicit-inverse KFAC's plain step on
this machine, measured in the same rounds: SGD's step followed by nothing but the two GEMMs
per Linear layer, G⁻¹ X A⁻¹ with X of the layer's [∇W ∇b] shape, on fixed row-aligned
operands in the layout curvlib measured fastest (:func:`curvlib.linalg.kron.two_sided`) — no
gradient copies, no update with the result, no checks.  Its ratio against the FLOP limit says
how fast this CPU runs the application's GEMMs against SGD's; curvlib's plain step against it,
what the library adds.

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
  library's own way (curvlib: ``curvature("fisher", check_samples=False, loss_gradient=False)``
  + ``approximate(F, "kfac")`` — the peers' work: one forward, one backward of the sampled
  targets, the factors; and by default, with the per-sample check and ∇L, two backward passes more;
  curvlinops: ``KFACLinearOperator(fisher_type="mc").compute_kronecker_factors()``;
  BackPACK: ``loss.backward()`` under ``backpack(KFAC(mc_samples=1))``), as a ratio to the
  SGD step and to curvlib's.

Part 3 — peers' optimizer steps. The KFAC-family optimizers of the installed peers (ASDL's
``KfacGradientMaker``, kfac-pytorch's ``KFACPreconditioner``, curvlinops' ``KFACLinearOperator``
with its ``KFACInverseLinearOperator`` applied to the gradient, SINGD) are first **checked**
— one refresh+invert step from the same initial weights must change the parameters, stay
finite and move along a direction d with cos(d, ∇L) > 0 (the cosine with curvlib's KFAC
direction is printed too; kfac-pytorch and SINGD start from identity factors, so their
first step is close to the gradient) — and a peer that fails is not timed.  Then their
three step kinds are timed as in part 1, **interleaved in one run with SGD and curvlib's
``kfac``**, each kind a separate optimizer instance (plain: T1 = T2 = ∞ after the untimed
first step; refresh: T1 = 1, T2 = ∞; refresh+invert: T1 = T2 = 1), amortized over the same
T1, T2.  Same schedule, one Monte Carlo sample, damping λ = 1e-3 and batch for everyone;
how each library's damping maps onto λ, which Fisher it captures and which inverse it
forms is in ``benchmarks/_peers.py``'s docstring, and printed under the table.

FLOP-model limits. Next to each measured ratio (parts 1 and 3) the script prints the
ratio that the same algorithm's FLOP count would give (``benchmarks/_flops.py``: forward
and backward 6·m·d_in·d_out per layer = one SGD step; the capture's extra forward and
backward; factors 2·m·(d_a² + d_g²); two GEMMs 2·d_g·d_a·(d_a + d_g) to apply explicit
inverses, four in an eigenbasis; per factor inversion d³ Cholesky, 8/3·d³ LU, 9·d³ eigh).
curvlib's ``kfac`` (π-split damping applied with explicit inverses, Monte Carlo capture
from the training forward, ``opt.capture``, and a backward of sampled targets to the layer
outputs) is
the only part-1 method with a model; the others print "-".

Peers are optional: without them parts 2 and 3 print "not installed, skipped".  ASDL
calls ``torch.cuda.nvtx`` range functions that a CPU-only torch lacks (they raise): the
script replaces them with no-ops in its own process before it imports ASDL
(``_peers.stub_cpu_nvtx``); the installed ASDL is not changed.  The peers environment
(what was run; ``constraints.txt`` keeps the CPU torch that the peers' torchvision would
otherwise replace)::

    python3 -m venv .venv-peers
    .venv-peers/bin/pip install -c constraints.txt -e ".[bench]" asdfghjkl==0.1a5 \
        curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1 singd==0.0.5
    # kfac-pytorch (0.4.2) is not on PyPI: a checkout of github.com/gpauloski/kfac-pytorch
    # (measured: commit 869cf11), e.g. unpacked from `git archive HEAD` into /tmp/kfac-pytorch
    .venv-peers/bin/pip install -c constraints.txt /tmp/kfac-pytorch
    .venv-peers/bin/pip install -c constraints.txt ./plugins/curvlib-ekfac ./plugins/curvlib-grouped-newton
    .venv-peers/bin/python benchmarks/step_cost.py --threads 1 --repeats 7 --methods kfac

Usage::

    python benchmarks/step_cost.py [--batch 512] [--repeats 3] [--threads N]
        [--methods kfac kpsvd ...] [--skip-peers] [--skip-peer-factors] [--skip-peer-steps] [--small]
        [--device cuda]

``--device cuda`` runs part 1 on the GPU (each timed step ends with ``torch.cuda.synchronize()``;
the FLOP limits are the same counts, a GPU's small-matrix inefficiency is not in them) and
skips the peers, which are set up for the CPU here.

On a shared machine use ``--threads 1`` (two threads on two busy cores make the LAPACK
calls erratic) and ``--repeats`` ≥ 7.  Absolute times are printed only for context; the
ratios are the result.
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
from curvlib.linalg.kron import row_aligned, two_sided
from curvlib.plugins import load_registry

# benchmarks/_common.py, _flops.py, _peers.py (this folder is on sys.path)
from _common import PATH_HELP, interleaved, median_time
from _flops import CURVLIB_KFAC, StepLimits, amortized, linear_shapes, step_limits
from _peers import DISTRIBUTIONS, PEERS, PeerOptimizer, Schedule, installed

METHODS = ("kfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "kfac+residual", "block_ng", "exact_ng")
NEVER = 10**9  # a T1/T2 no run reaches: "never refresh / never invert again"
#: (T1, T2) of the three step kinds, each timed on its own optimizer instance
KINDS = {"plain": (NEVER, NEVER), "refresh": (1, NEVER), "full": (1, 1)}
#: the FLOP model of the part-1 methods that have one
FLOP_MODELS = {"kfac": CURVLIB_KFAC}
DAMPING = 1e-3  # λ of every peer (curvlib's default)
TIMING_LR = 1e-6  # steps small enough that the repeated batch does not move the model far
CHECK_LR = 1e-3



def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *[line(r) for r in rows]])


# --------------------------------------------------------------------------- part 1


def curvlib_optimizer(problem, method_name: str, registry, X, Y, T1: int, T2: int, lr: float = TIMING_LR, *,
                      background: bool = False):
    """A fresh model and one step of ``method_name`` on it under schedule (T1, T2), as a callable
    (``background``: with ``background_inversion=True``)."""
    method = resolve_method(method_name, registry)
    model = problem.model_fn(0).to(X.device)
    hp = method.default_hyperparameters(lr=lr, update_every=T1, invert_every=T2, kl_clip=0,
                                        background_inversion=background or None) \
        if method.is_natural_gradient else method.default_hyperparameters(lr=lr)
    stepper = build_training_step(method, model, problem.loss_fn, hp,
                                  generator=torch.Generator(device=X.device).manual_seed(1), registry=registry)
    if X.device.type == "cuda":  # a step's time is the time until its kernels have run
        return model, lambda: (stepper.step(X, Y), torch.cuda.synchronize())
    return model, lambda: stepper.step(X, Y)


def stepper_for(problem, method_name: str, registry, X, Y, T1: int, T2: int, *, background: bool = False):
    """One step of ``method_name`` under schedule (T1, T2), as a callable (a fresh model each)."""
    return curvlib_optimizer(problem, method_name, registry, X, Y, T1, T2, background=background)[1]


def step_timer(problem, method_name: str, registry, X, Y, T1: int, T2: int, repeats: int) -> float:
    """Median time of the steps of ``method_name`` under schedule (T1, T2), from the second step on."""
    return median_time(stepper_for(problem, method_name, registry, X, Y, T1, T2), repeats)


def application_kernels(problem, registry, X, Y):
    """SGD's step followed by nothing but the application's two GEMMs per Linear layer
    (module docstring: the floor of a plain step), as a callable."""
    sgd = stepper_for(problem, "sgd", registry, X, Y, 1, 1)
    generator = torch.Generator(device=X.device).manual_seed(2)

    def random(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=generator, device=X.device)

    def spd(d: int) -> torch.Tensor:
        B = random(d, d) / d
        return row_aligned(B @ B.T + torch.eye(d, device=X.device))

    operands = [(spd(d_out), row_aligned(random(d_out, d_in + 1)), spd(d_in + 1))
                for d_in, d_out in linear_shapes(problem.model_fn(0))]

    def step() -> None:
        sgd()
        for G_inv, M, A_inv in operands:
            two_sided(G_inv, M, A_inv)
        if X.device.type == "cuda":
            torch.cuda.synchronize()
    return step


def cost_cells(ratio: dict, seconds: dict, name, T1: int, T2: int, limits: StepLimits | None,
               inverts: bool = True) -> list[str]:
    """plain, its limit, refresh, limit, refresh+invert, limit, amortized, limit, amortized [ms] of
    the step kinds ``(name, kind)`` in ``ratio``; without an inversion the refresh+invert kind
    is "n/a" and the refresh stands for it in the amortization."""
    plain, refresh = ratio[(name, "plain")], ratio[(name, "refresh")]
    full = ratio[(name, "full")] if inverts else refresh
    measured = amortized(plain, refresh, full, T1, T2)
    if limits is None:
        lim = ["-"] * 4
    else:
        lim_full = limits.full if inverts else limits.refresh
        lim = [fmt_ratio(limits.plain), fmt_ratio(limits.refresh), fmt_ratio(lim_full) if inverts else "n/a",
               fmt_ratio(amortized(limits.plain, limits.refresh, lim_full, T1, T2))]
    return [fmt_ratio(plain), lim[0], fmt_ratio(refresh), lim[1], fmt_ratio(full) if inverts else "n/a", lim[2],
            fmt_ratio(measured), lim[3], f"{measured * seconds['sgd'] * 1e3:.1f}"]


COST_HEADER = ["plain", "lim", "refresh", "lim", "refresh+invert", "lim", "amortized", "lim", "amortized [ms]"]


def part1(problem, registry, X, Y, methods, repeats: int, T1: int, T2: int,
          background: bool = False, warmup: int = 1) -> tuple[float, list[list[str]]]:
    """Every step kind of every method timed interleaved with SGD (one step of each per round;
    each ratio is the median over rounds of time / that round's SGD step), with the FLOP-model
    limits of the methods in :data:`FLOP_MODELS`; ``background``: also each method's
    refresh+invert step with ``background_inversion=True`` (its row "<name>, background")."""
    fns = {"sgd": stepper_for(problem, "sgd", registry, X, Y, 1, 1),
           "adam": stepper_for(problem, "adam", registry, X, Y, 1, 1),
           "kernels": application_kernels(problem, registry, X, Y)}
    failed = {}
    for name in methods:
        try:
            for kind, (t1, t2) in KINDS.items():
                fns[(name, kind)] = stepper_for(problem, name, registry, X, Y, t1, t2)
            if background:
                fns[(name, "background")] = stepper_for(problem, name, registry, X, Y, *KINDS["full"], background=True)
        except Exception as exc:  # report and go on: one method must not hide the others
            failed[name] = exc
    ratio, seconds = interleaved(fns, max(repeats, 5), reference="sgd", warmup=warmup)
    sgd = seconds["sgd"]
    adam = fmt_ratio(ratio["adam"])
    rows = [["sgd", "1.00", "1.00", "-", "-", "-", "-", "1.00", "1.00", f"{sgd * 1e3:.1f}"],
            ["adam", adam, "-", "-", "-", "-", "-", adam, "-", f"{seconds['adam'] * 1e3:.1f}"]]
    shapes = linear_shapes(problem.model_fn(0))
    plain_limit = step_limits(CURVLIB_KFAC, shapes, X.shape[0]).plain
    rows.append(["sgd + application GEMMs", fmt_ratio(ratio["kernels"]), fmt_ratio(plain_limit), *["-"] * 6,
                 f"{seconds['kernels'] * 1e3:.1f}"])
    for name in methods:
        if name in failed:
            exc = failed[name]
            print(f"  {name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append([name, "error", *[""] * 7, type(exc).__name__])
            continue
        limits = step_limits(FLOP_MODELS[name], shapes, X.shape[0]) if name in FLOP_MODELS else None
        rows.append([name, *cost_cells(ratio, seconds, name, T1, T2, limits)])
        if background:  # the inversion off the step's path: its limit is the refresh's
            bg = f"{name}, background"
            ratio.update({(bg, "plain"): ratio[(name, "plain")], (bg, "refresh"): ratio[(name, "refresh")],
                          (bg, "full"): ratio[(name, "background")]})
            rows.append([bg, *cost_cells(ratio, seconds, bg, T1, T2, limits and StepLimits(
                limits.plain, limits.refresh, limits.refresh))])
        print(f"  {name}: plain {seconds[(name, 'plain')] * 1e3:.1f} ms, refresh {seconds[(name, 'refresh')] * 1e3:.1f} ms, "
              f"refresh+invert {seconds[(name, 'full')] * 1e3:.1f} ms", flush=True)
    return sgd, rows


# --------------------------------------------------------------------------- part 2


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def curvlib_factors(model, loss_fn, X, Y, kind: str, registry, generator=None, *,
                    checks: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A [d_in+1, d_in+1], G [d_out, d_out]) per Linear layer, curvlib's KFAC; ``checks=False``:
    without the per-sample check and the loss gradient (two backward passes the peers do not run)."""
    from curvlib.approximators.api import approximate
    from curvlib.curvatures.api import curvature

    options = {"mc_samples": 1} if kind == "fisher" else {}
    if not checks:
        options.update(check_samples=False, loss_gradient=False)
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
    t_checked = median_time(lambda: curvlib_factors(model, loss_fn, X, Y, kind, registry, gen), repeats)
    t_curvlib = median_time(lambda: curvlib_factors(model, loss_fn, X, Y, kind, registry, gen, checks=False), repeats)
    rows = [[f"curvlib ({loss})", f"curvature('{kind}', check_samples=False, loss_gradient=False) + approximate('kfac')",
             f"{t_curvlib / sgd:.2f}", "1.00", f"{t_curvlib * 1e3:.1f}"],
            [f"curvlib ({loss})", f"curvature('{kind}') + approximate('kfac') (per-sample check, ∇L)",
             f"{t_checked / sgd:.2f}", f"{t_checked / t_curvlib:.2f}", f"{t_checked * 1e3:.1f}"]]
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


# --------------------------------------------------------------------------- part 3


def peer_optimizer(problem, peer: PeerOptimizer, X, Y, T1: int, T2: int, lr: float = TIMING_LR):
    """A fresh model and one step of ``peer`` on it under schedule (T1, T2), as a callable."""
    model = problem.model_fn(0)
    step = peer.build(model, problem.loss_fn, X, Y, Schedule(T1=T1, T2=T2, lam=DAMPING, lr=lr),
                      torch.Generator().manual_seed(1))
    return model, step


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one vector ``[n_params]`` (a copy)."""
    return torch.cat([p.detach().flatten() for p in model.parameters()]).clone()


def step_direction(model: nn.Module, step, lr: float) -> torch.Tensor:
    """d = (θ_before − θ_after) / lr of one call of ``step`` ``[n_params]``."""
    before = flat_parameters(model)
    step()
    return (before - flat_parameters(model)) / lr


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u.double() @ v.double() / (u.double().norm() * v.double().norm()).clamp_min(1e-300))


def part3_check(problem, registry, X, Y, peers: list[PeerOptimizer]) -> tuple[list[list[str]], list[PeerOptimizer]]:
    """One refresh+invert step of each peer from the initial weights: the parameters must
    change, stay finite and move along d with cos(d, ∇L) > 0; returns the rows and the
    peers that pass (module docstring)."""
    model = problem.model_fn(0)
    problem.loss_fn(model(X), Y).backward()
    gradient = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference = step_direction(*curvlib_optimizer(problem, "kfac", registry, X, Y, 1, 1, lr=CHECK_LR), CHECK_LR)
    candidates = [("curvlib kfac", None, reference)]
    rows, passed = [], []
    for peer in peers:
        try:
            candidates.append((peer.name, peer, step_direction(*peer_optimizer(problem, peer, X, Y, 1, 1, CHECK_LR),
                                                               CHECK_LR)))
        except Exception as exc:  # report and go on: one peer must not hide the others
            rows.append([peer.name, "error", "", "", "", f"{type(exc).__name__}: {exc}"[:100]])
    for name, peer, d in candidates:
        finite, moved = bool(torch.isfinite(d).all()), bool(d.abs().max() > 0)
        cos_g, cos_ref = cosine(d, gradient), cosine(d, reference)
        ok = finite and moved and cos_g > 0
        rows.append([name, f"{float(d.norm()):.3g}", "yes" if finite else "NO", f"{cos_g:.3f}", f"{cos_ref:.3f}",
                     "ok" if ok else "FAILED: not timed"])
        if ok and peer is not None:
            passed.append(peer)
    return rows, passed


def part3_time(problem, registry, X, Y, peers: list[PeerOptimizer], repeats: int, T1: int,
               T2: int, warmup: int = 1) -> list[list[str]]:
    """The step kinds of SGD, curvlib's ``kfac`` and every peer timed interleaved (one step of
    each per round, ratios to that round's SGD step), with their FLOP-model limits."""
    fns = {"sgd": stepper_for(problem, "sgd", registry, X, Y, 1, 1)}
    for kind, (t1, t2) in KINDS.items():
        fns[("curvlib kfac", kind)] = stepper_for(problem, "kfac", registry, X, Y, t1, t2)
    failed = {}
    for peer in peers:
        try:
            for kind, (t1, t2) in KINDS.items():
                if kind != "full" or peer.inverts:
                    fns[(peer.name, kind)] = peer_optimizer(problem, peer, X, Y, t1, t2)[1]
        except Exception as exc:  # report and go on: one peer must not hide the others
            failed[peer.name] = exc
            for kind in KINDS:
                fns.pop((peer.name, kind), None)
    ratio, seconds = interleaved(fns, max(repeats, 5), reference="sgd", warmup=warmup)
    shapes, m = linear_shapes(problem.model_fn(0)), X.shape[0]
    rows = [["sgd", "1.00", "1.00", "-", "-", "-", "-", "1.00", "1.00", f"{seconds['sgd'] * 1e3:.1f}"],
            ["curvlib kfac", *cost_cells(ratio, seconds, "curvlib kfac", T1, T2, step_limits(CURVLIB_KFAC, shapes, m))]]
    for peer in peers:
        if peer.name in failed:
            exc = failed[peer.name]
            rows.append([peer.name, "error", *[""] * 7, f"{type(exc).__name__}: {exc}"[:60]])
            continue
        limits = step_limits(peer.algorithm, shapes, m)
        rows.append([peer.name, *cost_cells(ratio, seconds, peer.name, T1, T2, limits, inverts=peer.inverts)])
    return rows


# --------------------------------------------------------------------------- main


def run_part2(args, problem, registry, X, sgd: float) -> None:
    """[2a]–[2c]: KFAC factors of curvlib and of the installed factor peers, checked then timed."""
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


def run_part3(args, problem, registry, X, Y) -> None:
    """[3a]–[3b]: the installed peers' optimizer steps, checked then timed with curvlib's kfac."""
    peers, missing = installed(PEERS)
    for module in missing:
        print(f"\npeer optimizer {module} ({DISTRIBUTIONS[module]}): not installed, skipped")
    if not peers:
        return
    print(f"\n[3a] one refresh+invert step of each optimizer from the same weights (lr {CHECK_LR:g}, λ {DAMPING:g}): "
          "‖d‖ of d = −Δθ/lr, finite, cos(d, ∇L), cos(d, curvlib's d)", flush=True)
    rows, peers = part3_check(problem, registry, X, Y, peers)
    print(table(["optimizer", "‖d‖", "finite", "cos(d, ∇L)", "cos(d, d_curvlib)", "check"], rows))
    T1, T2 = args.update_every, args.invert_every
    print(f"\n[3b] peers' optimizer steps relative to one SGD step, interleaved with curvlib's kfac (T1 = {T1}, "
          f"T2 = {T2}, λ {DAMPING:g}, 1 MC sample, batch {X.shape[0]}); lim = FLOP-model limit", flush=True)
    rows = part3_time(problem, registry, X, Y, peers, args.repeats, T1, T2, args.warmup)
    print(table(["optimizer", *COST_HEADER], rows))
    for peer in peers:
        print(f"  {peer.name}: {peer.summary}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--check-batch", type=int, default=16, help="batch of the exact-GGN factor check")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed interleaved rounds before the timed ones in parts 1 and 3: a process that "
                        "holds several optimizers reaches its steady heap only after a few rounds, and until then "
                        "the matrices of an inversion can land on fresh pages and page-fault")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--invert-every", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--skip-peers", action="store_true", help="skip parts 2 and 3")
    parser.add_argument("--skip-peer-factors", action="store_true", help="skip part 2")
    parser.add_argument("--skip-peer-steps", action="store_true", help="skip part 3")
    parser.add_argument("--peer-losses", nargs="+", choices=tuple(LOSSES), default=["bce", "mse"],
                        help="losses of the peer comparison: the problem's BCE, and squared error on the same "
                        "network (BackPACK supports BCEWithLogitsLoss only for scalar outputs)")
    parser.add_argument("--skip-methods", action="store_true")
    parser.add_argument("--background", action="store_true",
                        help="part 1 also times each method's refresh+invert step with background_inversion=True "
                        "(the inversion in a worker thread, installed at the next step)")
    parser.add_argument("--small", action="store_true", help="the shrunk auto-encoder (a quick smoke run)")
    parser.add_argument("--path", help=PATH_HELP)
    parser.add_argument("--device", default="cpu",
                        help="where part 1 runs (e.g. cuda: every step ends with torch.cuda.synchronize()); "
                        "the peers (parts 2 and 3) run on the CPU only and are skipped on another device")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    problem = PROBLEMS["mnist_autoencoder"](small=args.small, seed=0, path=args.path)
    device = torch.device(args.device)
    X = problem.dataset.X_train[: args.batch].to(device)
    Y = X
    registry = load_registry()
    where = "CPU" if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    print(f"MNIST auto-encoder {'-'.join(map(str, problem.widths))}, batch {X.shape[0]}, float32, {where}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")

    sgd = step_timer(problem, "sgd", registry, X, Y, 1, 1, max(args.repeats, 5))
    if not args.skip_methods:
        T1, T2 = args.update_every, args.invert_every
        print(f"\n[1] one optimizer step relative to one SGD step (T1 = {T1}, T2 = {T2}; amortized over T1, T2; "
              "lim = FLOP-model limit)", flush=True)
        sgd, rows = part1(problem, registry, X, Y, args.methods, args.repeats, T1, T2, args.background, args.warmup)
        print(table(["method", *COST_HEADER], rows))

    if args.skip_peers or device.type != "cpu":
        return
    if not args.skip_peer_factors:
        run_part2(args, problem, registry, X, sgd)
    if not args.skip_peer_steps:
        run_part3(args, problem, registry, X, Y)


if __name__ == "__main__":
    main()
