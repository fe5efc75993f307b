"""Small synthetic corpora for the data-layer tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_helpers import TEXTS


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name, text in TEXTS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(TEXTS.values()):
            f.write(json.dumps({"id": i, "text": text, "body": text.upper()}) + "\n")
    return path
