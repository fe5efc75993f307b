"""Prepared (sharded) corpora against the single-file store: same ids, documents, split; resume; sampler.

The reference of every comparison is computed independently: ``load_documents`` -> ``split_documents``
-> ``build_token_store`` (the whole corpus in memory, one process, one file per split).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from data_helpers import TEXTS

from ttt.data import (
    DataConfig,
    DataError,
    PackedRows,
    PrepareConfig,
    ResumableSampler,
    ShardedTokenStore,
    build_token_store,
    build_tokenizer,
    corpus_fingerprint,
    load_documents,
    prepare_corpus,
    prepare_data,
    split_documents,
    train_bpe_tokenizer,
)
from ttt.data.prepare import KILL_ENV


def _many_docs(tmp_path: Path, n: int = 60) -> Path:
    """A JSONL corpus of ``n`` varied documents (a few KB in all)."""
    rng = np.random.default_rng(0)
    words = " ".join(TEXTS.values()).split()
    path = tmp_path / "many.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            k = int(rng.integers(5, 120))
            f.write(json.dumps({"text": " ".join(rng.choice(words, k)) + f"\n#{i}\n"}) + "\n")
    return path


def _reference(source: str, tok, val_fraction: float, seed: int, cache: Path, **kw):
    docs = load_documents(source, **kw)
    train, val = split_documents(docs, val_fraction, seed)
    return (docs, build_token_store(train, tok, cache, "train"),
            build_token_store(val, tok, cache, "val") if val else None)


def _same_store(sharded: ShardedTokenStore, ref) -> None:
    assert sharded.num_docs == ref.num_docs and sharded.num_tokens == ref.num_tokens
    np.testing.assert_array_equal(np.asarray(sharded.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(sharded.doc_offsets, ref.doc_offsets)
    np.testing.assert_array_equal(sharded.doc_bytes, ref.doc_bytes)
    assert list(sharded.doc_names) == list(ref.doc_names)
    assert sharded.tokens.dtype == ref.tokens.dtype
    for i in range(ref.num_docs):  # documents never cross shards: each is one view
        np.testing.assert_array_equal(sharded.doc(i), ref.doc(i))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".lock",)}


@pytest.mark.parametrize("kind", ["folder", "jsonl", "single-file", "shakespeare"])
def test_sharded_equals_single_file_store(kind: str, text_dir: Path, tmp_path: Path) -> None:
    source = {"folder": str(text_dir), "jsonl": str(_many_docs(tmp_path)),
              "single-file": str(text_dir / "beta.txt"), "shakespeare": "shakespeare"}[kind]
    shard_mb = 0.4 if kind == "shakespeare" else 0.0005  # several shards per split
    tok = build_tokenizer("byte")
    docs, ref_train, ref_val = _reference(source, tok, 0.25 if kind != "shakespeare" else 0.05, 3,
                                          tmp_path / "ref")
    out = tmp_path / "prepared"
    frac = 0.25 if kind != "shakespeare" else 0.05
    manifest = prepare_corpus(PrepareConfig(source=source, val_fraction=frac, seed=3, workers=1,
                                            shard_mb=shard_mb), out)
    assert manifest["source"]["fingerprint"] == corpus_fingerprint(docs)
    assert manifest["source"]["num_docs"] == len(docs)
    train, val = ShardedTokenStore.open(out, "train"), ShardedTokenStore.open(out, "val")
    assert train.num_shards > 1 or kind == "single-file"
    _same_store(train, ref_train)
    _same_store(val, ref_val)
    assert manifest["num_tokens"] == ref_train.num_tokens + ref_val.num_tokens


def test_bpe_equals_single_file_store_and_identical_for_any_workers(text_dir: Path, tmp_path: Path) -> None:
    source = str(_many_docs(tmp_path, 40))
    docs = load_documents(source)
    train_docs, _ = split_documents(docs, 0.2, 0)
    tok = train_bpe_tokenizer(train_docs, 300)  # trained on all training documents, in memory
    _, ref_train, ref_val = _reference(source, tok, 0.2, 0, tmp_path / "ref")
    cfg = PrepareConfig(source=source, tokenizer="bpe", vocab_size=300, val_fraction=0.2, workers=1,
                        shard_mb=0.001)
    one = tmp_path / "one"
    prepare_corpus(cfg, one)
    saved = build_tokenizer(str(one / "tokenizer"))
    assert saved.get_vocab() == tok.get_vocab()  # sample (all of the training text) == the in-memory one
    _same_store(ShardedTokenStore.open(one, "train"), ref_train)
    _same_store(ShardedTokenStore.open(one, "val"), ref_val)
    two = tmp_path / "two"
    prepare_corpus(PrepareConfig(**{**cfg.__dict__, "workers": 2}), two)
    assert _files(one) == _files(two)  # nothing depends on the number of workers
    # a small BPE sample: a deterministic subset of the training documents
    small = PrepareConfig(**{**cfg.__dict__, "bpe_sample_mb": 0.0005})
    prepare_corpus(small, tmp_path / "s1")
    prepare_corpus(small, tmp_path / "s2")
    assert (tmp_path / "s1/tokenizer/tokenizer.json").read_bytes() == (
        tmp_path / "s2/tokenizer/tokenizer.json").read_bytes()
    assert build_tokenizer(str(tmp_path / "s1/tokenizer")).get_vocab() != tok.get_vocab()
    # the saved tokenizer is reused by another preparation (a prepared directory stands for its tokenizer)
    reuse = prepare_corpus(PrepareConfig(source=str(text_dir), tokenizer=str(one), workers=1), tmp_path / "r")
    assert reuse["tokenizer"]["fingerprint"] == json.loads((one / "manifest.json").read_text())[
        "tokenizer"]["fingerprint"]


def _run_in_child(cfg: PrepareConfig, out: Path, kill: str) -> int:
    """``prepare_corpus`` in a forked child process (no interpreter start-up); its exit code."""
    import multiprocessing

    def target() -> None:
        os.environ[KILL_ENV] = kill
        prepare_corpus(cfg, out)

    proc = multiprocessing.get_context("fork").Process(target=target)
    proc.start()
    proc.join(60)
    return proc.exitcode


def test_killed_worker_resumes_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = str(_many_docs(tmp_path, 80))
    cfg = PrepareConfig(source=source, val_fraction=0.1, workers=2, shard_mb=0.0008)
    ref = tmp_path / "ref"
    manifest = prepare_corpus(PrepareConfig(**{**cfg.__dict__, "workers": 1}), ref)
    assert len(manifest["splits"]["train"]["shards"]) >= 6
    reference = _files(ref)

    # a worker is killed while it writes shard train-00004: the run fails with a clear error ...
    out = tmp_path / "out"
    monkeypatch.setenv(KILL_ENV, "worker:train-00004")
    with pytest.raises(DataError, match="a tokenizer worker died .* run the same prepare again"):
        prepare_corpus(cfg, out)
    monkeypatch.delenv(KILL_ENV)
    assert not (out / "manifest.json").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert "train-00000.json" in kept and "train-00004.json" not in kept
    assert (out / "shards" / "train-00004.bin").exists()  # killed after its data, before its mark
    # ... and the same command finishes it, keeping the finished shards, identical to an uninterrupted run
    prepare_corpus(cfg, out)
    assert _files(out) == reference
    assert all((out / "shards" / n).stat().st_mtime_ns == t for n, t in kept.items())



def test_killed_process_resumes_identically(tmp_path: Path) -> None:
    source = str(_many_docs(tmp_path, 80))
    cfg = PrepareConfig(source=source, val_fraction=0.1, workers=2, shard_mb=0.0008)
    ref = tmp_path / "ref"
    prepare_corpus(PrepareConfig(**{**cfg.__dict__, "workers": 1}), ref)
    reference = _files(ref)
    # the whole process is killed (SIGKILL) after 3 finished shards; its workers die with it
    out2 = tmp_path / "out2"
    assert _run_in_child(cfg, out2, "main:3") == -9
    assert not (out2 / "manifest.json").exists() and len(list((out2 / "shards").glob("*.json"))) >= 3
    assert _run_in_child(cfg, out2, "") == 0  # resumed in another process
    assert _files(out2) == reference


def test_sampler_over_shards_resumes_exactly(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    source = str(_many_docs(tmp_path, 120))
    _, ref_train, _ = _reference(source, build_tokenizer("byte"), 0.1, 0, cache)
    out = tmp_path / "p"
    prepare_corpus(PrepareConfig(source=source, val_fraction=0.1, workers=1, shard_mb=0.001), out)
    train = ShardedTokenStore.open(out, "train")
    assert train.num_shards >= 4
    seq = 48
    rows, ref_rows = PackedRows(train, seq), PackedRows(ref_train, seq)
    assert len(rows) == len(ref_rows)
    crossing = 0
    for i in range(len(rows)):  # every row, those spanning two shards included
        a, b = rows[i], ref_rows[i]
        for k in a:
            assert a[k].equal(b[k])
        crossing += int(len({int(np.searchsorted(train.tokens.starts, p, side="right"))
                             for p in (i * seq, (i + 1) * seq - 1)}) > 1)
    assert crossing >= 2

    def batches(sampler: ResumableSampler, n: int) -> list[list[int]]:
        out, it = [], iter(sampler)
        while len(out) < n:
            try:
                out.append(next(it))
            except StopIteration:
                it = iter(sampler)
        return out

    full = batches(ResumableSampler(len(rows), 8, seed=5), 2 * len(rows) // 8 + 3)  # across an epoch end
    first = ResumableSampler(len(rows), 8, seed=5)
    head = batches(first, 7)
    state = json.loads(json.dumps(first.state_dict()))
    for world in (1, 2, 4):  # resumed by any number of ranks: their slices make up the same global batches
        ranks = [ResumableSampler(len(rows), 8, seed=5, rank=r, world_size=world) for r in range(world)]
        for s in ranks:
            s.load_state_dict(state)
        tails = [batches(s, len(full) - 7) for s in ranks]
        resumed = [sum((t[j] for t in tails), []) for j in range(len(full) - 7)]
        assert head + resumed == full
    tokens = [np.concatenate([rows[i]["input_ids"].numpy() for i in b]) for b in full[:3]]
    ref_tokens = [np.concatenate([ref_rows[i]["input_ids"].numpy() for i in b]) for b in full[:3]]
    assert all((a == b).all() for a, b in zip(tokens, ref_tokens))


def test_uint32_shards(text_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Vocabularies over 65536 tokens are written as uint32 (forced here: such tokenizers load slowly)."""
    import ttt.data.prepare as prep
    import ttt.data.store as store

    for module in (prep, store):
        monkeypatch.setattr(module, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    _, ref_train, ref_val = _reference(str(text_dir), build_tokenizer("byte"), 0.25, 0, tmp_path / "ref")
    out = tmp_path / "p"
    manifest = prepare_corpus(PrepareConfig(source=str(text_dir), val_fraction=0.25, workers=2,
                                            shard_mb=0.0005), out)
    assert manifest["dtype"] == "uint32" and ref_train.tokens.dtype == np.uint32
    train = ShardedTokenStore.open(out, "train")
    assert (out / "shards" / "train-00000.bin").stat().st_size == 4 * int(train.doc_offsets[1])
    _same_store(train, ref_train)
    _same_store(ShardedTokenStore.open(out, "val"), ref_val)


def test_sharded_tokens_indexing(tmp_path: Path) -> None:
    from ttt.data import ShardedTokens

    parts = [np.arange(5, dtype=np.uint16), np.zeros(0, np.uint16), np.arange(100, 103, dtype=np.uint16),
             np.arange(200, 211, dtype=np.uint16)]
    paths = []
    for k, p in enumerate(parts):
        paths.append(tmp_path / f"s{k}.bin")
        p.tofile(paths[-1])
    tokens, ref = ShardedTokens(paths, [p.size for p in parts], np.uint16), np.concatenate(parts)
    assert len(tokens) == ref.size and tokens.shape == ref.shape
    for key in [slice(None), slice(3, 9), slice(4, 5), slice(5, 8), slice(-4, None), slice(2, 17, 3),
                slice(9, 2), slice(0, 100)]:
        np.testing.assert_array_equal(tokens[key], ref[key])
    assert [int(tokens[i]) for i in range(-ref.size, ref.size)] == [int(x) for x in ref] * 2
    np.testing.assert_array_equal(np.asarray(tokens), ref)
    with pytest.raises(IndexError):
        tokens[ref.size]
    import pickle

    np.testing.assert_array_equal(pickle.loads(pickle.dumps(tokens))[2:12], ref[2:12])


def test_every_source_type(tmp_path: Path, text_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # if imported already
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jsonl = _many_docs(tmp_path, 30)
    (tmp_path / "j").mkdir()
    for i, line in enumerate(jsonl.read_text().splitlines()):  # several data files
        with open(tmp_path / "j" / f"part{i % 3}.jsonl", "a") as f:
            f.write(line + "\n")
    ds = datasets.Dataset.from_dict({"body": [t for t in TEXTS.values()] + ["", "tail doc"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1, 2])}).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "a" ).mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "same.txt").write_text("first copy of a name\n" * 3)
    (tmp_path / "b" / "same.txt").write_text("second copy of a name\n" * 3)
    files = sorted(str(p) for p in (tmp_path / "j").glob("*.jsonl"))
    cases = [
        (str(text_dir / "alpha.txt"), {}),
        (str(text_dir), {}),
        (str(text_dir / "*.txt"), {}),
        (str(tmp_path / "*" / "same.txt"), {}),  # equal names: every name gets its index
        (str(jsonl), {}),
        (str(tmp_path / "saved"), {"text_field": "body"}),
        (str(tmp_path / "saved_dict"), {"text_field": "body"}),
        ("hf:json", {"data_files": files}),
        ("hf:json@train", {"data_files": files, "streaming": True}),
        ("hf:text", {"data_files": str(text_dir / "alpha.txt")}),
    ]
    tok = build_tokenizer("byte")
    for i, (source, kw) in enumerate(cases):
        docs, ref_train, ref_val = _reference(source, tok, 0.2, 0, tmp_path / f"ref{i}", **kw)
        if source.startswith("hf:json"):
            assert [d.text for d in docs] == [json.loads(x)["text"] for f in files
                                              for x in Path(f).read_text().splitlines()]
        out = tmp_path / f"p{i}"
        manifest = prepare_corpus(PrepareConfig(source=source, val_fraction=0.2, workers=1, shard_mb=0.001,
                                                **kw), out)
        assert manifest["source"]["fingerprint"] == corpus_fingerprint(docs), source
        _same_store(ShardedTokenStore.open(out, "train"), ref_train)
        _same_store(ShardedTokenStore.open(out, "val"), ref_val)
    with pytest.raises(DataError, match="data_files applies to 'hf:' sources"):
        prepare_corpus(PrepareConfig(source=str(jsonl), data_files="x.jsonl"), tmp_path / "bad")
    with pytest.raises(DataError, match="could not load the Hugging Face dataset 'hf:json'"):
        prepare_corpus(PrepareConfig(source="hf:json", data_files=str(tmp_path / "none*.jsonl")),
                       tmp_path / "bad2")


