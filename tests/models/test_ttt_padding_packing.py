"""Padding (attention_mask) and packed documents (position_ids restarting at 0)."""

from __future__ import annotations

import pytest
import torch
from ttt_model_helpers import VOCAB

from ttt.models import CACHE_KEY, TTTCache
from ttt.ops.layout import build_layout, document_starts, real_token_mask

# every test here runs once per CPU scan backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("scan_backend")

ATOL = 1e-4


# ----------------------------------------------------------------------------- layout helpers
def test_layout_identity_is_none_and_pack_unpack_roundtrip() -> None:
    assert build_layout(None, None, 2, 5) is None
    assert real_token_mask(torch.ones(2, 5), 2, 5) is None
    real = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 0, 1]], dtype=torch.bool)
    pos = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 1, 0, 0]])
    restarts = document_starts(pos, real, 2, 5)
    assert restarts.tolist() == [[False, False, False, False, True], [False, False, False, False, True]]
    layout = build_layout(real, restarts, 2, 5)
    assert layout.lengths.tolist() == [2, 1, 2, 1] and layout.rows.tolist() == [0, 0, 1, 1]
    assert layout.first.tolist() == [True, False, True, False] and layout.last_segment.tolist() == [1, 3]
    x = torch.arange(10.0).view(2, 5, 1)
    packed = layout.pack(x)
    assert packed[..., 0].tolist() == [[2, 3], [4, 0], [5, 7], [9, 0]]
    back = layout.unpack(packed, fill=-1.0)
    assert back[..., 0].tolist() == [[-1, -1, 2, 3, 4], [5, -1, 7, -1, 9]]


def test_layout_keeps_empty_rows() -> None:
    real = torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    layout = build_layout(real, None, 2, 3)
    assert layout.lengths.tolist() == [0, 2] and layout.is_one_segment_per_row


# ----------------------------------------------------------------------------- padding
@torch.no_grad()
def test_left_padded_rows_equal_rows_alone(make_model, variant) -> None:
    model = make_model(*variant)
    lens = [13, 6, 9, 1]
    rows = [torch.randint(0, VOCAB, (1, n)) for n in lens]
    width = max(lens)
    ids = torch.zeros(len(lens), width, dtype=torch.long)
    mask = torch.zeros(len(lens), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - lens[i]:] = r
        mask[i, width - lens[i]:] = 1
    out = model(ids, attention_mask=mask)
    for i, r in enumerate(rows):
        alone = model(r).logits[0]
        torch.testing.assert_close(out.logits[i, width - lens[i]:], alone, atol=ATOL, rtol=0)
        assert torch.count_nonzero(out.logits[i, :width - lens[i]]) == 0  # padding positions: zero logits
    # the cache of the padded batch equals the caches of the rows alone (padding did not touch the state)
    for i, r in enumerate(rows):
        alone = getattr(model(r, use_cache=True), CACHE_KEY)
        for layer in range(len(alone)):
            a, b = alone.layer_states[layer], getattr(out, CACHE_KEY).layer_states[layer]
            assert int(b.inner.pos[i]) == int(a.inner.pos[0]) == lens[i] % 4
            torch.testing.assert_close(b.inner.W1[i], a.inner.W1[0], atol=ATOL, rtol=0)
            torch.testing.assert_close(b.inner.gW1[i], a.inner.gW1[0], atol=ATOL, rtol=0)
            if a.conv_q is not None:
                torch.testing.assert_close(b.conv_q[i], a.conv_q[0], atol=ATOL, rtol=0)
            if alone.conv_states[layer] is not None:
                torch.testing.assert_close(getattr(out, CACHE_KEY).conv_states[layer][i],
                                           alone.conv_states[layer][0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_padding_anywhere_is_skipped(make_model) -> None:
    model = make_model("mlp", "mamba")
    ids = torch.randint(0, VOCAB, (1, 10))
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1, 0]])
    out = model(ids, attention_mask=mask).logits
    alone = model(ids[mask.bool()].view(1, -1)).logits
    torch.testing.assert_close(out[mask.bool()], alone[0], atol=ATOL, rtol=0)


