"""``benchmarks/step_cost.py``: its FLOP model against hand counts, and a smoke run of the
script on the small auto-encoder (peers optional: absent ones are reported as skipped)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def test_flop_model_matches_hand_count(benchmarks_on_path):
    from _flops import CURVLIB_KFAC, EIGH, StepAlgorithm, amortized, step_limits

    # one Linear 2 -> 3, batch 4: d_a = 3, d_g = 3, SGD step 6·4·2·3 = 144 FLOPs
    limits = step_limits(CURVLIB_KFAC, [(2, 3)], 4)
    apply = 2 * 3 * 3 * (3 + 3)  # two GEMMs: 108
    capture = 2 * 4 * 2 * 3  # backward of the sampled targets to the outputs (no second forward): 48
    factors = 2 * 4 * (9 + 9)  # 144
    inversion = 1 * (27 + 27)  # Cholesky inverse of each damped factor: 54
    assert limits.plain == pytest.approx(1 + apply / 144)
    assert limits.refresh == pytest.approx(1 + (apply + capture + factors) / 144)
    assert limits.full == pytest.approx(1 + (apply + capture + factors + inversion) / 144)

    eigen = step_limits(StepAlgorithm(second_forward=False, sampled_backward=0, apply_gemms=4, inversion_cubic=EIGH),
                        [(2, 3)], 4)
    assert eigen.full - eigen.refresh == pytest.approx(9 * 54 / 144)
    assert amortized(1.0, 3.0, 5.0, 10, 100) == pytest.approx((90 * 1 + 9 * 3 + 5) / 100)


def test_nvtx_stub_makes_ranges_no_ops(benchmarks_on_path, monkeypatch):
    import torch.cuda.nvtx as nvtx
    from _peers import stub_cpu_nvtx

    for name in ("range_push", "range_pop", "mark"):
        monkeypatch.setattr(nvtx, name, getattr(nvtx, name))  # restored after the test
    stub_cpu_nvtx()
    with nvtx.range("works on a CPU-only torch too"):
        pass


def test_application_floor_runs_two_gemms_per_layer_after_sgd(benchmarks_on_path):
    """The floor row's step: SGD's step, then exactly two matrix products per Linear layer, of
    the inverses' shapes (G⁻¹ [d_out, d_out], A⁻¹ [d_in+1, d_in+1]) — and nothing else."""
    import torch
    from torch.overrides import TorchFunctionMode

    from curvlib.bench.problems import PROBLEMS
    from curvlib.plugins import load_registry
    from step_cost import application_kernels

    problem = PROBLEMS["mnist_autoencoder"](small=True)
    X = problem.dataset.X_train[:16]
    step = application_kernels(problem, load_registry(), X, X)
    products = []

    class Products(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("mm", "matmul", "__matmul__"):
                products.append((tuple(args[0].shape), tuple(args[1].shape)))
            return func(*args, **(kwargs or {}))

    with Products():
        step()
    widths = problem.widths
    square = sorted(a if a[0] == a[1] else b for a, b in products)  # each product's inverse operand
    assert square == sorted([(d, d) for d_in, d_out in zip(widths[:-1], widths[1:]) for d in (d_out, d_in + 1)])


def test_script_runs_on_the_small_autoencoder():
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_cost.py"), "--small", "--methods", "kfac", "--repeats", "1",
         "--batch", "64", "--threads", "1", "--skip-peer-factors"],
        capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "[1] one optimizer step" in out
    kfac_row = next(line for line in out.splitlines() if line.startswith("kfac "))
    assert kfac_row.split()[2] != "-", "curvlib's kfac prints its FLOP-model limit"
    floor_row = next(line for line in out.splitlines() if line.startswith("sgd + application GEMMs "))
    assert floor_row.split()[5] == kfac_row.split()[2], "the floor row's limit is KFAC's plain-step limit"
    assert float(floor_row.split()[4]) > 1.0
    for module in ("asdl", "kfac", "curvlinops", "singd"):
        assert f"peer optimizer {module} (" in out or "[3b]" in out
