"""KFAC training steps with the inversion in place against ``background_inversion=True`` (the
inversion in a worker thread, on a side CUDA stream on a GPU, installed at the next step), on
the thesis's MNIST auto-encoder (784-1000-500-250-30-250-500-1000-784, batch 512, float32).

Both optimizers start from the same weights and take the same batches.  They are timed
interleaved: one block of T2 steps (one inversion each) of the in-place optimizer, then one of
the background one, ``--rounds`` times after one untimed block each; every block ends with
``torch.cuda.synchronize()`` on a GPU.  Printed: the median step time of each, the ratio
(background ÷ in place, median over rounds of the blocks' ratios), and both training losses
at the end: the background schedule applies each inverse one step later, so the two runs
differ slightly.

Usage::

    python benchmarks/background_inversion.py [--device cuda] [--rounds 10] [--threads 1]
        [--update-every 1] [--invert-every 10] [--small]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from curvlib.optim import NaturalGradient
from curvlib.plugins import load_registry

from _common import autoencoder_on_device


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--update-every", type=int, default=1)
    parser.add_argument("--invert-every", type=int, default=10)
    args, problem, X = autoencoder_on_device(parser, argv)
    device = args.device
    registry = load_registry()
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    T1, T2 = args.update_every, args.invert_every
    runs = {}
    for name, background in (("in place", False), ("background", True)):
        model = problem.model_fn(0).to(device)
        cfg = {"update_every": T1, "invert_every": T2, "background_inversion": background}
        opt = NaturalGradient(model, problem.loss_fn, cfg, lr=0.1, momentum=0.9, kl_clip=1e-3, registry=registry,
                              generator=torch.Generator(device=device).manual_seed(1))
        runs[name] = (model, opt)

    def block(name: str) -> float:
        model, opt = runs[name]
        t0 = time.perf_counter()
        for _ in range(T2):
            opt.zero_grad(set_to_none=True)
            loss = problem.loss_fn(model(X), X)
            loss.backward()
            opt.step(batch=(X, X))
        sync()
        return (time.perf_counter() - t0) / T2

    where = "CPU" if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    print(f"MNIST auto-encoder {'-'.join(map(str, problem.widths))}, batch {X.shape[0]}, float32, {where}, "
          f"{torch.get_num_threads()} threads, T1 = {T1}, T2 = {T2}, torch {torch.__version__}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in runs:
            block(name)  # warm-up: the first inversion (in place for both) and allocations
        for _ in range(args.rounds):
            for name in runs:
                times[name].append(block(name))
        with torch.no_grad():
            losses = {name: float(problem.loss_fn(model(X), X)) for name, (model, _) in runs.items()}
    ratio = statistics.median(b / s for b, s in zip(times["background"], times["in place"]))
    for name in runs:
        print(f"{name:>10}: {statistics.median(times[name]) * 1e3:.2f} ms per step (median of {args.rounds} blocks of "
              f"{T2} steps), loss after {(args.rounds + 1) * T2} steps {losses[name]:.4f}")
    print(f"background ÷ in place: {ratio:.3f}")


if __name__ == "__main__":
    main()
