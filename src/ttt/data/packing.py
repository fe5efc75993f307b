"""Rows of fixed length for training and evaluation.

* :class:`PackedRows`: the concatenated token stream cut into consecutive rows (documents cross row
  boundaries; nothing is dropped but the final partial row).
* :class:`WindowRows`: windows that lie inside one document each (no boundaries), e.g. for loss by
  position.

Both return ``{"input_ids", "position_ids", "labels"}`` LongTensors of length ``seq_len``:
``position_ids`` is each token's offset inside its document (0 at every document start, so packed
documents are visible to the model); ``labels`` are ``input_ids`` with ``IGNORE_INDEX`` at document
starts, so, after the model's internal shift, no document's first token is predicted from the previous
document.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import DataError
from .store import TokenStore

IGNORE_INDEX = -100


def _row_dict(ids: np.ndarray, positions: np.ndarray) -> dict[str, torch.Tensor]:
    input_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    position_ids = torch.from_numpy(np.asarray(positions, dtype=np.int64))
    labels = input_ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def _store_name(store: TokenStore, name: str | None) -> str:
    if name:
        return name
    split = getattr(store, "split", None)
    return f"{split} split" if split else "token store"


def _check_seq_len(seq_len: int) -> int:
    if int(seq_len) < 1:
        raise DataError(f"seq_len must be a positive number of tokens, got {seq_len}")
    return int(seq_len)


class PackedRows:
    """The token stream of ``store`` cut into ``len(self) = num_tokens // seq_len`` rows.

    Row ``i`` holds tokens ``[i * seq_len, (i + 1) * seq_len)``. A row that starts inside a document
    continues that document's positions (position = offset inside the document).

    Args:
        store: the token store.
        seq_len: tokens per row.
        strict: raise :class:`DataError` if the store holds less than one row (the default); with
            ``strict=False`` such a store simply gives ``len(self) == 0``.
        name: what the store is, in error messages (default: its split, e.g. ``"val split"``).

    Raises:
        DataError: ``seq_len < 1``, or (``strict``) fewer than ``seq_len`` tokens in the store.
    """

    def __init__(self, store: TokenStore, seq_len: int, strict: bool = True, name: str | None = None) -> None:
        self.store = store
        self.seq_len = _check_seq_len(seq_len)
        self.num_rows = store.num_tokens // self.seq_len
        if strict and self.num_rows == 0:
            raise DataError(f"the {_store_name(store, name)} holds {store.num_tokens} tokens "
                            f"({store.num_docs} documents), less than one row of seq_len={self.seq_len}; "
                            "lower seq_len, use more data or change val_fraction")

    def __len__(self) -> int:
        return self.num_rows

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """``{"input_ids", "position_ids", "labels"}``, each ``LongTensor[seq_len]``."""
        if not -self.num_rows <= i < self.num_rows:
            raise IndexError(f"row {i} out of range ({self.num_rows} rows)")
        i %= self.num_rows
        start = i * self.seq_len
        ids = np.asarray(self.store.tokens[start:start + self.seq_len])
        pos = np.arange(start, start + self.seq_len, dtype=np.int64)
        offsets = self.store.doc_offsets
        pos -= offsets[np.searchsorted(offsets, pos, side="right") - 1]
        return _row_dict(ids, pos)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.row(i)


class WindowRows:
    """Windows of ``seq_len`` tokens, each inside a single document.

    In each document long enough, windows start at offset 0 and then every ``stride`` tokens
    (default ``seq_len``: non-overlapping) while they fit. With ``max_windows``, an evenly spaced,
    deterministic subset is kept. ``position_ids`` are the offsets inside the document, so a window
    starting at a document start has positions ``0..seq_len-1`` (true context length).

    Raises:
        DataError: no document holds ``seq_len`` tokens.
    """

    def __init__(self, store: TokenStore, seq_len: int, stride: int | None = None,
                 max_windows: int | None = None, name: str | None = None) -> None:
        self.store = store
        self.seq_len = _check_seq_len(seq_len)
        self.stride = int(stride or self.seq_len)
        if self.stride < 1:
            raise DataError(f"stride must be positive, got {stride}")
        lengths = store.doc_lengths
        starts: list[np.ndarray] = []
        for d in np.flatnonzero(lengths >= self.seq_len):
            local = np.arange(0, int(lengths[d]) - self.seq_len + 1, self.stride, dtype=np.int64)
            starts.append(np.stack([np.full_like(local, d), local], axis=1))
        if not starts:
            longest = int(lengths.max()) if lengths.size else 0
            raise DataError(f"no document of the {_store_name(store, name)} holds seq_len={self.seq_len} "
                            f"tokens (longest: {longest} tokens, {store.num_docs} documents); lower seq_len")
        windows = np.concatenate(starts)
        if max_windows is not None and 0 < max_windows < len(windows):
            keep = np.linspace(0, len(windows) - 1, int(max_windows)).round().astype(np.int64)
            windows = windows[np.unique(keep)]
        self.windows = windows  # [N, 2]: (document, offset inside it)

    def __len__(self) -> int:
        return int(len(self.windows))

    def row(self, i: int) -> dict[str, torch.Tensor]:
        """``{"input_ids", "position_ids", "labels"}`` of window ``i``."""
        d, off = (int(x) for x in self.windows[i])
        start = int(self.store.doc_offsets[d]) + off
        ids = np.asarray(self.store.tokens[start:start + self.seq_len])
        return _row_dict(ids, np.arange(off, off + self.seq_len, dtype=np.int64))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.row(i)


def collate(rows: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch dict of ``LongTensor[B, seq_len]``."""
    if not rows:
        raise DataError("cannot collate an empty list of rows")
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
