"""Validation loss, perplexity, bits per byte and loss by token position of any causal LM.

The evaluation windows lie *inside* documents and start at a document start, so the position of a
token inside its window is its true context length: the long-context measurement of the TTT paper
(loss by token index). Each window of ``seq_len`` tokens yields ``seq_len - 1`` next-token
predictions; prediction ``p`` (0-based) has ``p + 1`` tokens of context.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
>>> docs = [torch.randint(0, 16, (100,)) for _ in range(3)]
>>> res = evaluate(model, docs, seq_len=32, bytes_per_token=1.0, num_buckets=4)
>>> res.num_windows, len(res.position_loss), len(res.bucket_loss)
(9, 31, 4)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ttt.data import TokenStore

LN2 = math.log(2.0)


class EvaluationError(ValueError):
    """Raised for evaluation inputs that cannot work (e.g. a context longer than every document)."""


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        loss: mean next-token cross-entropy, nats per token.
        perplexity: ``exp(loss)``.
        bits_per_byte: ``loss * tokens / bytes / ln 2`` (None when the byte count is unknown).
        bytes_per_token: UTF-8 bytes of text per predicted token used for ``bits_per_byte``.
        num_tokens: predicted tokens that were scored.
        num_windows: evaluation windows (each ``seq_len`` tokens inside one document).
        seq_len: window length.
        position_loss: mean loss at each prediction position ``0 .. seq_len - 2`` (context ``p + 1``).
        bucket_edges: ``num_buckets + 1`` position edges; bucket ``i`` covers ``[edges[i], edges[i+1])``.
        bucket_loss: mean loss of each bucket.
        bucket_stderr: standard error of each bucket's mean across windows (each window's mean loss in
            the bucket is one sample; windows of one document are not independent, so read the band
            as a lower bound of the uncertainty). Empty for results saved before it existed.
        first_quarter_loss / last_quarter_loss: mean loss of the first / last quarter of the positions.
        extra: free-form metadata (model name, checkpoint, ...).
    """

    loss: float
    perplexity: float
    bits_per_byte: float | None
    bytes_per_token: float | None
    num_tokens: int
    num_windows: int
    seq_len: int
    position_loss: list[float]
    bucket_edges: list[int]
    bucket_loss: list[float]
    first_quarter_loss: float
    last_quarter_loss: float
    bucket_stderr: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_dict`."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def bucket_centers(self) -> list[float]:
        """Mean context length (``position + 1``) of each bucket, for plotting."""
        e = self.bucket_edges
        return [0.5 * (e[i] + e[i + 1] - 1) + 1 for i in range(len(e) - 1)]


# ----------------------------------------------------------------------------------------------------
# documents and windows
# ----------------------------------------------------------------------------------------------------


def _as_long_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).long()
    return torch.as_tensor(np.asarray(x, dtype=np.int64)).reshape(-1)


def iter_documents(store: TokenStore | Sequence[Any]) -> list[torch.Tensor]:
    """The documents of a :class:`ttt.data.TokenStore`, or of a sequence of 1-D token arrays, as 1-D
    LongTensors."""
    docs = store.documents() if isinstance(store, TokenStore) else store
    return [_as_long_tensor(d) for d in docs]


def document_windows(
    documents: Sequence[torch.Tensor], seq_len: int, max_windows: int | None = None, stride: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens that lie inside one document each.

    Windows start at a document's first token and then every ``stride`` (default ``seq_len``) tokens.
    With ``max_windows``, an evenly spaced deterministic subset is kept. Returns ``LongTensor[N, seq_len]``.

    Raises:
        EvaluationError: no document holds a full window (context longer than the documents).
    """
    if seq_len < 2:
        raise EvaluationError(f"seq_len must be at least 2, got {seq_len}")
    stride = stride or seq_len
    rows = []
    for doc in documents:
        for start in range(0, len(doc) - seq_len + 1, stride):
            rows.append(doc[start : start + seq_len])
    if not rows:
        longest = max((len(d) for d in documents), default=0)
        raise EvaluationError(
            f"context length {seq_len} is longer than every evaluation document (longest: {longest} tokens, "
            f"{len(documents)} documents); use a shorter --seq-len or a corpus with longer documents"
        )
    if max_windows is not None and len(rows) > max_windows:
        keep = np.linspace(0, len(rows) - 1, max_windows).round().astype(int)
        rows = [rows[i] for i in sorted(set(keep.tolist()))]
    return torch.stack(rows)


def bucket_positions(
    position_loss: Sequence[float], num_buckets: int, spacing: str = "log", min_width: int = 16
) -> tuple[list[int], list[float]]:
    """Average a per-position curve over position buckets.

    ``spacing="log"`` (default): the first position (the loss without context) is its own bucket, then
    buckets grow geometrically (fine where the loss falls fast, many tokens per bucket at long
    contexts, so the curve is smooth on a log axis) but are never narrower than ``min_width``
    positions: a bucket of one or two positions averages only one token per window, too few for a
    smooth curve. ``"linear"``: equal widths (``min_width`` unused). ``num_buckets`` buckets result
    unless the positions are too few for that many buckets of ``min_width`` (then fewer, wider ones).
    """
    n = len(position_loss)
    if n == 0:
        raise ValueError("position_loss is empty")
    if min_width < 1:
        raise ValueError(f"min_width must be >= 1, got {min_width}")
    num_buckets = max(1, min(num_buckets, n))
    if spacing == "linear":
        edges = sorted(set(np.linspace(0, n, num_buckets + 1).round().astype(int).tolist()))
    elif spacing == "log":
        edges = [0] if num_buckets == 1 or n == 1 else [0, 1]
        cur = edges[-1]
        for left in range(num_buckets - 1, 0, -1):  # buckets still to place after the current edge
            if left == 1:
                nxt = n
            else:  # the geometric step that would reach n in `left` steps, at least min_width wide
                ratio = (n / cur) ** (1.0 / left)
                nxt = cur + max(min_width, round(cur * (ratio - 1.0)))
            if nxt >= n or n - nxt < min_width:
                break
            edges.append(nxt)
            cur = nxt
        if edges[-1] != n:
            edges.append(n)
    else:
        raise ValueError(f"spacing must be 'log' or 'linear', got {spacing!r}")
    arr = np.asarray(position_loss, dtype=np.float64)
    means = [float(arr[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    return edges, means


def bucket_stderr(losses: torch.Tensor, edges: Sequence[int]) -> list[float]:
    """Standard error across windows of each bucket's mean loss.

    Args:
        losses: per-token losses ``[windows, positions]``.
        edges: bucket edges over the positions (:func:`bucket_positions`).

    Returns:
        One value per bucket: the sample standard deviation of the windows' bucket means divided by
        ``sqrt(windows)``; 0.0 with a single window.
    """
    n = losses.size(0)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        per_window = losses[:, a:b].double().mean(dim=1)
        out.append(float(per_window.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0)
    return out


# ----------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------


def bytes_per_token_of(tokenizer: Any, windows: torch.Tensor) -> float:
    """UTF-8 bytes per predicted token of ``windows`` (the targets ``windows[:, 1:]``), by decoding."""
    targets = windows[:, 1:]
    total_bytes = 0
    for row in targets.tolist():
        total_bytes += len(tokenizer.decode(row, skip_special_tokens=True).encode("utf-8"))
    return total_bytes / max(targets.numel(), 1)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def token_losses(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Per-token next-token losses ``[N, L-1]`` (nats, fp32) of ``model`` on ``windows[N, L]``."""
    device = _model_device(model)
    out = []
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
        out.append(loss.view(ids.size(0), -1).cpu())
    return torch.cat(out)


def evaluate(
    model: torch.nn.Module,
    store: TokenStore | Sequence[Any],
    seq_len: int,
    *,
    batch_size: int = 8,
    max_windows: int | None = None,
    num_buckets: int = 32,
    bucket_spacing: str = "log",
    tokenizer: Any = None,
    bytes_per_token: float | None = None,
    stride: int | None = None,
) -> EvalResult:
    """Evaluate a causal LM on windows of ``seq_len`` tokens inside the documents of ``store``.

    Args:
        model: any causal LM whose ``forward(input_ids=...)`` returns ``.logits`` (HF convention).
        store: a :class:`ttt.data.TokenStore` or a list of 1-D token arrays.
        seq_len: window length; every window lies inside one document and starts at a document start
            or a multiple of ``stride`` after it, so position = true context length.
        batch_size: windows per forward pass.
        max_windows: keep at most this many windows (evenly spaced, deterministic).
        num_buckets: buckets of the loss-by-position curve (at most; see :func:`bucket_positions`).
        bucket_spacing: ``"log"`` (geometric buckets, default) or ``"linear"``.
        tokenizer: used to count bytes per token (decoding the scored tokens) for bits per byte when
            neither ``bytes_per_token`` nor ``store.bytes_per_token`` (a TokenStore's text bytes / tokens)
            is known.
        bytes_per_token: known bytes per token (e.g. ``1.0`` for a byte tokenizer).
        stride: distance between window starts inside a document (default ``seq_len``).

    Raises:
        EvaluationError: if no document is at least ``seq_len`` tokens long.
    """
    windows = document_windows(iter_documents(store), seq_len, max_windows=max_windows, stride=stride)
    was_training = model.training
    model.eval()
    try:
        losses = token_losses(model, windows, batch_size=batch_size).double()
    finally:
        model.train(was_training)
    if bytes_per_token is None:
        bytes_per_token = store.bytes_per_token if isinstance(store, TokenStore) else None  # exact bytes
    if bytes_per_token is None and tokenizer is not None:
        bytes_per_token = bytes_per_token_of(tokenizer, windows)
    loss = float(losses.mean())
    position_loss = losses.mean(dim=0).tolist()
    edges, bucket_loss = bucket_positions(position_loss, num_buckets, bucket_spacing)
    stderr = bucket_stderr(losses, edges)
    q = max(1, len(position_loss) // 4)
    bpb = loss / bytes_per_token / LN2 if bytes_per_token else None
    return EvalResult(
        loss=loss,
        perplexity=float(math.exp(min(loss, 700.0))),
        bits_per_byte=bpb,
        bytes_per_token=bytes_per_token,
        num_tokens=int(losses.numel()),
        num_windows=int(windows.size(0)),
        seq_len=int(seq_len),
        position_loss=position_loss,
        bucket_edges=edges,
        bucket_loss=bucket_loss,
        bucket_stderr=stderr,
        first_quarter_loss=float(np.mean(position_loss[:q])),
        last_quarter_loss=float(np.mean(position_loss[-q:])),
    )


def unigram_baseline(
    train_store: TokenStore | Sequence[Any],
    val_store: TokenStore | Sequence[Any],
    vocab_size: int,
    bytes_per_token: float | None = None,
) -> dict[str, float | None]:
    """Cross-entropy of a unigram model fitted on the training token frequencies (add-one smoothing).

    Returns ``{"loss": nats/token on the validation tokens, "bits_per_byte": ..., "train_entropy": ...}``:
    the floor any sequence model must clearly beat.
    """
    counts = np.zeros(vocab_size, dtype=np.float64)
    for doc in iter_documents(train_store):
        counts += np.bincount(doc.numpy(), minlength=vocab_size)[:vocab_size]
    probs = (counts + 1.0) / (counts.sum() + vocab_size)
    logp = np.log(probs)
    val_counts = np.zeros(vocab_size, dtype=np.float64)
    for doc in iter_documents(val_store):
        val_counts += np.bincount(doc.numpy(), minlength=vocab_size)[:vocab_size]
    loss = float(-(val_counts * logp).sum() / max(val_counts.sum(), 1.0))
    train_p = counts / max(counts.sum(), 1.0)
    nz = train_p > 0
    entropy = float(-(train_p[nz] * np.log(train_p[nz])).sum())
    return {
        "loss": loss,
        "bits_per_byte": loss / bytes_per_token / LN2 if bytes_per_token else None,
        "train_entropy": entropy,
    }
