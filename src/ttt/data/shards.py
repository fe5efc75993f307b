"""Prepared corpora on disk: sharded token files, document offsets and a manifest.

A prepared directory (written by :func:`ttt.data.prepare.prepare_corpus`, ``ttt data prepare``)::

    DIR/manifest.json             written last, atomically: counts, dtype, tokenizer, source fingerprint,
                                  split settings and the list of shards of each split
    DIR/tokenizer/                the tokenizer (``save_pretrained``), reused by every run
    DIR/shards/train-00000.bin    raw token ids (``uint16`` if the vocabulary fits, else ``uint32``),
                                  documents back to back; documents never cross shards
    DIR/shards/train-00000.npz    ``offsets`` (``int64[n + 1]``) and ``doc_bytes`` (``int64[n]``)
    DIR/shards/train-00000.json   the shard's counts, sha256 and document names (its completion mark)
    DIR/shards/val-00000.*        the validation split, the same way

:class:`ShardedTokenStore` opens one split as a :class:`ttt.data.TokenStore`: every shard memory-mapped
(lazily, a bounded number open at once), ``tokens`` a read-only view of their concatenation and
``doc_offsets`` global, so :class:`~ttt.data.PackedRows`, :class:`~ttt.data.WindowRows`, the
:class:`~ttt.data.ResumableSampler` and evaluation run over all shards as over one file.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .store import TokenStore

FORMAT = "ttt-prepared-v1"
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
_MAX_OPEN = 128  # shards memory-mapped at once (each open map holds a file descriptor)


def is_prepared_dir(path: str | Path | None) -> bool:
    """Whether ``path`` is a directory holding a prepared corpus (its manifest)."""
    if path is None:
        return False
    p = Path(str(path)).expanduser()
    return p.is_dir() and (p / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a prepared directory.

    Raises:
        DataError: no manifest (an unfinished or foreign directory) or one of another format.
    """
    path = Path(path).expanduser()
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise DataError(f"'{path}' is not a prepared corpus (no {MANIFEST}; an interrupted "
                        "`ttt data prepare` resumes when run again)") from None
    except (OSError, ValueError) as e:
        raise DataError(f"the manifest of '{path}' is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else "?"
        raise DataError(f"'{path}' holds a manifest of another format ({found}, expected {FORMAT})")
    return manifest


def shard_paths(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """``(tokens .bin, offsets .npz, meta .json)`` of shard ``name`` in ``folder``."""
    return folder / f"{name}.bin", folder / f"{name}.npz", folder / f"{name}.json"


class ShardedTokens:
    """Read-only 1-D view of the token ids of several shard files, back to back.

    ``tokens[a:b]`` is a view into one memory map when the range lies in one shard and a copy joining the
    pieces otherwise; ``tokens[i]`` is one id. Shards are memory-mapped on first use, at most
    ``_MAX_OPEN`` at once (least recently used are closed). Pickles as paths (DataLoader workers).
    """

    def __init__(self, paths: Sequence[Path], sizes: Sequence[int], dtype: Any) -> None:
        self.paths = [Path(p) for p in paths]
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.dtype = np.dtype(dtype)
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def ndim(self) -> int:
        return 1

    def shard(self, k: int) -> np.ndarray:
        """The tokens of shard ``k`` (a read-only memory map)."""
        arr = self._maps.get(k)
        if arr is None:
            n = int(self.sizes[k])
            arr = (np.memmap(self.paths[k], dtype=self.dtype, mode="r", shape=(n,)) if n
                   else np.zeros(0, self.dtype))
            self._maps[k] = arr
            while len(self._maps) > _MAX_OPEN:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(k)
        return arr

    def _range(self, a: int, b: int) -> np.ndarray:
        if b <= a:
            return np.zeros(0, self.dtype)
        k = int(np.searchsorted(self.starts, a, side="right")) - 1
        end = int(self.starts[k + 1])
        if b <= end:
            s = int(self.starts[k])
            return self.shard(k)[a - s:b - s]
        parts = []
        while a < b:
            while int(self.starts[k + 1]) <= a:  # skip empty shards
                k += 1
            s, e = int(self.starts[k]), int(self.starts[k + 1])
            parts.append(np.asarray(self.shard(k)[a - s:min(b, e) - s]))
            a = min(b, e)
        return np.concatenate(parts)

    def __getitem__(self, key: int | slice) -> Any:
        n = len(self)
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                return self._range(a, b)[::step] if b > a else np.zeros(0, self.dtype)
            return self._range(a, b)
        i = int(key)
        if not -n <= i < n:
            raise IndexError(f"token {i} out of range ({n} tokens)")
        return self._range(i % n, i % n + 1)[0]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._range(0, len(self))
        return out.astype(dtype) if dtype is not None else np.asarray(out)

    def __iter__(self) -> Iterator[Any]:
        for k in range(len(self.paths)):
            yield from self.shard(k)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()
        return state


class ShardNames(Sequence[str]):
    """The document names of a split, read from the shards' meta files on first use."""

    def __init__(self, meta_paths: Sequence[Path], counts: Sequence[int]) -> None:
        self.meta_paths = list(meta_paths)
        self.starts = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).astype(np.int64)
        self._cache: OrderedDict[int, list[str]] = OrderedDict()

    def _names(self, k: int) -> list[str]:
        names = self._cache.get(k)
        if names is None:
            names = json.loads(self.meta_paths[k].read_text())["names"]
            self._cache[k] = names
            while len(self._cache) > 8:
                self._cache.popitem(last=False)
        return names

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"document {i} out of range ({n} documents)")
        i = int(i) % n
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self._names(k)[i - int(self.starts[k])]

    def __iter__(self) -> Iterator[str]:
        for k in range(len(self.meta_paths)):
            yield from self._names(k)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"ShardNames({len(self)} documents)"


