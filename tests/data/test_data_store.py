"""Cached token stores."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from data_helpers import TEXTS

import ttt.data.store as store_mod
from ttt.data import DataError, Document, TokenStore, build_token_store, byte_tokenizer, token_dtype


def _docs() -> list[Document]:
    return [Document(k, v) for k, v in TEXTS.items()]


def test_build_and_read(tmp_path: Path) -> None:
    docs = _docs()
    store = build_token_store(docs, byte_tokenizer(), tmp_path, split="train")
    assert isinstance(store.tokens, np.memmap) and store.tokens.dtype == np.uint16
    assert store.num_docs == 4 and len(store.documents()) == 4
    raw = [d.text.encode("utf-8") for d in docs]
    assert store.num_tokens == sum(len(r) for r in raw) == len(store)
    assert store.num_bytes == store.num_tokens and store.bytes_per_token == 1.0
    for i, r in enumerate(raw):
        assert bytes(store.doc(i).astype(np.uint8)) == r
        assert np.array_equal(store.documents()[i], store.doc(i))
    assert store.doc_offsets[0] == 0 and store.doc_offsets[-1] == store.num_tokens
    assert store.doc_names == [d.name for d in docs]
    assert list(store.doc_index([0, store.doc_offsets[1] - 1, store.doc_offsets[1]])) == [0, 0, 1]
    clone = pickle.loads(pickle.dumps(store))  # re-opens the memmap
    assert isinstance(clone.tokens, np.memmap) and np.array_equal(clone.doc(2), store.doc(2))


def test_cache_reuse_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs()
    first = build_token_store(docs, byte_tokenizer(), tmp_path, split="train")

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached store should have been reused")

    monkeypatch.setattr(store_mod, "_write_store", fail)
    again = build_token_store(docs, byte_tokenizer(), tmp_path, split="train")
    assert again.path == first.path
    monkeypatch.undo()
    other_split = build_token_store(docs, byte_tokenizer(), tmp_path, split="val")
    changed = build_token_store(docs[:-1] + [Document(docs[-1].name, "changed")], byte_tokenizer(), tmp_path)
    assert len({first.path, other_split.path, changed.path}) == 3


def test_atomic_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _docs()
    real = store_mod._write_store

    def interrupted(folder: Path, *args: object) -> None:
        (folder / "tokens.bin").write_bytes(b"\x00\x01partial")
        raise KeyboardInterrupt  # the run dies in the middle of writing

    monkeypatch.setattr(store_mod, "_write_store", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_token_store(docs, byte_tokenizer(), tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a partial store nor a temp folder is left
    monkeypatch.setattr(store_mod, "_write_store", real)
    store = build_token_store(docs, byte_tokenizer(), tmp_path)
    assert store.num_docs == 4 and [p.name for p in tmp_path.iterdir()] == [store.path.name]


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    docs = _docs()
    store = build_token_store(docs, byte_tokenizer(), tmp_path)
    expected = np.array(store.tokens)
    path = store.path
    del store
    with open(path / "tokens.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match="corrupt"):
        TokenStore.open(path)
    rebuilt = build_token_store(docs, byte_tokenizer(), tmp_path)
    assert np.array_equal(np.asarray(rebuilt.tokens), expected)


def test_dtype_and_in_memory_store() -> None:
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    store = TokenStore.from_token_lists([[1, 2, 3], [], [4, 5]])
    assert store.num_docs == 3 and store.num_tokens == 5 and list(store.doc(2)) == [4, 5]
    assert store.num_bytes == -1 and store.bytes_per_token is None
    with pytest.raises(DataError, match="bad document offsets"):
        TokenStore(np.zeros(4, dtype=np.uint16), np.array([0, 2]))
