"""End-to-end CLI runs on tiny configurations with the real data, registry and trainer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttt.cli import app

runner = CliRunner()
ARCH_LABELS = ("TTT-Linear", "TTT-MLP", "Transformer", "Mamba", "Mamba-2")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3-step TTT-Linear run made with ``ttt train``."""
    root = tmp_path_factory.mktemp("train")
    args = [
        "train",
        "tiny",
        f"train.run_dir={root / 'run'}",
        f"data.cache_dir={root / 'cache'}",
        "data.seq_len=64",
        "data.val_rows=2",
        "train.steps=3",
        "train.micro_batch_size=2",
        "train.eval_every=0",
        "log.progress=false",
        "log.tensorboard=false",
        "train.device=cpu",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return root / "run"


def test_train_writes_a_run(run_dir: Path) -> None:
    assert (run_dir / "checkpoints" / "latest").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and not summary["interrupted"]


def test_train_resume_and_bad_config(run_dir: Path, tmp_path) -> None:
    res = runner.invoke(app, ["train", "tiny", "model.arch=lstm", f"train.run_dir={tmp_path / 'r'}"])
    assert res.exit_code == 2 and "lstm" in res.output
    res = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_eval_run_dir_writes_into_the_run(run_dir: Path) -> None:
    out = run_dir / "eval"  # the default output directory of a run
    args = ["eval", str(run_dir), "--seq-len", "64", "--max-windows", "8", "--buckets", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "eval.json").read_text())
    for key in ("loss", "perplexity", "bits_per_byte", "first_quarter_loss", "last_quarter_loss"):
        assert math.isfinite(data[key]), key
    assert data["bytes_per_token"] == pytest.approx(1.0)  # byte tokenizer
    assert data["bits_per_byte"] == pytest.approx(data["loss"] / math.log(2))
    assert len(data["bucket_loss"]) == 4 and data["num_windows"] == 8 and data["seq_len"] == 64
    assert (out / "loss_by_position.png").stat().st_size > 1000


def test_eval_context_longer_than_documents(run_dir: Path, tmp_path) -> None:
    res = runner.invoke(app, ["eval", str(run_dir), "--seq-len", "100000000", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert "longer than every evaluation document" in res.output


def test_eval_registry_arch(tmp_path) -> None:
    res = runner.invoke(
        app, ["eval", "--arch", "mamba2", "--seq-len", "32", "--max-windows", "2", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "eval.json").read_text())["num_windows"] == 2
    res = runner.invoke(app, ["eval", "--arch", "rwkv", "--seq-len", "32", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown architecture" in res.output


def test_generate_streams_text(run_dir: Path) -> None:
    res = runner.invoke(
        app, ["generate", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "1"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.startswith("ROMEO:") and len(res.output) > len("ROMEO:")
    greedy = [
        runner.invoke(app, ["generate", str(run_dir), "--temperature", "0", "--max-new-tokens", "8"])
        for _ in range(2)
    ]
    assert greedy[0].output == greedy[1].output


def test_compare_smoke_report(tmp_path) -> None:
    out = tmp_path / "study"
    res = runner.invoke(app, ["compare", "--preset", "smoke", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    md = (out / "report.md").read_text()
    for label in ARCH_LABELS:
        assert f"| {label} |" in md, label
    assert "| Unigram (train frequencies) |" in md
    data = json.loads((out / "results.json").read_text())
    assert list(data["runs"]) == ["ttt-linear", "ttt-mlp", "transformer", "mamba", "mamba2"]
    params = [r["params_non_embedding"] for a, r in data["runs"].items() if a != "ttt-mlp"]
    assert max(params) / min(params) < 1.05  # baselines matched to TTT-Linear
    for r in data["runs"].values():
        assert r["tokens"] == data["config"]["train_tokens"]
        assert all(math.isfinite(r["eval"][k]) for k in ("loss", "bits_per_byte", "first_quarter_loss"))
        assert r["curve"] and r["latency"]["prefill_ms"] > 0 and r["tokens_per_s"] > 0
    for name in ("val_loss.png", "loss_by_position.png"):
        assert (out / name).stat().st_size > 1000
    for name in ("report.md", "val_loss.png", "loss_by_position.png", "samples.md"):
        assert name in res.output
    # a second run reuses every finished run
    res = runner.invoke(app, ["compare", "--preset", "smoke", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0 and res.output.count("reusing finished run") == 5
