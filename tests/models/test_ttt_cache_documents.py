"""Packed documents under a cache (a document may start at a chunk's first token) and the clear errors
of the layer/model contract: all-padding batches, batch size 0, a carried ``pos`` that does not fit, and
reentrant gradient checkpointing through a carried cache (issue 10, points 6 and 7)."""

from __future__ import annotations

import pytest
import torch
from ttt_model_helpers import VOCAB

from ttt.layers import TTTLayer
from ttt.models import TTTCache

# every test here runs once per CPU scan backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("scan_backend")

ATOL = 1e-4


def _packed_positions(length: int, starts: list[int]) -> torch.Tensor:
    """``position_ids [1, length]`` restarting at 0 at each index of ``starts`` (0 is always a start)."""
    pos, p = [], 0
    for t in range(length):
        p = 0 if t == 0 or t in starts else p + 1
        pos.append(p)
    return torch.tensor([pos])


def test_document_at_chunk_start_resets_state_repro(make_model) -> None:
    """Exact repro of the issue: a packed document starting at a chunk's first token did not reset the
    state (chunked != one call, max logit diff 0.76)."""
    model = make_model("linear", "transformer")
    x = torch.randint(0, VOCAB, (1, 12))
    pos = _packed_positions(12, [6])
    whole = model(x, position_ids=pos).logits
    cache = TTTCache()
    a = model(x[:, :6], position_ids=pos[:, :6], cache=cache).logits
    b = model(x[:, 6:], position_ids=pos[:, 6:], cache=cache).logits
    torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=ATOL, rtol=0)
    # and the second document alone, from a fresh state, is what the chunk computed
    torch.testing.assert_close(b, model(x[:, 6:]).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("ttt_type,backbone", [("linear", "mamba"), ("mlp", "transformer")])
def test_chunked_equals_one_call_for_every_split(make_model, ttt_type, backbone) -> None:
    """Every two-way split (including at document starts) of a packed row with two rows in the batch."""
    model = make_model(ttt_type, backbone)
    length = 13
    x = torch.randint(0, VOCAB, (2, length))
    pos = torch.cat([_packed_positions(length, [5, 9]), _packed_positions(length, [3, 8])])
    whole = model(x, position_ids=pos).logits
    for cut in range(1, length):
        cache = TTTCache()
        a = model(x[:, :cut], position_ids=pos[:, :cut], cache=cache).logits
        b = model(x[:, cut:], position_ids=pos[:, cut:], cache=cache).logits
        torch.testing.assert_close(torch.cat([a, b], 1), whole, atol=ATOL, rtol=0, msg=f"split at {cut}")


def test_fresh_row_with_left_padding(make_model) -> None:
    """Only the row whose first real token has position 0 restarts; padding before it is skipped."""
    model = make_model("linear", "mamba")
    x = torch.randint(0, VOCAB, (2, 10))
    cache = TTTCache()
    model(x[:, :4], cache=cache)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = torch.tensor([[1, 0, 1, 2, 3, 4], [4, 5, 6, 7, 8, 9]])
    out = model(x[:, 4:], cache=cache, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(out[0, 1:], model(x[:1, 5:]).logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], model(x[1:]).logits[0, 4:], atol=ATOL, rtol=0)


def test_all_padding_batch_is_an_error(make_model) -> None:
    model = make_model()
    x = torch.randint(0, VOCAB, (2, 5))
    with pytest.raises(ValueError, match="every token of the batch as padding"):
        model(x, attention_mask=torch.zeros(2, 5, dtype=torch.long))


def test_layer_contract_errors() -> None:
    layer = TTTLayer(16, 2, mini_batch_size=4)
    x = torch.randn(2, 6, 16)
    with pytest.raises(ValueError, match="lengths are all 0"):
        layer(x, None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 0"):
        layer(torch.randn(0, 6, 16))
    _, state = layer(x)
    assert state.inner.pos.tolist() == [2, 2]
    small = TTTLayer(16, 2, mini_batch_size=2)
    with pytest.raises(ValueError, match="does not fit this layer's mini_batch_size 2"):
        small(x, state)


def test_model_batch_size_zero(make_model) -> None:
    with pytest.raises(ValueError, match="batch size 0"):
        make_model()(torch.zeros(0, 4, dtype=torch.long))


def _tbptt_grads(model, x, kwargs: dict | None) -> list[torch.Tensor]:
    """Gradients of a two-chunk loss where the second chunk back-propagates into the carried cache."""
    model.zero_grad()
    model.train()
    if kwargs is None:
        model.gradient_checkpointing_disable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    cache = TTTCache()
    loss = model(x[:, :8], labels=x[:, :8], cache=cache, use_cache=True).loss
    loss = loss + model(x[:, 8:], labels=x[:, 8:], cache=cache, use_cache=True).loss
    loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_gradient_checkpointing_through_carried_cache(make_model) -> None:
    model = make_model("linear", "mamba")
    x = torch.randint(0, VOCAB, (2, 14))
    ref = _tbptt_grads(model, x, None)
    got = _tbptt_grads(model, x, {"use_reentrant": False})
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="reentrant gradient checkpointing"):
        _tbptt_grads(model, x, {"use_reentrant": True})
    # a detached cache (no gradient into it) is fine with reentrant checkpointing
    model.zero_grad()
    cache = TTTCache()
    model(x[:, :8], cache=cache, use_cache=True)
    cache.detach()
    model(x[:, 8:], labels=x[:, 8:], cache=cache, use_cache=True).loss.backward()
