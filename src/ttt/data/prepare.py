"""Streaming, parallel tokenization of a corpus into a prepared directory of token shards.

:func:`prepare_corpus` (``ttt data prepare``) never holds the corpus in memory:

1. **scan**: stream the documents once (:func:`ttt.data.corpus.iter_documents`), hashing names and texts
   into the source fingerprint and keeping 24 bytes per document (split rank key, length);
2. **split**: the deterministic document-level split of :func:`ttt.data.split_documents` (same rule,
   same result), computed from those keys;
3. **tokenizer**: ``byte``, a saved tokenizer, or ``bpe`` trained on a deterministic sample of the
   training documents (``bpe_sample_mb``), saved in ``DIR/tokenizer`` once;
4. **tokenize**: stream the documents again, cut each split into shards of about ``shard_mb`` MB of
   text, tokenize the shards in ``workers`` processes and write each shard under a temporary name, then
   rename it (its ``.json`` last: a shard without it does not exist);
5. **manifest**: written last, atomically.

Interrupted (a worker or the whole process killed), the same command resumes: finished shards are kept,
the others are written again, and the result is identical to an uninterrupted run (nothing in the
output depends on timing or on the number of workers). A lock file keeps two prepares out of one
directory. Memory is bounded by about ``workers + 3`` shards of text (``workers + 1`` queued or being
tokenized, one being filled per split), plus 24 bytes per document.
"""

from __future__ import annotations

import array
import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ttt.util.files import atomic_open, atomic_write_json

from .corpus import Document, _rank_key, _split_one, is_shakespeare, iter_documents
from .errors import DataError
from .shards import FORMAT, MANIFEST, SHARDS_DIR, TOKENIZER_DIR, read_manifest, shard_paths
from .store import token_dtype

PLAN = "plan.json"
LOCK = ".lock"
DEFAULT_SHARD_MB = 32.0
DEFAULT_BPE_SAMPLE_MB = 256.0
ENCODE_BATCH_CHARS = 1 << 20  # text per encode_batch call inside a worker (bounds its memory)
KILL_ENV = "TTT_PREPARE_TEST_KILL"  # tests only: "worker:<shard>" or "main:<finished shards>"


@dataclass
class PrepareConfig:
    """What :func:`prepare_corpus` prepares.

    Attributes:
        source: corpus (see :func:`ttt.data.iter_documents`); None = built-in Shakespeare.
        text_field: text field of JSONL records / dataset rows.
        data_files: ``data_files`` of ``datasets.load_dataset`` for ``hf:`` sources (``hf:json``, ...).
        streaming: load ``hf:`` sources with ``streaming=True`` (no Arrow cache is built).
        tokenizer: ``"byte"``, ``"bpe"``, a saved tokenizer folder, or a prepared directory (its tokenizer).
        vocab_size: BPE vocabulary size (default 8192); for other tokenizers the largest allowed, if given.
        val_fraction: share of the characters that go to validation (whole documents), in ``[0, 1)``.
        seed: seed of the split (and of the BPE sample).
        workers: tokenizing processes (None: the CPU cores available; 1: in this process).
        shard_mb: MB of text (UTF-8) per shard.
        bpe_sample_mb: MB of training text the BPE tokenizer is trained on (a deterministic sample of
            whole documents; all of them when the training split is smaller).
    """

    source: str | None = None
    text_field: str = "text"
    data_files: str | list[str] | dict[str, Any] | None = None
    streaming: bool = False
    tokenizer: str = "byte"
    vocab_size: int | None = None
    val_fraction: float = 0.05
    seed: int = 0
    workers: int | None = None
    shard_mb: float = DEFAULT_SHARD_MB
    bpe_sample_mb: float = DEFAULT_BPE_SAMPLE_MB


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def check_prepare_config(cfg: PrepareConfig) -> None:
    """Validate the numbers of a :class:`PrepareConfig` (before any file is read)."""
    if not 0.0 <= float(cfg.val_fraction) < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.workers is not None and int(cfg.workers) < 1:
        raise DataError(f"workers must be at least 1, got {cfg.workers}")
    if not float(cfg.shard_mb) > 0:
        raise DataError(f"shard_mb must be positive, got {cfg.shard_mb}")
    if not float(cfg.bpe_sample_mb) > 0:
        raise DataError(f"bpe_sample_mb must be positive, got {cfg.bpe_sample_mb}")
    if cfg.vocab_size is not None and int(cfg.vocab_size) < 1:
        raise DataError(f"vocab_size must be positive, got {cfg.vocab_size}")
    if not cfg.text_field:
        raise DataError("text_field must be a non-empty field name")


