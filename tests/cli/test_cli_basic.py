"""CLI commands that need neither the corpus nor the trainer: help, mqar, bench, bad inputs."""

from __future__ import annotations

import json
import sys
import types

import pytest
from typer.testing import CliRunner

from ttt.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["eval"], ["train"], ["generate"], ["compare"], ["mqar"], ["bench"]])
def test_help_everywhere(cmd: list[str]) -> None:
    res = runner.invoke(app, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    assert "Usage" in res.output


def test_mqar_smoke_end_to_end(tmp_path) -> None:
    args = ["mqar", "--preset", "smoke", "--device", "cpu", "--out", str(tmp_path)]
    res = runner.invoke(app, [*args, "--archs", "ttt-linear,transformer"])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "mqar.json").read_text())
    assert {r["arch"] for r in data["rows"]} == {"ttt-linear", "transformer"}
    assert all(0 <= r["accuracy"] <= 1 for r in data["rows"])
    md = (tmp_path / "mqar.md").read_text()
    assert "ttt-linear" in md and "transformer" in md
    assert (tmp_path / "mqar.png").stat().st_size > 1000


def test_mqar_unknown_arch_is_a_clear_error(tmp_path) -> None:
    res = runner.invoke(app, ["mqar", "--preset", "smoke", "--out", str(tmp_path), "--archs", "lstm"])
    assert res.exit_code == 2
    assert "unknown architecture" in res.output


def test_bench_dispatches_with_extra_args(monkeypatch) -> None:
    seen = {}
    mod = types.ModuleType("ttt.benchmarks.train_speed")
    mod.main = lambda argv=None: seen.setdefault("argv", argv)
    monkeypatch.setitem(sys.modules, "ttt.benchmarks.train_speed", mod)
    res = runner.invoke(app, ["bench", "train", "--steps", "2", "--arch", "x"])
    assert res.exit_code == 0, res.output
    assert seen["argv"] == ["--steps", "2", "--arch", "x"]


def test_bench_unknown() -> None:
    res = runner.invoke(app, ["bench", "nope"])
    assert res.exit_code == 2 and "unknown benchmark" in res.output


def test_missing_checkpoint_is_a_clear_error(tmp_path) -> None:
    for cmd in (["eval", str(tmp_path / "nowhere")], ["generate", str(tmp_path / "nowhere")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 2, res.output
        assert "no checkpoint or model directory" in res.output
    res = runner.invoke(app, ["generate", str(tmp_path)])  # exists, but holds no model
    assert res.exit_code == 2 and "holds no saved model" in res.output


def test_compare_unknown_arch_and_preset(tmp_path) -> None:
    res = runner.invoke(
        app, ["compare", "--preset", "smoke", "--archs", "ttt-linear,gpt5", "--out", str(tmp_path)]
    )
    assert res.exit_code == 2 and "unknown architecture" in res.output
    res = runner.invoke(app, ["compare", "--preset", "huge", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown preset" in res.output
