"""Tokenized corpora: one memory-mapped token file + document offsets, cached on disk.

A cached store is a folder ``<cache_dir>/<split>-<key>/`` holding ``tokens.bin`` (raw ``uint16`` or
``uint32`` ids, documents back to back), ``offsets.npy`` (``int64[num_docs + 1]``), ``doc_bytes.npy``
(UTF-8 bytes of each document's text) and ``meta.json``. The key hashes the corpus (document names and
texts), the tokenizer definition and the split name. The folder is written under a temporary name and
renamed into place in one ``os.replace``, so an interrupted run never leaves a partial store behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from .corpus import Document, corpus_fingerprint
from .errors import DataError
from .tokenizer import encode_documents, is_byte_tokenizer, text_encoder, tokenizer_fingerprint

FORMAT_VERSION = 1
_ENCODE_BATCH_DOCS = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits (``vocab_size <= 65536``), else ``uint32``."""
    return np.dtype(np.uint16) if int(vocab_size) <= 1 << 16 else np.dtype(np.uint32)


class TokenStore:
    """Token ids of a list of documents, concatenated, with document offsets.

    Attributes:
        tokens: 1-D array (a read-only ``numpy.memmap`` for cached stores) of all token ids.
        doc_offsets: ``int64[num_docs + 1]``; document ``i`` is ``tokens[doc_offsets[i]:doc_offsets[i+1]]``.
        doc_names: name of each document.
        doc_bytes: ``int64[num_docs]`` UTF-8 bytes of each document's text.
        path: the cache folder (None for in-memory stores).
        split: the split name it was built for (``"train"``, ``"val"``; None for in-memory stores).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_offsets: np.ndarray,
        doc_names: Sequence[str] | None = None,
        doc_bytes: np.ndarray | None = None,
        path: Path | None = None,
        split: str | None = None,
    ) -> None:
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise DataError(f"bad document offsets for {len(tokens)} tokens "
                            "(must run from 0 to the token count)")
        if np.any(np.diff(offsets) < 0):
            raise DataError("document offsets must be non-decreasing")
        n = offsets.size - 1
        self.tokens = tokens
        self.doc_offsets = offsets
        self.doc_names = list(doc_names) if doc_names is not None else [str(i) for i in range(n)]
        self.doc_bytes = (np.asarray(doc_bytes, dtype=np.int64) if doc_bytes is not None
                          else np.full(n, -1, dtype=np.int64))
        self.path = path
        self.split = split

    # ---------------------------------------------------------------- constructors
    @classmethod
    def from_token_lists(cls, docs: Sequence[Sequence[int]], names: Sequence[str] | None = None,
                         dtype: Any = np.uint32) -> TokenStore:
        """An in-memory store from per-document token id lists (tests, small evaluations)."""
        lengths = [len(d) for d in docs]
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        flat = np.concatenate([np.asarray(d, dtype=dtype) for d in docs]) if docs else np.zeros(0, dtype)
        return cls(flat.astype(dtype, copy=False), offsets, names)

    @classmethod
    def open(cls, path: str | Path) -> TokenStore:
        """Open a cached store folder (memory-maps ``tokens.bin``).

        Raises:
            DataError: the folder is not a complete store.
        """
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
            dtype = np.dtype(meta["dtype"])
            num_tokens = int(meta["num_tokens"])
            offsets = np.load(path / "offsets.npy")
            doc_bytes = np.load(path / "doc_bytes.npy")
            size = (path / "tokens.bin").stat().st_size
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise DataError(f"token store '{path}' is incomplete or unreadable: {e}") from None
        if meta.get("format") != FORMAT_VERSION or size != num_tokens * dtype.itemsize:
            raise DataError(f"token store '{path}' is corrupt or of another format "
                            f"({size} bytes for {num_tokens} {dtype} tokens)")
        tokens = (np.memmap(path / "tokens.bin", dtype=dtype, mode="r", shape=(num_tokens,))
                  if num_tokens else np.zeros(0, dtype=dtype))
        return cls(tokens, offsets, meta.get("doc_names"), doc_bytes, path=path, split=meta.get("split"))

    # ---------------------------------------------------------------- access
    @property
    def num_tokens(self) -> int:
        return int(self.doc_offsets[-1])

    @property
    def num_docs(self) -> int:
        return int(self.doc_offsets.size - 1)

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of all document texts (``-1`` if unknown): for bits per byte."""
        return -1 if np.any(self.doc_bytes < 0) else int(self.doc_bytes.sum())

    @property
    def bytes_per_token(self) -> float | None:
        """Mean UTF-8 bytes per token (None if unknown or empty): ``bits/byte = nats/token / ln 2 / this``."""
        nb = self.num_bytes
        return nb / self.num_tokens if nb >= 0 and self.num_tokens else None

    @property
    def doc_lengths(self) -> np.ndarray:
        """``int64[num_docs]`` tokens per document."""
        return np.diff(self.doc_offsets)

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document ``i`` (a view, no copy)."""
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} out of range ({self.num_docs} documents)")
        i %= self.num_docs
        return self.tokens[self.doc_offsets[i]:self.doc_offsets[i + 1]]

    def documents(self) -> list[np.ndarray]:
        """Every document's token ids (views)."""
        return [self.doc(i) for i in range(self.num_docs)]

    def doc_index(self, position: int | np.ndarray) -> np.ndarray:
        """Document index holding each token position of the concatenated stream."""
        return np.searchsorted(self.doc_offsets, position, side="right") - 1

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenStore(num_docs={self.num_docs}, num_tokens={self.num_tokens}, path={self.path})"

    # pickling (DataLoader workers): re-open the memmap instead of copying the tokens
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.path is not None and isinstance(self.tokens, np.memmap):
            state["tokens"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.tokens is None:
            self.tokens = TokenStore.open(self.path).tokens


# ----------------------------------------------------------------------------------------------------
# building (cached)
# ----------------------------------------------------------------------------------------------------


def store_key(documents: Sequence[Document], tokenizer: PreTrainedTokenizerFast, split: str) -> str:
    """Cache key of a store: hash of (corpus content, tokenizer definition, split, format)."""
    ident = {
        "format": FORMAT_VERSION,
        "corpus": corpus_fingerprint(documents),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "split": split,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _write_store(folder: Path, documents: Sequence[Document], tokenizer: PreTrainedTokenizerFast,
                 split: str, key: str) -> None:
    dtype = token_dtype(len(tokenizer))
    limit = np.iinfo(dtype).max
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    doc_bytes = np.zeros(len(documents), dtype=np.int64)
    total = 0
    encoder = text_encoder(tokenizer)
    fast_bytes = is_byte_tokenizer(encoder)  # ids are the UTF-8 bytes: skip the tokenizer
    with open(folder / "tokens.bin", "wb") as f:
        for start in range(0, len(documents), _ENCODE_BATCH_DOCS):
            batch = documents[start:start + _ENCODE_BATCH_DOCS]
            texts = [d.text for d in batch]
            if fast_bytes:
                encoded = [np.frombuffer(t.encode("utf-8", errors="surrogatepass"), np.uint8) for t in texts]
            else:
                encoded = encode_documents(encoder, texts)
            for j, ids in enumerate(encoded):
                arr = np.asarray(ids, dtype=np.int64)
                if arr.size and (arr.min() < 0 or arr.max() > limit):
                    raise DataError(f"token id {int(arr.max())} does not fit {dtype} (tokenizer has "
                                    f"{len(tokenizer)} tokens)")
                arr.astype(dtype).tofile(f)
                total += arr.size
                offsets[start + j + 1] = total
                doc_bytes[start + j] = len(batch[j].text.encode("utf-8", errors="surrogatepass"))
        f.flush()
        os.fsync(f.fileno())
    np.save(folder / "offsets.npy", offsets)
    np.save(folder / "doc_bytes.npy", doc_bytes)
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "split": split,
        "dtype": dtype.name,
        "num_tokens": int(total),
        "num_docs": len(documents),
        "num_bytes": int(doc_bytes.sum()),
        "vocab_size": len(tokenizer),
        "doc_names": [d.name for d in documents],
    }
    (folder / "meta.json").write_text(json.dumps(meta))


def build_token_store(
    documents: Sequence[Document],
    tokenizer: PreTrainedTokenizerFast,
    cache_dir: str | Path,
    split: str = "train",
) -> TokenStore:
    """Tokenize ``documents`` once into ``cache_dir`` and return the store; reuse the cache when present.

    Documents are encoded without added special tokens (special-token strings inside the text stay
    plain text, see :func:`ttt.data.tokenizer.text_encoder`). The store is written under a temporary name
    and moved into place atomically; a corrupt cached store is rebuilt.
    """
    documents = list(documents)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = store_key(documents, tokenizer, split)
    final = cache_dir / f"{split}-{key[:24]}"
    if final.is_dir():
        try:
            return TokenStore.open(final)
        except DataError:
            shutil.rmtree(final, ignore_errors=True)  # corrupt (e.g. edited by hand): rebuild
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=cache_dir))
    try:
        _write_store(tmp, documents, tokenizer, split, key)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # pragma: no cover - not a lost race with another process
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)  # lost the race (or failed): drop our copy
    return TokenStore.open(final)