# ----------------------------------------------------------------------------------------------------
# small helpers: the source identity, the lock
# ----------------------------------------------------------------------------------------------------


def source_spec(cfg: PrepareConfig) -> dict[str, Any]:
    """How the source was named (absolute paths), for the manifest."""
    src = cfg.source
    if is_shakespeare(src):
        name = "shakespeare"
    elif str(src).startswith("hf:"):
        name = str(src)
    else:
        p = Path(str(src)).expanduser()
        name = str(p.resolve()) if p.exists() else str(p.absolute())
    return {"source": name, "text_field": cfg.text_field, "data_files": cfg.data_files}


class _Fingerprint:
    """sha256 over document names and texts, fed one document at a time (== ``corpus_fingerprint``)."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def add(self, name: str, text_utf8: bytes) -> None:
        data = name.encode("utf-8", errors="surrogatepass")
        self.h.update(len(data).to_bytes(8, "little"))
        self.h.update(data)
        self.h.update(len(text_utf8).to_bytes(8, "little"))
        self.h.update(text_utf8)

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogatepass")


@contextlib.contextmanager
def _locked(out: Path, wait: bool = False) -> Iterator[None]:
    with open(out / LOCK, "w") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            raise DataError(f"another `ttt data prepare` is writing '{out}' (its {LOCK} is locked); wait for "
                            "it, or give another output directory") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------------------
# pass 1: scan (fingerprint + split keys) and the split
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    fingerprint: str
    num_docs: int
    num_bytes: int
    key_hi: np.ndarray  # uint64: first 8 bytes of sha256(seed, name), big-endian (the split's rank)
    key_lo: np.ndarray  # uint64: next 8 bytes
    chars: np.ndarray  # int64 characters per document


def _scan(cfg: PrepareConfig, log: Callable[[str], None]) -> _Scan:
    fp = _Fingerprint()
    hi, lo, chars = array.array("Q"), array.array("Q"), array.array("q")
    nbytes, t0, last = 0, time.perf_counter(), time.perf_counter()
    for d in _documents(cfg):
        data = _utf8(d.text)
        fp.add(d.name, data)
        nbytes += len(data)
        digest = bytes.fromhex(_rank_key(d.name, int(cfg.seed)))
        hi.append(int.from_bytes(digest[:8], "big"))
        lo.append(int.from_bytes(digest[8:16], "big"))
        chars.append(len(d.text))
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"scan: {len(chars)} documents, {nbytes / 1e6:.0f} MB of text read "
                f"({nbytes / 1e6 / (last - t0):.1f} MB/s)")
    if not chars:
        where = "the built-in Shakespeare corpus" if is_shakespeare(cfg.source) else f"'{cfg.source}'"
        raise DataError(f"the corpus {where} holds no non-empty documents")
    return _Scan(fp.hexdigest(), len(chars), nbytes, np.frombuffer(hi, np.uint64).copy(),
                 np.frombuffer(lo, np.uint64).copy(), np.frombuffer(chars, np.int64).copy())


def _val_mask(scan: _Scan, val_fraction: float) -> np.ndarray:
    """Validation documents, by the rule of :func:`ttt.data.split_documents` (for 2+ documents)."""
    mask = np.zeros(scan.num_docs, dtype=bool)
    if val_fraction == 0.0 or scan.num_docs < 2:
        return mask
    order = np.lexsort((scan.key_lo, scan.key_hi))[:-1]  # never all documents
    cum = np.cumsum(scan.chars[order])
    hit = np.flatnonzero(cum >= val_fraction * int(scan.chars.sum()))
    take = int(hit[0]) + 1 if hit.size else order.size
    mask[order[:take]] = True
    return mask


def _documents(cfg: PrepareConfig) -> Iterator[Document]:
    return iter_documents(cfg.source, cfg.text_field, cfg.data_files, cfg.streaming)


def _split_stream(cfg: PrepareConfig, scan: _Scan, val: np.ndarray,
                  fp: _Fingerprint | None = None) -> Iterator[tuple[str, Document]]:
    """``(split, document)`` of the corpus in order (a one-document corpus is cut in two)."""
    n = 0
    for i, d in enumerate(_documents(cfg)):
        n = i + 1
        if fp is not None:
            fp.add(d.name, _utf8(d.text))
        if i >= scan.num_docs:
            break
        if scan.num_docs == 1 and cfg.val_fraction > 0:
            train, held = _split_one(d, float(cfg.val_fraction))
            yield from (("train", p) for p in train)
            yield from (("val", p) for p in held)
        else:
            yield ("val" if val[i] else "train"), d
    if n != scan.num_docs:
        raise DataError(f"the corpus '{cfg.source}' changed while it was being prepared "
                        f"({scan.num_docs} documents, then {n}); run the prepare again")


# ----------------------------------------------------------------------------------------------------
# the tokenizer
# ----------------------------------------------------------------------------------------------------


def _bpe_sample(cfg: PrepareConfig, scan: _Scan, val: np.ndarray) -> Iterator[Document]:
    """A deterministic sample of the training documents, about ``bpe_sample_mb`` MB of text, in order."""
    train_chars = int(scan.chars[~val].sum()) if scan.num_docs > 1 else int(scan.chars.sum())
    rate = min(1.0, float(cfg.bpe_sample_mb) * 1e6 / max(1, train_chars))
    for split, d in _split_stream(cfg, scan, val):
        if split != "train":
            continue
        if rate >= 1.0:
            yield d
            continue
        u = int(hashlib.sha256(f"bpe-sample\0{cfg.seed}\0{d.name}".encode()).hexdigest()[:16], 16) / 2.0**64
        if u < rate:
            yield d


def _load_fixed_tokenizer(cfg: PrepareConfig) -> Any:
    """The tokenizer of a non-``bpe`` spec (a prepared directory stands for its tokenizer)."""
    from .shards import is_prepared_dir
    from .tokenizer import build_tokenizer

    spec = str(cfg.tokenizer).strip()
    return build_tokenizer(str(Path(spec).expanduser() / TOKENIZER_DIR) if is_prepared_dir(spec) else spec,
                           vocab_size=cfg.vocab_size)


def _tokenizer(cfg: PrepareConfig, out: Path, scan: _Scan, val: np.ndarray,
               log: Callable[[str], None], fixed: Any = None) -> Any:
    from .tokenizer import DEFAULT_BPE_VOCAB, load_tokenizer, train_bpe_from_documents

    final = out / TOKENIZER_DIR
    if fixed is None:
        if (final / "tokenizer.json").is_file():
            try:
                return load_tokenizer(final)
            except DataError:
                shutil.rmtree(final, ignore_errors=True)
        vocab = int(cfg.vocab_size or DEFAULT_BPE_VOCAB)
        log(f"training a BPE tokenizer ({vocab} tokens) on up to {cfg.bpe_sample_mb:g} MB of training text")
        tok = train_bpe_from_documents(_bpe_sample(cfg, scan, val), vocab)
    else:
        tok = fixed
    tmp = out / f".{TOKENIZER_DIR}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return tok


# ----------------------------------------------------------------------------------------------------
# pass 2: shards
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Task:
    folder: str
    name: str
    split: str
    index: int
    first_doc: int  # index of its first document inside its split
    names: list[str]
    texts: list[str]
    encoder: str | None  # tokenizers JSON (None: the byte tokenizer, ids = UTF-8 bytes)
    dtype: str
    plan: str


_ENCODERS: dict[str, Any] = {}


def _encoder(definition: str) -> Any:
    enc = _ENCODERS.get(definition)
    if enc is None:
        from tokenizers import Tokenizer

        enc = Tokenizer.from_str(definition)
        enc.encode_special_tokens = True  # special-token strings inside the text stay text
        enc.no_truncation()
        enc.no_padding()
        _ENCODERS.clear()
        _ENCODERS[definition] = enc
    return enc


def _worker_init(parent: int) -> None:
    """Worker start-up: die with the parent (a killed prepare leaves no orphans), one thread each."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _maybe_die(where: str, what: str) -> None:
    if os.environ.get(KILL_ENV) == f"{where}:{what}":
        os.kill(os.getpid(), signal.SIGKILL)


