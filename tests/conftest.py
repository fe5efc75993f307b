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


SCAN_BACKENDS = ("torch", "cpp")


@pytest.fixture(params=SCAN_BACKENDS)
def scan_backend(request, monkeypatch) -> str:
    """Run a test once per CPU scan backend (forced through ``TTT_SCAN_BACKEND``); the compiled one
    must be available here (it is built at session start), so a broken build fails instead of
    silently testing the fallback twice."""
    from ttt.ops.scan import backend_status

    if request.param != "torch":
        status = backend_status()[request.param]
        assert status == "available", f"scan backend {request.param!r} unavailable: {status}"
    monkeypatch.setenv("TTT_SCAN_BACKEND", request.param)
    return request.param
