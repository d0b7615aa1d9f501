"""Shared fixtures of the benchmark tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny problems run fastest on one thread (and immune to a loaded machine); a run that
    sets its own thread count (``BenchConfig.threads``) cannot leak it into the next test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