def _write_shard(task: _Task) -> dict[str, Any]:
    """Tokenize one shard and write its files (tokens, offsets, then the meta file that completes it)."""
    from .tokenizer import encode_documents

    folder = Path(task.folder)
    b, npz, meta_path = shard_paths(folder, task.name)
    dtype = np.dtype(task.dtype)
    limit = np.iinfo(dtype).max
    n = len(task.texts)
    offsets = np.zeros(n + 1, dtype=np.int64)
    doc_bytes = np.zeros(n, dtype=np.int64)
    sha = hashlib.sha256()
    total, start = 0, 0
    with atomic_open(b, "wb") as f:
        while start < n:
            stop, size = start, 0
            while stop < n and (stop == start or size + len(task.texts[stop]) <= ENCODE_BATCH_CHARS):
                size += len(task.texts[stop])
                stop += 1
            raw = [_utf8(t) for t in task.texts[start:stop]]
            if task.encoder is None:
                ids_list: list[Any] = [np.frombuffer(r, np.uint8) for r in raw]
            else:
                ids_list = encode_documents(_encoder(task.encoder), task.texts[start:stop])
            for j, ids in enumerate(ids_list):
                arr = np.asarray(ids, dtype=np.int64) if task.encoder is not None else ids
                if task.encoder is not None and arr.size and (arr.min() < 0 or arr.max() > limit):
                    raise DataError(f"token id {int(arr.max())} does not fit {dtype.name}")
                data = arr.astype(dtype).tobytes()
                f.write(data)
                sha.update(data)
                total += arr.size
                offsets[start + j + 1] = total
                doc_bytes[start + j] = len(raw[j])
            start = stop
    with atomic_open(npz, "wb") as f:
        np.savez(f, offsets=offsets, doc_bytes=doc_bytes)
    meta = {"name": task.name, "split": task.split, "index": task.index, "first_doc": task.first_doc,
            "num_docs": n, "num_tokens": int(total), "num_bytes": int(doc_bytes.sum()), "dtype": dtype.name,
            "sha256": sha.hexdigest(), "plan": task.plan}
    _maybe_die("worker", task.name)  # tests: the worst moment, data written but not marked finished
    atomic_write_json(meta_path, {**meta, "names": task.names})
    return meta


