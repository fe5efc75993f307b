"""Packed rows and in-document windows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ttt.data import (
    IGNORE_INDEX,
    DataError,
    Document,
    PackedRows,
    TokenStore,
    WindowRows,
    build_token_store,
    byte_tokenizer,
    collate,
)

X = IGNORE_INDEX


def _store() -> TokenStore:
    # documents: A = 10..14 (5 tokens), B = 20..22 (3), C = 30..36 (7)  -> 15 tokens
    return TokenStore.from_token_lists([[10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]])


def test_packed_rows_hand_checked() -> None:
    rows = PackedRows(_store(), seq_len=4)
    assert len(rows) == 3  # 15 // 4; the last 3 tokens are dropped
    expected = [
        ([10, 11, 12, 13], [0, 1, 2, 3], [X, 11, 12, 13]),
        ([14, 20, 21, 22], [4, 0, 1, 2], [14, X, 21, 22]),  # starts mid-document A (position 4)
        ([30, 31, 32, 33], [0, 1, 2, 3], [X, 31, 32, 33]),
    ]
    for i, (ids, pos, labels) in enumerate(expected):
        r = rows.row(i)
        assert r["input_ids"].tolist() == ids
        assert r["position_ids"].tolist() == pos
        assert r["labels"].tolist() == labels
        assert all(t.dtype == torch.long and t.shape == (4,) for t in r.values())
    rows6 = PackedRows(_store(), seq_len=6)
    r = rows6.row(1)  # tokens 6..11: B[1:], C[:4]
    assert r["input_ids"].tolist() == [21, 22, 30, 31, 32, 33]
    assert r["position_ids"].tolist() == [1, 2, 0, 1, 2, 3]
    assert r["labels"].tolist() == [21, 22, X, 31, 32, 33]
    with pytest.raises(IndexError):
        rows.row(3)


def test_collate() -> None:
    rows = PackedRows(_store(), seq_len=4)
    batch = collate([rows.row(2), rows.row(0)])
    assert set(batch) == {"input_ids", "position_ids", "labels"}
    assert batch["input_ids"].shape == (2, 4) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1].tolist() == [10, 11, 12, 13]


def test_packed_rows_too_short(tmp_path: Path) -> None:
    assert len(PackedRows(_store(), seq_len=16, strict=False)) == 0
    with pytest.raises(DataError, match=r"the token store holds 15 tokens \(3 documents\), less than one row "
                                        r"of seq_len=16"):
        PackedRows(_store(), seq_len=16)
    store = build_token_store([Document("a", "tiny text")], byte_tokenizer(), tmp_path, split="val")
    with pytest.raises(DataError, match="the val split holds 9 tokens"):
        PackedRows(store, seq_len=10)
    assert len(PackedRows(store, seq_len=9)) == 1
    with pytest.raises(DataError, match="seq_len must be a positive"):
        PackedRows(_store(), seq_len=0)


def test_window_rows() -> None:
    w = WindowRows(_store(), seq_len=3)
    # A: [0,3); B: [0,3); C: [0,3), [3,6)
    assert len(w) == 4
    got = [w.row(i) for i in range(4)]
    assert [g["input_ids"].tolist() for g in got] == [[10, 11, 12], [20, 21, 22], [30, 31, 32], [33, 34, 35]]
    assert got[3]["position_ids"].tolist() == [3, 4, 5]
    assert got[3]["labels"].tolist() == [33, 34, 35]
    assert got[0]["labels"].tolist() == [X, 11, 12]
    strided = WindowRows(_store(), seq_len=5, stride=2)
    assert [strided.row(i)["input_ids"][0].item() for i in range(len(strided))] == [10, 30, 32]
    assert len(WindowRows(_store(), seq_len=2, max_windows=3)) == 3


def test_window_rows_too_long() -> None:
    with pytest.raises(DataError, match=r"no document of the validation holds seq_len=8 tokens \(longest: 7"):
        WindowRows(_store(), seq_len=8, name="validation")