def test_prepare_data_reads_a_prepared_directory(text_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_corpus(PrepareConfig(source=str(text_dir), tokenizer="bpe", vocab_size=300, val_fraction=0.25,
                                 workers=2, shard_mb=0.0005), out)
    implicit = prepare_data(DataConfig(source=str(text_dir), tokenizer="bpe", vocab_size=300,
                                       val_fraction=0.25), tmp_path / "cache")
    given = prepare_data(DataConfig(source=str(out), seq_len=16), tmp_path / "unused")
    assert given.train.path == out and isinstance(given.train, ShardedTokenStore)
    assert given.tokenizer.get_vocab() == implicit.tokenizer.get_vocab()
    _same_store(given.train, implicit.train)
    _same_store(given.val, implicit.val)
    assert not (tmp_path / "unused").exists()  # nothing prepared again
    with pytest.raises(DataError, match="was prepared with the tokenizer 'bpe', not 'gpt2'"):
        prepare_data(DataConfig(source=str(out), tokenizer="gpt2"), tmp_path / "unused")
    with pytest.raises(DataError, match=r"the training split holds \d+ tokens .* seq_len=100000"):
        prepare_data(DataConfig(source=str(out), seq_len=100000), tmp_path / "unused")
    # a truncated shard is reported, not read
    shard = next((out / "shards").glob("train-00001.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="shard 'train-00001' of .* does not match the manifest"):
        prepare_data(DataConfig(source=str(out)), tmp_path / "unused")


def test_prepare_errors_and_lock(text_dir: Path, tmp_path: Path) -> None:
    import fcntl

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty and holds no prepared corpus"):
        prepare_corpus(PrepareConfig(source=str(text_dir)), busy)
    out = tmp_path / "out"
    cfg = PrepareConfig(source=str(text_dir), workers=1)
    prepare_corpus(cfg, out)
    other = PrepareConfig(source=str(text_dir), workers=1, seed=1)
    with open(out / ".lock", "w") as f:  # another prepare holds the directory
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        with pytest.raises(DataError, match="another `ttt data prepare` is writing"):
            prepare_corpus(other, out)
    assert prepare_corpus(other, out)["split"]["seed"] == 1  # other settings: prepared again in place
    f = open(out / ".lock", "w")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    timer = threading.Timer(0.3, f.close)  # the other prepare finishes a moment later
    timer.start()
    assert prepare_corpus(cfg, out, wait=True)["split"]["seed"] == 0  # waited for, then prepared
    timer.join()
    for bad, msg in [({"workers": 0}, "workers must be at least 1"), ({"shard_mb": 0}, "shard_mb must be"),
                     ({"val_fraction": 1.0}, "val_fraction must be in"),
                     ({"vocab_size": 100}, "holds only 100")]:
        with pytest.raises(DataError, match=msg):
            prepare_corpus(PrepareConfig(source=str(text_dir), **bad), tmp_path / "x")


def test_cli_data_prepare(text_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ttt.cli import app

    runner = CliRunner()
    out = tmp_path / "p"
    res = runner.invoke(app, ["data", "prepare", str(text_dir), "--out", str(out), "--workers", "2",
                              "--val-fraction", "0.25", "--shard-mb", "0.0005"])
    assert res.exit_code == 0, res.output
    assert "train: " in res.output and "MB of text per second" in res.output
    assert ShardedTokenStore.open(out, "val").num_docs == 1
    res = runner.invoke(app, ["data", "info", str(out)])
    assert res.exit_code == 0 and '"num_docs": 3' in res.output
    res = runner.invoke(app, ["data", "prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "q")])
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["data", "info", str(tmp_path)])
    assert res.exit_code == 2 and "is not a prepared corpus" in res.output
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1  # one line
