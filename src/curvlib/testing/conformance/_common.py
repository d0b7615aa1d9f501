"""Helpers every family's checks share: the devices and dtypes they run on, failure
messages, random inputs from a seed, and the rounding bound of a dense product."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytest
import torch

from curvlib.errors import PerformanceWarning

#: The devices every dtype/device check runs on: the CPU, and CUDA (``cuda`` marker,
#: skipped without a device).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=(pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
        id="cuda",
    ),
]

_DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]


def _expect(condition: bool, message: str) -> None:
    """Fail with ``message`` (which says what was expected and what came) unless ``condition``."""
    if not condition:
        raise AssertionError(message)


class _NoPerformanceWarnings:
    """``with _NoPerformanceWarnings():`` — dense exports of tiny test matrices are expected."""

    def __enter__(self) -> None:
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", PerformanceWarning)

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)


def _random(shape: Sequence[int], seed: int, like: torch.Tensor) -> torch.Tensor:
    """Standard normal entries ``[*shape]`` drawn in float64 from ``seed``, in ``like``'s dtype/device."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=like.dtype, device=like.device)


def _product_atol(D: torch.Tensor, V: torch.Tensor) -> float:
    """Rounding bound of D·V in D's dtype: c·eps·max_i Σ_j |D_ij||V_j|."""
    eps = torch.finfo(D.dtype).eps
    bound = (D.abs().to(torch.float64) @ V.abs().to(torch.float64)).max().item() if D.numel() else 0.0
    return 64 * eps * max(D.shape[0], 1) * bound

