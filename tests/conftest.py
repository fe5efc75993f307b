"""Shared pytest setup: deterministic seeds, one torch thread per test process.

The suite runs as 2 xdist workers on 2 cores; letting each worker spawn 2 OpenMP threads
oversubscribes the CPU and makes small ops tens of times slower.
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _compiled_scan() -> None:
    """Build (or load) the compiled CPU scan once, before any test: later subprocess tests then find
    it in the cache instead of compiling it under their own timeouts."""
    from ttt.ops.scan import get_backend

    get_backend("cpp")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