def _finished_shard(folder: Path, name: str, plan: str, first_doc: int, names: list[str],
                    texts: list[str], dtype: str) -> dict[str, Any] | None:
    """The meta of shard ``name`` if it was finished by a run of the same plan (else None)."""
    b, npz, meta_path = shard_paths(folder, name)
    try:
        meta = json.loads(meta_path.read_text())
        ok = (meta.get("plan") == plan and meta.get("first_doc") == first_doc and meta.get("names") == names
              and meta.get("num_bytes") == sum(len(_utf8(t)) for t in texts)
              and b.stat().st_size == int(meta["num_tokens"]) * np.dtype(dtype).itemsize and npz.is_file())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ok:
        return None
    meta.pop("names", None)
    return meta


def _shard_tasks(cfg: PrepareConfig, scan: _Scan, val: np.ndarray, folder: Path, encoder: str | None,
                 dtype: str, plan: str, fp: _Fingerprint) -> Iterator[_Task]:
    """The shards of both splits, in a fixed order, as soon as each is full."""
    limit = float(cfg.shard_mb) * 1e6
    buf: dict[str, tuple[list[str], list[str]]] = {s: ([], []) for s in ("train", "val")}
    size = {"train": 0, "val": 0}
    count = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}

    def flush(split: str) -> _Task:
        names, texts = buf[split]
        task = _Task(str(folder), f"{split}-{count[split]:05d}", split, count[split], docs[split], names,
                     texts, encoder, dtype, plan)
        count[split] += 1
        docs[split] += len(names)
        buf[split], size[split] = ([], []), 0
        return task

    for split, d in _split_stream(cfg, scan, val, fp):
        buf[split][0].append(d.name)
        buf[split][1].append(d.text)
        size[split] += len(d.text)
        if size[split] >= limit:
            yield flush(split)
    for split in ("train", "val"):
        if buf[split][0]:
            yield flush(split)


