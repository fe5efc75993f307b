"""Fixtures for the model tests: small random TTT language models of every variant."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from ttt_model_helpers import VARIANTS, build_model

from ttt.models import TTTForCausalLM


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """2-core CI: one intra-op thread per pytest worker for these tiny models avoids oversubscription
    (tiny ops become ~100x slower when another process competes for the cores). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_model() -> Callable[..., TTTForCausalLM]:
    return build_model


@pytest.fixture(params=VARIANTS, ids=[f"{t}-{b}" for t, b in VARIANTS])
def variant(request) -> tuple[str, str]:
    """(ttt_layer_type, backbone) for all four combinations."""
    return request.param
