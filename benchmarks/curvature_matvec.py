"""Cost of one exact Fisher-vector product F·v against one forward+backward pass.

The network is the thesis's MNIST auto-encoder (appendix 3.D, problem 1):
784-1000-500-250-30-250-500-1000-784 Linear layers, ReLU (or sigmoid) hidden activations,
Bernoulli output (``BCEWithLogitsLoss`` on the logits — the same model as a sigmoid output
with ``BCELoss``), float32 on the CPU, random inputs in [0, 1] (the inputs are the targets).

Measured in the same run, median of ``--repeats`` timings after one warm-up:

- ``fwd+bwd``: ``loss = loss_fn(model(X), X); loss.backward()``;
- ``capture``: ``curvlib.curvature("fisher", ..., mc_samples=1)`` — one hooked forward,
  one backward for ∇L, one backward for the sampled column;
- ``F @ v``: one product with the captured operator (no model re-run).

Ratios to ``fwd+bwd`` are printed (absolute times only for context).  Usage::

    python benchmarks/curvature_matvec.py [--batch 512] [--repeats 7] [--activation relu]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from curvlib.curvatures.api import curvature
from curvlib.plugins import load_registry

from _common import median_time  # benchmarks/_common.py (this folder is on sys.path)

SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


def autoencoder(activation: str) -> nn.Sequential:
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[activation]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(SIZES) - 2:
            layers.append(act())
    return nn.Sequential(*layers)



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--activation", choices=("relu", "sigmoid"), default="relu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = autoencoder(args.activation)
    loss_fn = nn.BCEWithLogitsLoss()
    gen = torch.Generator().manual_seed(args.seed)
    X = torch.rand(args.batch, SIZES[0], generator=gen)
    registry = load_registry()

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), X).backward()

    def capture():
        return curvature("fisher", model, loss_fn, (X, X), mc_samples=1, generator=gen, registry=registry)

    F = capture()
    v = torch.randn(F.p, generator=gen)

    t_fb = median_time(fwd_bwd, args.repeats)
    t_cap = median_time(capture, args.repeats)
    t_mv = median_time(lambda: F @ v, args.repeats)
    model.zero_grad(set_to_none=True)

    print(f"MNIST auto-encoder {'-'.join(map(str, SIZES))} ({args.activation}), p = {F.p:,}, batch {args.batch}, "
          f"float32, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"  fwd+bwd            {t_fb * 1e3:9.2f} ms   ratio 1.00")
    print(f"  capture (fisher)   {t_cap * 1e3:9.2f} ms   ratio {t_cap / t_fb:5.2f}")
    print(f"  F @ v              {t_mv * 1e3:9.2f} ms   ratio {t_mv / t_fb:5.2f}")
    print(f"  capture + F @ v    {(t_cap + t_mv) * 1e3:9.2f} ms   ratio {(t_cap + t_mv) / t_fb:5.2f}")


if __name__ == "__main__":
    main()