class ShardedTokenStore(TokenStore):
    """One split of a prepared directory as a :class:`TokenStore` over all its shards."""

    def __init__(self, tokens: ShardedTokens, doc_offsets: np.ndarray, doc_names: Sequence[str],
                 doc_bytes: np.ndarray, path: Path, split: str, manifest: dict[str, Any]) -> None:
        offsets = np.asarray(doc_offsets, dtype=np.int64)
        if offsets.ndim != 1 or offsets.size < 1 or offsets[0] != 0 or offsets[-1] != len(tokens):
            raise DataError(f"prepared split '{split}' of '{path}': document offsets do not match "
                            f"its {len(tokens)} tokens (corrupt shards; prepare again)")
        self.tokens = tokens
        self.doc_offsets = offsets
        self.doc_names = doc_names  # type: ignore[assignment]
        self.doc_bytes = np.asarray(doc_bytes, dtype=np.int64)
        self.path = path
        self.split = split
        self.manifest = manifest

    @property
    def num_shards(self) -> int:
        return len(self.tokens.paths)

    @classmethod
    def open(cls, path: str | Path, split: str = "train") -> ShardedTokenStore:  # type: ignore[override]
        """Open ``split`` (``"train"`` or ``"val"``) of the prepared directory ``path``.

        Raises:
            DataError: not a prepared directory, no such split, or missing / truncated shard files.
        """
        path = Path(path).expanduser()
        manifest = read_manifest(path)
        info = (manifest.get("splits") or {}).get(split)
        if not info:
            raise DataError(f"the prepared corpus '{path}' has no '{split}' split "
                            f"(splits: {sorted(manifest.get('splits') or {})})")
        dtype = np.dtype(manifest["dtype"])
        folder = path / SHARDS_DIR
        bins, metas, sizes, counts = [], [], [], []
        offsets_parts, bytes_parts = [np.zeros(1, np.int64)], []
        total = 0
        for shard in info["shards"]:
            b, npz, meta = shard_paths(folder, shard["name"])
            n_tok, n_doc = int(shard["num_tokens"]), int(shard["num_docs"])
            try:
                size = b.stat().st_size
                with np.load(npz) as z:
                    offs, nbytes = z["offsets"], z["doc_bytes"]
            except (OSError, KeyError, ValueError) as e:
                raise DataError(f"shard '{shard['name']}' of '{path}' is missing or unreadable ({e}); "
                                "prepare the corpus again") from None
            if size != n_tok * dtype.itemsize or offs.size != n_doc + 1 or int(offs[-1]) != n_tok:
                raise DataError(f"shard '{shard['name']}' of '{path}' does not match the manifest "
                                f"({size} bytes for {n_tok} {dtype} tokens); prepare the corpus again")
            bins.append(b)
            metas.append(meta)
            sizes.append(n_tok)
            counts.append(n_doc)
            offsets_parts.append(offs[1:].astype(np.int64) + total)
            bytes_parts.append(nbytes.astype(np.int64))
            total += n_tok
        tokens = ShardedTokens(bins, sizes, dtype)
        doc_bytes = np.concatenate(bytes_parts) if bytes_parts else np.zeros(0, np.int64)
        return cls(tokens, np.concatenate(offsets_parts), ShardNames(metas, counts), doc_bytes, path, split,
                   manifest)

    def __repr__(self) -> str:
        return (f"ShardedTokenStore(split={self.split}, num_docs={self.num_docs}, "
                f"num_tokens={self.num_tokens}, shards={self.num_shards}, path={self.path})")

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