def _run_tasks(tasks: Iterator[_Task], workers: int, log: Callable[[str], None],
               total_bytes: int) -> list[dict[str, Any]]:
    """Finish every shard (skipping those already finished), in ``workers`` processes."""
    metas: list[dict[str, Any]] = []
    done_bytes, t0, last = 0, time.perf_counter(), time.perf_counter()

    def record(meta: dict[str, Any]) -> None:
        nonlocal done_bytes, last
        metas.append(meta)
        done_bytes += int(meta["num_bytes"])
        _maybe_die("main", str(len(metas)))
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"tokenized {done_bytes / 1e6:.0f} of {total_bytes / 1e6:.0f} MB of text "
                f"({done_bytes / 1e6 / (last - t0):.1f} MB/s), {len(metas)} shards")

    def finished(t: _Task) -> dict[str, Any] | None:
        return _finished_shard(Path(t.folder), t.name, t.plan, t.first_doc, t.names, t.texts, t.dtype)

    if workers == 1:
        for t in tasks:
            record(finished(t) or _write_shard(t))
        return metas
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; no fork warning
    pending: deque[tuple[dict[str, Any] | None, cf.Future | None]] = deque()
    try:
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                    initargs=(os.getpid(),)) as pool:
            for t in tasks:
                meta = finished(t)
                pending.append((meta, None) if meta is not None else (None, pool.submit(_write_shard, t)))
                while pending and (len(pending) > workers + 1 or pending[0][1] is None):
                    meta, fut = pending.popleft()
                    record(meta if fut is None else fut.result())
            while pending:
                meta, fut = pending.popleft()
                record(meta if fut is None else fut.result())
    except cf.process.BrokenProcessPool:
        raise DataError("a tokenizer worker died (killed or out of memory); run the same prepare again to "
                        "resume: finished shards are kept") from None
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    return metas


# ----------------------------------------------------------------------------------------------------
# the whole step
# ----------------------------------------------------------------------------------------------------


def _plan(cfg: PrepareConfig, scan: _Scan, tok_request: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "source": {**source_spec(cfg), "fingerprint": scan.fingerprint, "num_docs": scan.num_docs,
                   "num_bytes": scan.num_bytes},
        "split": {"val_fraction": float(cfg.val_fraction), "seed": int(cfg.seed)},
        "tokenizer_request": tok_request,
        "shard_mb": float(cfg.shard_mb),
    }


def _same_plan(out: Path, plan: dict[str, Any]) -> bool:
    try:
        return json.loads((out / PLAN).read_text()) == json.loads(json.dumps(plan))
    except (OSError, ValueError):
        return False


