"""Shared pytest configuration: a deterministic hypothesis profile by default
(set HYPOTHESIS_PROFILE=explore for random, longer runs)."""

from __future__ import annotations

import os

import pytest
import torch

from curvlib.testing.strategies import load_profile

# the same profiles plugin authors load (curvlib.testing.strategies.load_profile)
load_profile()

# The test tensors are tiny: one intra-op thread is faster than two, and far faster when
# the two cores are shared with other work.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda`` tests without a CUDA device, and ``slow`` tests unless asked for
    (``-m slow`` or ``CURVLIB_RUN_SLOW=1``)."""
    run_slow = "slow" in (config.getoption("-m") or "") or bool(os.environ.get("CURVLIB_RUN_SLOW"))
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_slow = pytest.mark.skip(reason="slow check: run with -m slow or CURVLIB_RUN_SLOW=1")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def registry():
    """curvlib's built-in kinds only (no third-party entry points); a module may define its own."""
    from curvlib.plugins import load_registry

    return load_registry(external=False)
