"""The damped inversion of every layer at once (``HeuristicDamping.invert_many``: the damped
factors of equal shape in one batched Cholesky, two host synchronisations in all) against one
layer at a time (``HeuristicDamping.invert`` per layer), on the real KFAC factors of the
thesis's MNIST auto-encoder (784-1000-500-250-30-250-500-1000-784: three pairs of equal A
shapes and three of equal G shapes), float32, λ = 1e-3.

Timed interleaved (per layer, batched, per layer, … ``--repeats`` rounds after one untimed
call each; medians; the ratio is per layer ÷ batched in the same round).  On CUDA every call
ends with ``torch.cuda.synchronize()`` and the host synchronisations of one call are counted
with ``torch.cuda.set_sync_debug_mode("warn")``.  The two paths' directions are compared
(max relative difference): they run the same routine on the same matrices.

Usage::

    python benchmarks/batched_inversion.py [--device cuda] [--repeats 15] [--threads 1] [--small]
"""

from __future__ import annotations

import argparse
import warnings

import torch

from curvlib.approximators.api import approximate
from curvlib.curvatures.api import curvature
from curvlib.damping import HeuristicDamping
from curvlib.plugins import load_registry

from _common import autoencoder_on_device, host_syncs, interleaved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args, problem, X = autoencoder_on_device(parser, argv)
    device = args.device
    registry = load_registry()
    model = problem.model_fn(0).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F = curvature("fisher", model, problem.loss_fn, (X, X), generator=gen, registry=registry, mc_samples=1)
        blocks = list(approximate(F, "kfac", registry=registry).blocks)
    damping = HeuristicDamping(value=1e-3)
    none = [None] * len(blocks)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

    def per_layer():
        out = [damping.invert(b) for b in blocks]
        sync()
        return out

    def batched():
        out = damping.invert_many(blocks, none)
        sync()
        return out

    shapes = [(b.a_dim, b.b_dim) for b in blocks]
    print(f"MNIST auto-encoder {'-'.join(map(str, problem.widths))}, KFAC factors (d_a, d_g) = {shapes}, "
          f"float32, {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    worst = 0.0
    for one, many in zip(per_layer(), batched()):
        Z = torch.randn(1, one.b_dim, one.a_dim, device=device, generator=gen)
        ref = one.solve(Z)
        worst = max(worst, float((many.solve(Z) - ref).abs().max() / ref.abs().max()))
    ratio, seconds = interleaved({"per_layer": per_layer, "batched": batched}, args.repeats, reference="batched")
    print(f"per layer {seconds['per_layer'] * 1e3:.2f} ms, batched {seconds['batched'] * 1e3:.2f} ms, "
          f"per layer ÷ batched {ratio['per_layer']:.2f} (median of {args.repeats} interleaved rounds); "
          f"directions differ by {worst:.1e} (max relative)")
    if device.type == "cuda":
        n_alone = host_syncs(lambda: [damping.invert(b) for b in blocks])
        n_batched = host_syncs(lambda: damping.invert_many(blocks, none))
        print(f"host synchronisations per inversion of all {len(blocks)} layers: per layer {n_alone}, batched {n_batched}")


if __name__ == "__main__":
    main()