def prepare_corpus(cfg: PrepareConfig, out: str | Path, log: Callable[[str], None] | None = None,
                   wait: bool = False) -> dict[str, Any]:
    """Prepare ``cfg.source`` into the directory ``out`` (see the module docstring); return the manifest.

    An ``out`` already holding the same preparation of the same corpus is returned as is; one holding an
    interrupted run of it is resumed; one holding anything else prepared is replaced. With ``wait``, a
    prepare already writing ``out`` is waited for (instead of an error), and its result used.

    Raises:
        DataError: bad settings or corpus, a dead worker, or another prepare writing ``out``.
    """
    log = log or (lambda _msg: None)
    check_prepare_config(cfg)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    if (out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not (out / PLAN).is_file()
            and not (out / MANIFEST).is_file()):
        raise DataError(f"output directory '{out}' is not empty and holds no prepared corpus; "
                        "give a new or empty directory")
    workers = int(cfg.workers or default_workers())
    fixed_tok = None if str(cfg.tokenizer).strip().lower() == "bpe" else _load_fixed_tokenizer(cfg)
    tok_request: dict[str, Any] = {"spec": str(cfg.tokenizer), "vocab_size": cfg.vocab_size}
    if fixed_tok is None:
        tok_request["bpe_sample_mb"] = float(cfg.bpe_sample_mb)
    else:
        from .tokenizer import tokenizer_fingerprint

        tok_request["fingerprint"] = tokenizer_fingerprint(fixed_tok)
    t0 = time.perf_counter()
    scan = _scan(cfg, log)
    log(f"scanned {scan.num_docs} documents, {scan.num_bytes / 1e6:.1f} MB of text "
        f"in {time.perf_counter() - t0:.1f} s")
    plan = _plan(cfg, scan, tok_request)
    if (out / MANIFEST).is_file() and _same_plan(out, plan):
        with contextlib.suppress(DataError):
            return read_manifest(out)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out, wait):
        if (out / MANIFEST).is_file() and _same_plan(out, plan):  # finished by the prepare we waited for
            with contextlib.suppress(DataError):
                return read_manifest(out)
        for stale in out.glob(".*.tmp"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        if not _same_plan(out, plan):  # another corpus or settings: start over
            (out / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
            shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
            atomic_write_json(out / PLAN, plan)
        (out / MANIFEST).unlink(missing_ok=True)
        folder = out / SHARDS_DIR
        folder.mkdir(exist_ok=True)
        for stale in folder.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)
        val = _val_mask(scan, float(cfg.val_fraction))
        tok = _tokenizer(cfg, out, scan, val, log, fixed_tok)
        from .tokenizer import is_byte_tokenizer, text_encoder, tokenizer_fingerprint

        dtype = token_dtype(len(tok)).name
        tok_fp = tokenizer_fingerprint(tok)
        encoder = None if is_byte_tokenizer(tok) else text_encoder(tok).to_str()
        shard_plan = hashlib.sha256(json.dumps({"plan": plan, "tokenizer": tok_fp},
                                               sort_keys=True).encode()).hexdigest()
        fp = _Fingerprint()
        t1 = time.perf_counter()
        metas = _run_tasks(_shard_tasks(cfg, scan, val, folder, encoder, dtype, shard_plan, fp), workers, log,
                           scan.num_bytes)
        if fp.hexdigest() != scan.fingerprint:
            raise DataError(f"the corpus '{cfg.source}' changed while it was being prepared; run it again")
        splits: dict[str, Any] = {}
        for split in ("train", "val"):
            shards = [m for m in metas if m["split"] == split]
            if shards:
                splits[split] = {
                    "num_docs": sum(int(m["num_docs"]) for m in shards),
                    "num_tokens": sum(int(m["num_tokens"]) for m in shards),
                    "num_bytes": sum(int(m["num_bytes"]) for m in shards),
                    "shards": [{k: m[k] for k in ("name", "num_docs", "num_tokens", "num_bytes", "sha256")}
                               for m in shards],
                }
        keep = {f"{m['name']}{ext}" for m in metas for ext in (".bin", ".npz", ".json")}
        for f in folder.iterdir():  # shards of an earlier, longer plan
            if f.name not in keep:
                f.unlink(missing_ok=True)
        manifest = {
            **plan,
            "tokenizer": {"spec": str(cfg.tokenizer), "dir": TOKENIZER_DIR, "fingerprint": tok_fp,
                          "vocab_size": len(tok)},
            "dtype": dtype,
            "splits": splits,
            "num_tokens": sum(s["num_tokens"] for s in splits.values()),
        }
        atomic_write_json(out / MANIFEST, manifest)
        log(f"tokenized {scan.num_bytes / 1e6:.1f} MB of text into {manifest['num_tokens']} tokens in "
            f"{time.perf_counter() - t1:.1f} s with {workers} worker(s)")
    return manifest


def prepare_config_dict(cfg: PrepareConfig) -> dict[str, Any]:
    """``cfg`` as a plain dict."""
    return asdict(cfg)
