"""The symmetric kernels behind every KFAC factor and Gram-space fit — the symmetric product
Xᵀ X (``linalg.rows.symmetric_product``) and the quadratic forms x_iᵀ M x_i
(``linalg.zproducts._quadratic_forms``) — split in blocks against one GEMM, on one device.

``linalg.rows.split_symmetric`` splits a kernel of width d ≥ ``SYMMETRIC_BLOCKS_FROM`` (192)
in blocks on the CPU only: the blocks save multiply-adds (5/8 of a GEMM's at two levels)
at the price of more, smaller GEMMs and block copies, and on an accelerator each block is a
kernel launch.  This script measures both choices wherever it runs, so that the rule can be
checked on a GPU (``benchmarks/gpu_check.sh`` runs it with ``--device cuda``).

For each width d and each kernel, three variants are timed interleaved (``interleaved`` of
``_common``: A B C A B C …, ``--repeats`` rounds after one untimed call each, medians of the
ratios within a round): ``rule`` (what curvlib does on this device), ``one GEMM`` and
``blocked`` (the CPU's blocking forced).  On CUDA every call ends with
``torch.cuda.synchronize()``.  The variants' results are checked against each other.

Usage::

    python benchmarks/symmetric_kernels.py [--device cuda] [--rows 512] [--repeats 15] [--threads 1]
        [--widths 251 501 785 1001 2048]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

import torch

import curvlib.linalg.rows as rows
import curvlib.linalg.zproducts as zproducts

from _common import interleaved

#: the variants: name -> split rule (None: curvlib's own)
RULES: dict[str, Callable[[torch.Tensor, int], bool] | None] = {
    "rule": None,
    "one GEMM": lambda t, d: False,
    "blocked": lambda t, d: d >= rows.SYMMETRIC_BLOCKS_FROM,
}


@contextlib.contextmanager
def splitting(rule: Callable[[torch.Tensor, int], bool] | None) -> Iterator[None]:
    """Both kernels split by ``rule`` inside the block (curvlib's rule when ``None``)."""
    if rule is None:
        yield
        return
    saved = rows.split_symmetric, zproducts.split_symmetric
    rows.split_symmetric = zproducts.split_symmetric = rule
    try:
        yield
    finally:
        rows.split_symmetric, zproducts.split_symmetric = saved


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rows", type=int, default=512, help="n, the rows of X (the batch)")
    parser.add_argument("--widths", type=int, nargs="+", default=[251, 501, 785, 1001])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(0)
    print(f"X [{args.rows}, d], float32, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f", {torch.get_num_threads()} thread(s)")
          + f", torch {torch.__version__}; SYMMETRIC_BLOCKS_FROM = {rows.SYMMETRIC_BLOCKS_FROM}; "
          f"median of {args.repeats} interleaved rounds, time ÷ the rule's in the same round")
    header = f"{'kernel':<16} {'d':>5}  " + "  ".join(f"{name:>16}" for name in RULES) + "   splits here"
    print(header)
    print("-" * len(header))
    for d in args.widths:
        X = torch.randn(args.rows, d, generator=gen, device=device)
        M = torch.randn(1, d, d, generator=gen, device=device)
        kernels = {
            "XᵀX": lambda: rows.symmetric_product(X.T, X),
            "x_iᵀ M x_i": lambda: zproducts._quadratic_forms(X, M),
        }
        for kernel, fn in kernels.items():
            results = {}

            def variant(name: str, rule=None, fn=fn) -> Callable[[], None]:
                def call() -> None:
                    with splitting(rule):
                        results[name] = fn()
                    sync()
                return call

            calls = {name: variant(name, rule) for name, rule in RULES.items()}
            ratios, seconds = interleaved(calls, args.repeats, reference="rule")
            reference = results["one GEMM"].double()
            for name, out in results.items():
                gap = float((out.double() - reference).abs().max() / reference.abs().max())
                if gap > 1e-4:
                    raise SystemExit(f"{kernel}, d = {d}: '{name}' differs from one GEMM by {gap:.1e}")
            cells = "  ".join(f"{seconds[name] * 1e3:8.3f} ms {ratios[name]:5.2f}" for name in RULES)
            print(f"{kernel:<16} {d:>5}  {cells}   {rows.split_symmetric(X, d)}")


if __name__ == "__main__":
    main()
