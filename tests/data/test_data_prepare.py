"""prepare_data end to end, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ttt.data import DataBundle, DataConfig, DataError, PackedRows, load_documents, prepare_data


def test_prepare_byte(text_dir: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(text_dir), seq_len=64, val_fraction=0.25, seed=0)
    bundle = prepare_data(cfg, tmp_path / "cache")
    assert isinstance(bundle, DataBundle) and bundle.val is not None
    assert len(bundle.tokenizer) == 257
    names = set(bundle.train.doc_names) | set(bundle.val.doc_names)
    assert names == {d.name for d in load_documents(str(text_dir))}
    assert set(bundle.train.doc_names).isdisjoint(bundle.val.doc_names)
    assert bundle.train.num_bytes + bundle.val.num_bytes == sum(
        len(p.read_bytes()) for p in text_dir.iterdir())
    assert len(PackedRows(bundle.train, 64)) > 0
    again = prepare_data(cfg, tmp_path / "cache")  # cached
    assert again.train.path == bundle.train.path and again.val.path == bundle.val.path
    text = bundle.tokenizer.decode(np.asarray(bundle.val.doc(0)).tolist())
    assert text == (text_dir / bundle.val.doc_names[0]).read_text(encoding="utf-8")


def test_prepare_bpe(text_dir: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(text_dir), tokenizer="bpe", vocab_size=320, val_fraction=0.25)
    bundle = prepare_data(cfg, tmp_path / "cache")
    assert bundle.tokenizer_dir is not None and (bundle.tokenizer_dir / "tokenizer.json").is_file()
    assert len(bundle.tokenizer) <= 320
    assert bundle.train.bytes_per_token > 1.0
    doc = np.asarray(bundle.train.doc(0)).tolist()
    assert bundle.tokenizer.decode(doc) == (text_dir / bundle.train.doc_names[0]).read_text(encoding="utf-8")
    again = prepare_data(cfg, tmp_path / "cache")  # tokenizer reused from the cache, same stores
    assert again.tokenizer_dir == bundle.tokenizer_dir and again.train.path == bundle.train.path


def test_prepare_jsonl_no_val(jsonl_file: Path, tmp_path: Path) -> None:
    bundle = prepare_data(DataConfig(source=str(jsonl_file), val_fraction=0.0), tmp_path)
    assert bundle.val is None and bundle.train.num_docs == 4


def test_prepare_single_file_is_split(text_dir: Path, tmp_path: Path) -> None:
    bundle = prepare_data(DataConfig(source=str(text_dir / "alpha.txt"), val_fraction=0.2), tmp_path)
    assert bundle.train.doc_names == ["alpha.txt#train"] and bundle.val.doc_names == ["alpha.txt#val"]


def test_prepare_shakespeare_split(tmp_path: Path) -> None:
    # the Shakespeare corpus is large: check the split only through a tiny seq_len-free byte run
    bundle = prepare_data(DataConfig(val_fraction=0.05), tmp_path)
    assert bundle.val.doc_names == ["othello", "troilus_and_cressida"]
    assert bundle.train.num_docs == 40 and bundle.train.tokens.dtype == np.uint16


def test_prepare_errors(text_dir: Path, jsonl_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="corpus path '.*missing' does not exist"):
        prepare_data(DataConfig(source=str(tmp_path / "missing")), cache)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="holds no non-empty documents"):
        prepare_data(DataConfig(source=str(tmp_path / "empty")), cache)
    with pytest.raises(DataError, match="no text field 'content'"):
        prepare_data(DataConfig(source=str(jsonl_file), text_field="content"), cache)
    sizes = prepare_data(DataConfig(source=str(text_dir), val_fraction=0.25), cache)
    n_val, n_train = sizes.val.num_tokens, sizes.train.num_tokens
    assert n_val < n_train
    with pytest.raises(DataError, match=f"the validation split holds {n_val} tokens .* less than one row of "
                                        f"seq_len={n_val + 1}; .* or a larger val_fraction"):
        prepare_data(DataConfig(source=str(text_dir), seq_len=n_val + 1, val_fraction=0.25), cache)
    with pytest.raises(DataError, match=r"the training split holds \d+ tokens .* seq_len=100000"):
        prepare_data(DataConfig(source=str(text_dir), seq_len=100000, val_fraction=0.25), cache)
    with pytest.raises(DataError, match="val_fraction must be in"):
        prepare_data(DataConfig(source=str(text_dir), val_fraction=1.5), cache)
    with pytest.raises(DataError, match="holds only 200"):
        prepare_data(DataConfig(source=str(text_dir), vocab_size=200), cache)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match="field 'text' holds int, not a string"):
        prepare_data(DataConfig(source=str(bad)), cache)
