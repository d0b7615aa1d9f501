"""Host synchronisations of one ``NaturalGradient.step`` on a GPU, by step kind, counted with
``torch.cuda.set_sync_debug_mode("warn")`` (every implicit device → host wait — ``.item()``,
``.tolist()``, ``bool(tensor)``, a copy to the CPU — warns once per occurrence).

Problem: the thesis's MNIST auto-encoder (784-1000-500-250-30-250-500-1000-784), batch 512,
float32, KFAC with the default π-split damping, KL clip 1e-3, one Monte Carlo sample.  Only
the optimizer's ``step`` is counted (the user's forward and backward are outside it).  Step
kinds as in ``step_cost.py``: plain (no curvature work), refresh (capture and refit),
refresh+invert (and the damped inverses rebuilt), and an inversion step with
``background_inversion=True`` (its inversion's synchronisations happen in the worker thread;
the sync debug mode is per process, so they are counted when they fall inside the step).

Usage::

    python benchmarks/host_syncs.py [--device cuda] [--batch 512] [--small]
"""

from __future__ import annotations

import argparse

import torch

from curvlib.optim import NaturalGradient
from curvlib.plugins import load_registry

from _common import autoencoder_on_device, host_syncs

NEVER = 10**9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, problem, X = autoencoder_on_device(parser, argv, device="cuda")
    device = args.device
    registry = load_registry()
    kinds = {"plain": (NEVER, NEVER, False), "refresh": (1, NEVER, False), "refresh+invert": (1, 1, False),
             "refresh+invert, background": (1, 1, True)}
    print(f"MNIST auto-encoder {'-'.join(map(str, problem.widths))}, batch {X.shape[0]}, float32, {device}, "
          f"torch {torch.__version__}: host synchronisations inside one NaturalGradient.step (KFAC)")
    for name, (T1, T2, background) in kinds.items():
        model = problem.model_fn(0).to(device)
        cfg = {"update_every": T1, "invert_every": T2, "background_inversion": background}
        opt = NaturalGradient(model, problem.loss_fn, cfg, lr=1e-6, kl_clip=1e-3, registry=registry,
                              generator=torch.Generator(device=device).manual_seed(1))
        counts = []
        for _ in range(3):  # the first step refreshes and inverts whatever the schedule: not counted
            opt.zero_grad(set_to_none=True)
            problem.loss_fn(model(X), X).backward()
            counts.append(host_syncs(lambda: opt.step(batch=(X, X))))
        print(f"  {name:>28}: {counts[1:]} (first step: {counts[0]})")


if __name__ == "__main__":
    main()
