"""Streaming: any prompt length, any prefill chunking, then decoding == one full forward."""

from __future__ import annotations

import pytest
import torch
from ttt_model_helpers import VOCAB

from ttt.models import CACHE_KEY, TTTCache

# every test here runs once per CPU scan backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("scan_backend")

ATOL = 1e-4


def _stream(model, x: torch.Tensor, splits: list[int]) -> torch.Tensor:
    cache = TTTCache()
    outs, start = [], 0
    for n in splits:
        out = model(x[:, start:start + n], cache=cache, use_cache=True)
        assert getattr(out, CACHE_KEY) is cache
        outs.append(out.logits)
        start += n
    assert cache.get_seq_length() == x.shape[1]
    return torch.cat(outs, 1)


@torch.no_grad()
@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 11])
def test_any_prompt_length_then_decode_equals_full_forward(make_model, variant, prompt_len) -> None:
    model = make_model(*variant)
    total = prompt_len + 6
    x = torch.randint(0, VOCAB, (2, total))
    full = model(x, use_cache=False).logits
    streamed = _stream(model, x, [prompt_len] + [1] * 6)
    torch.testing.assert_close(streamed, full, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("splits", [[1] * 13, [2, 3, 1, 7], [5, 8], [4, 4, 4, 1], [7, 1, 1, 1, 3]])
def test_any_prefill_chunking_equals_full_forward(make_model, variant, splits) -> None:
    model = make_model(*variant)
    x = torch.randint(0, VOCAB, (2, sum(splits)))
    full = model(x, use_cache=False).logits
    torch.testing.assert_close(_stream(model, x, splits), full, atol=ATOL, rtol=0)


@torch.no_grad()
def test_cache_memory_is_constant_in_context_length(make_model) -> None:
    model = make_model("mlp", "mamba")
    sizes = []
    for length in (3, 17, 64):
        cache = getattr(model(torch.randint(0, VOCAB, (2, length)), use_cache=True), CACHE_KEY)
        sizes.append(cache.memory_bytes())
        assert cache.seen_tokens == length
    assert sizes[0] == sizes[1] == sizes[2] > 0


@torch.no_grad()
def test_cache_reorder_and_index_select(make_model) -> None:
    model = make_model("linear", "mamba")
    x = torch.randint(0, VOCAB, (3, 9))
    cache = getattr(model(x, use_cache=True), CACHE_KEY)
    nxt = torch.randint(0, VOCAB, (3, 1))
    ref = model(nxt, cache=cache.clone()).logits
    picked = cache.index_select(torch.tensor([2, 0]))
    assert picked.batch_size == 2 and cache.batch_size == 3
    torch.testing.assert_close(model(nxt[[2, 0]], cache=picked).logits, ref[[2, 0]])
    cache.reorder_cache(torch.tensor([1, 1, 0]))
    torch.testing.assert_close(model(nxt[[1, 1, 0]], cache=cache).logits, ref[[1, 1, 0]])


def test_cache_with_grad_detach_and_tbptt(make_model) -> None:
    """A training loop may carry the cache across segments (truncated BPTT) and detach it."""
    model = make_model().train()
    x = torch.randint(0, VOCAB, (2, 12))
    cache = TTTCache()
    out = model(x[:, :6], labels=x[:, :6], cache=cache, use_cache=True)
    out.loss.backward()
    cache.detach()
    out = model(x[:, 6:], labels=x[:, 6:], cache=cache, use_cache=True)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@torch.no_grad()
def test_default_mini_batch_16_streaming_across_boundaries(variant) -> None:
    """The paper's mini-batch size 16 with a prompt and chunks that straddle mini-batch boundaries."""
    from ttt_model_helpers import build_model

    model = build_model(*variant, mini_batch_size=16, hidden_size=64, num_attention_heads=4)
    x = torch.randint(0, VOCAB, (2, 53))
    full = model(x, use_cache=False).logits
    torch.testing.assert_close(_stream(model, x, [15, 1, 17, 1, 1, 2, 16]), full, atol=ATOL, rtol=0)


@pytest.mark.slow
@torch.no_grad()
def test_mini_preset_long_prompt_random_chunks(variant) -> None:
    from ttt.models import TTTForCausalLM, get_config

    model = TTTForCausalLM(get_config("mini", ttt_layer_type=variant[0], backbone=variant[1])).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.config.vocab_size, (2, 300), generator=gen)
    full = model(x, use_cache=False).logits
    splits, left = [], 300
    while left:
        n = min(left, int(torch.randint(1, 40, (1,), generator=gen)))
        splits.append(n)
        left -= n
    torch.testing.assert_close(_stream(model, x, splits), full, atol=ATOL, rtol=0)
