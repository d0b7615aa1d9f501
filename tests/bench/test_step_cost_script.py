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
    for module in ("asdl", "kfac", "curvlinops", "singd"):
        assert f"peer optimizer {module} (" in out or "[3b]" in out
