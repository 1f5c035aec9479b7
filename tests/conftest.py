"""Shared fixtures (everything offline, CPU)."""

import os

import pytest
import torch

# One thread per pytest-xdist worker when the workers fill the cores: two workers of two threads
# each on two cores oversubscribe them, and OpenMP's spinning then makes small ops 10-50x slower
# (a float64 densenet264 check: 0.5 s alone, 28 s beside another worker).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))

torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