@torch.no_grad()
def test_padded_prefill_then_decode_with_cache(make_model, variant) -> None:
    """Left-padded prefill, then decoding with the growing HF-style mask == each row streamed alone."""
    model = make_model(*variant)
    lens = [7, 3]
    total = 5
    seqs = [torch.randint(0, VOCAB, (1, n + total)) for n in lens]
    width = max(lens)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, width - n:] = seqs[i][0, :n]
        mask[i, width - n:] = 1
    cache = TTTCache()
    logits = [model(ids, attention_mask=mask, cache=cache).logits[:, -1]]
    for t in range(total):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step = torch.stack([seqs[i][0, lens[i] + t] for i in range(2)]).view(2, 1)
        logits.append(model(step, attention_mask=mask, cache=cache).logits[:, -1])
    got = torch.stack(logits, 1)
    for i, n in enumerate(lens):
        full = model(seqs[i]).logits[0, n - 1:]
        torch.testing.assert_close(got[i], full, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- packing
def _packed(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).view(1, -1)


def test_packed_row_equals_documents_run_separately_forward_and_grads(make_model, variant) -> None:
    model = make_model(*variant).train()
    docs = [5, 1, 9, 4]
    x = torch.randint(0, VOCAB, (1, sum(docs)))
    weights = torch.randn(1, sum(docs), VOCAB)

    packed = model(x, position_ids=_packed(docs)).logits
    (packed * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    parts, start = [], 0
    for n in docs:
        parts.append(model(x[:, start:start + n]).logits)
        start += n
    separate = torch.cat(parts, 1)
    (separate * weights).sum().backward()
    torch.testing.assert_close(packed, separate, atol=ATOL, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


@torch.no_grad()
def test_packing_batched_rows_with_padding_and_broadcast_positions(make_model) -> None:
    model = make_model("linear", "mamba")
    x = torch.randint(0, VOCAB, (2, 12))
    pos = torch.stack([_packed([4, 8])[0], _packed([7, 5])[0]])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :2] = 0  # two padding tokens at the start of row 1's first document
    out = model(x, position_ids=pos, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out[0, 4:], model(x[:1, 4:]).logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, 2:7], model(x[1:, 2:7]).logits[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1, 7:], model(x[1:, 7:]).logits[0], atol=ATOL, rtol=0)
    # position_ids of shape [1, L] apply to every row
    shared = model(x, position_ids=_packed([3, 9])).logits
    torch.testing.assert_close(shared[:, 3:], model(x[:, 3:]).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_packing_with_cache_continues_last_document(make_model) -> None:
    """Defined behaviour: the row's first segment continues the cache; the cache returned is the state
    after the row's last document."""
    model = make_model("mlp", "mamba")
    x = torch.randint(0, VOCAB, (1, 15))
    cache = TTTCache()
    model(x[:, :4], cache=cache)  # document A, first 4 tokens
    out = model(x[:, 4:11], cache=cache, position_ids=torch.tensor([[4, 5, 6, 0, 1, 2, 3]])).logits
    # tokens 4..6 continue document A; tokens 7..10 start document B
    torch.testing.assert_close(out[:, :3], model(x[:, :7]).logits[:, 4:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[:, 3:], model(x[:, 7:11]).logits, atol=ATOL, rtol=0)
    nxt = model(x[:, 11:], cache=cache).logits  # continues document B
    torch.testing.assert_close(nxt, model(x[:, 7:]).logits[:, 4:], atol=ATOL, rtol=0)


def test_bad_position_ids_shape(make_model) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.randint(0, VOCAB, (2, 6)), position_ids=torch.zeros(3, 6, dtype=torch.long))


@torch.no_grad()
def test_cu_seqlens_equal_position_ids(make_model) -> None:
    model = make_model("mlp", "transformer")
    docs = [3, 6, 2]
    x = torch.randint(0, VOCAB, (1, sum(docs)))
    by_pos = model(x, position_ids=_packed(docs)).logits
    by_cu = model(x, cu_seq_lens_q=torch.tensor([0, 3, 9, 11], dtype=torch.int32), cu_seq_lens_k=None,
                  max_length_q=6).logits
    torch.testing.assert_close(by_cu, by_pos, rtol=0, atol=0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(x, cu_seqlens=torch.tensor([0, 4, 10]))
