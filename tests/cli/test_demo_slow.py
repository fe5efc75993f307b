"""The `make demo` study itself (minutes): run with `make test-slow`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ttt.cli import app


@pytest.mark.slow
def test_demo_preset_beats_unigram(tmp_path) -> None:
    res = CliRunner().invoke(app, ["compare", "--preset", "demo", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    unigram = data["unigram"]["bits_per_byte"]
    for arch, r in data["runs"].items():
        assert r["eval"]["bits_per_byte"] < 0.85 * unigram, arch
        assert r["eval"]["last_quarter_loss"] < r["eval"]["first_quarter_loss"], arch
    assert "Unigram" in (tmp_path / "report.md").read_text()
