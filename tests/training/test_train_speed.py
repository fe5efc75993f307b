"""Smoke run of the training-throughput benchmark at a tiny size."""

from __future__ import annotations

import json
from pathlib import Path

from ttt.benchmarks.train_speed import main
from ttt.models.registry import ARCHS


def test_train_speed_smoke(tmp_path: Path, capsys) -> None:
    payload = main(
        [
            "--size",
            "tiny",
            "--lengths",
            "32",
            "64",
            "--tokens-per-step",
            "128",
            "--reps",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "train_speed.json").read_text())
    assert saved["results"] == payload["results"]
    assert len(payload["results"]) == 2 * len(ARCHS)
    for r in payload["results"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["tokens_per_step"] == 128
    out = capsys.readouterr().out
    assert "| arch |" in out and "tokens/s @ 64" in out


def test_train_speed_one_architecture_at_a_time(tmp_path: Path) -> None:
    payload = main(["--size", "tiny", "--lengths", "32", "--tokens-per-step", "64", "--reps", "2",
                    "--arches", "ttt-linear", "transformer", "--no-interleave", "--out", str(tmp_path)])
    assert payload["interleaved"] is False
    assert [r["arch"] for r in payload["results"]] == ["ttt-linear", "transformer"]
    assert all(r["runs"] == 2 and r["tokens_per_s"] > 0 for r in payload["results"])
