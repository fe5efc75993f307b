"""Evaluation metrics: windows inside documents, loss by position, bits per byte, unigram baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from eval_helpers import synthetic_docs, tiny_llama

from ttt.evaluation import EvalResult, EvaluationError, document_windows, evaluate, unigram_baseline
from ttt.evaluation.metrics import bucket_positions, bucket_stderr, iter_documents, token_losses


def test_windows_stay_inside_documents() -> None:
    docs = [torch.arange(0, 50), torch.arange(100, 110), torch.arange(200, 260)]
    w = document_windows(docs, seq_len=20)
    assert w.shape == (2 + 3, 20)
    # every window is a contiguous run of one document (no boundary crossed)
    assert bool(((w[:, 1:] - w[:, :-1]) == 1).all())
    assert w[0, 0] == 0 and w[2, 0] == 200  # windows start at the document start


def test_max_windows_subsamples_deterministically() -> None:
    docs = synthetic_docs(n=10, length=100)
    a = document_windows(docs, 10, max_windows=7)
    b = document_windows(docs, 10, max_windows=7)
    assert a.shape[0] == 7 and torch.equal(a, b)


def test_context_longer_than_documents_is_a_clear_error() -> None:
    with pytest.raises(EvaluationError, match="longer than every evaluation document"):
        document_windows(synthetic_docs(n=2, length=50), seq_len=64)


def test_evaluate_matches_hf_loss_and_fields() -> None:
    model = tiny_llama()
    docs = synthetic_docs(n=3, length=64)
    res = evaluate(
        model, docs, seq_len=32, batch_size=4, num_buckets=8, bytes_per_token=1.0, bucket_spacing="linear"
    )
    windows = document_windows(docs, 32)
    with torch.no_grad():
        ref = model(input_ids=windows, labels=windows).loss.item()
    assert res.loss == pytest.approx(ref, rel=1e-5)
    assert res.num_windows == 6 and res.num_tokens == 6 * 31
    assert len(res.position_loss) == 31 and len(res.bucket_loss) == 8 and len(res.bucket_edges) == 9
    assert res.perplexity == pytest.approx(math.exp(res.loss))
    assert res.bits_per_byte == pytest.approx(res.loss / math.log(2))
    assert np.mean(res.position_loss) == pytest.approx(res.loss, rel=1e-6)
    d = res.to_dict()
    assert EvalResult.from_dict(d) == res
    assert all(math.isfinite(v) for v in d["bucket_loss"])


def test_bucket_stderr_is_the_standard_error_over_windows() -> None:
    model = tiny_llama()
    docs = synthetic_docs(n=3, length=64)
    res = evaluate(model, docs, seq_len=32, num_buckets=4, bucket_spacing="linear")
    losses = token_losses(model, document_windows(docs, 32)).double().numpy()
    assert len(res.bucket_stderr) == len(res.bucket_loss)
    for i, (a, b) in enumerate(zip(res.bucket_edges[:-1], res.bucket_edges[1:])):
        per_window = losses[:, a:b].mean(axis=1)  # one sample per window
        expected = per_window.std(ddof=1) / math.sqrt(len(per_window))
        assert res.bucket_stderr[i] == pytest.approx(expected, rel=1e-9)
        assert res.bucket_loss[i] == pytest.approx(per_window.mean(), rel=1e-9)
    # a single window has no spread to measure
    assert bucket_stderr(torch.ones(1, 8), [0, 4, 8]) == [0.0, 0.0]
    # an old result without the field still loads
    d = res.to_dict()
    d.pop("bucket_stderr")
    assert EvalResult.from_dict(d).bucket_stderr == []


def test_bits_per_byte_uses_tokenizer_bytes() -> None:
    class TwoBytesPerToken:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "ab" * len(ids)

    model = tiny_llama()
    res = evaluate(model, synthetic_docs(n=1, length=40), seq_len=40, tokenizer=TwoBytesPerToken())
    assert res.bytes_per_token == pytest.approx(2.0)
    assert res.bits_per_byte == pytest.approx(res.loss / 2 / math.log(2))


def test_loss_by_position_falls_with_context_on_repetitive_data() -> None:
    """A model trained on sequences whose second half repeats the first learns to use its context."""
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=16, width=32, layers=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        half = torch.randint(0, 16, (16, 16))
        x = torch.cat([half, half], dim=1)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    half = torch.randint(0, 16, (8, 16))
    docs = list(torch.cat([half, half], dim=1))
    res = evaluate(model, docs, seq_len=32, num_buckets=4)
    assert res.last_quarter_loss < res.first_quarter_loss - 0.5


def test_bucket_positions_and_token_losses_shapes() -> None:
    edges, means = bucket_positions([1.0, 2.0, 3.0, 4.0], 2, spacing="linear")
    assert edges == [0, 2, 4] and means == [1.5, 3.5]
    edges, means = bucket_positions(list(range(2047)), 32)  # log spacing: fine first, wide last
    assert edges[0] == 0 and edges[-1] == 2047 and edges[1] - edges[0] == 1 and len(means) <= 32
    assert edges[-1] - edges[-2] > 100
    edges, means = bucket_positions([1.0, 2.0], 8)  # more buckets than positions
    assert len(means) == 2
    # every bucket but the first position's holds >= min_width positions, and the means are exact
    curve = [float(i % 7) for i in range(2047)]
    edges, means = bucket_positions(curve, 32, min_width=8)
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    assert widths[0] == 1 and min(widths[1:]) >= 8 and sum(widths) == 2047
    assert means == [sum(curve[a:b]) / (b - a) for a, b in zip(edges[:-1], edges[1:])]
    assert bucket_positions(curve, 32, min_width=1)[0][:3] == [0, 1, 2]
    with pytest.raises(ValueError, match="min_width"):
        bucket_positions(curve, 4, min_width=0)
    out = token_losses(tiny_llama(), torch.randint(0, 32, (3, 10)), batch_size=2)
    assert out.shape == (3, 9) and out.dtype == torch.float32


def test_iter_documents_of_a_token_store_and_of_arrays() -> None:
    from ttt.data import TokenStore

    docs = iter_documents(TokenStore(np.arange(10), np.array([0, 4, 10])))
    assert [d.tolist() for d in docs] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert [d.dtype for d in docs] == [torch.long, torch.long]
    assert [d.tolist() for d in iter_documents([np.arange(3), [5, 6]])] == [[0, 1, 2], [5, 6]]


def test_unigram_baseline() -> None:
    train = [torch.tensor([0, 0, 0, 1])]
    val = [torch.tensor([0, 1])]
    res = unigram_baseline(train, val, vocab_size=2, bytes_per_token=1.0)
    p0, p1 = 4 / 6, 2 / 6  # add-one smoothing
    assert res["loss"] == pytest.approx(-(math.log(p0) + math.log(p1)) / 2)
    assert res["bits_per_byte"] == pytest.approx(res["loss"] / math.log(2))
