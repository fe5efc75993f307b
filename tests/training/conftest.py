"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenized-data cache shared by every training test (tokenize once)."""
    return tmp_path_factory.mktemp("data-cache")
