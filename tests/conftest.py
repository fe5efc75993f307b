"""Shared pytest setup: deterministic seeds and a small thread count (CI has 2 cores)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
