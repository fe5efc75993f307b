"""What every command promises a user: one-line errors with exit 2, exit 130 on Ctrl-C / SIGTERM, a
start-up banner and plain log lines, resume from the run's saved config, ``--device auto`` defaults."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from ttt.cli import app, command

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()

FAST = [
    "data.seq_len=32",
    "data.val_rows=2",
    "train.micro_batch_size=2",
    "train.eval_every=1",
    "checkpoint.every=0",
    "log.tensorboard=false",
    "log.print_every=1",
    "train.device=cpu",
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small text corpus (tokenizing it takes milliseconds, unlike the built-in Shakespeare)."""
    words = ["thou", "art", "more", "lovely", "and", "temperate", "rough", "winds", "do", "shake"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def ttt(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``python -m ttt ARGS`` in a subprocess, as a user runs it (stderr is not a terminal)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "ttt", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def assert_one_line_error(res: subprocess.CompletedProcess | object, needle: str) -> None:
    code = getattr(res, "returncode", getattr(res, "exit_code", None))
    err = getattr(res, "stderr", None) or getattr(res, "output", "")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err[-3000:]
    assert "Traceback" not in err


def test_user_errors_are_one_line_with_exit_2(tmp_path: Path, corpus: Path) -> None:
    """In a real process: a bad JSONL corpus, then (in-process, same handler) the other bad inputs."""
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"body": "no text field here"}\n')
    res = ttt("train", "tiny", *FAST, f"data.source={bad_jsonl}", f"train.run_dir={tmp_path / 'a'}",
              f"data.cache_dir={tmp_path / 'cache'}")
    assert_one_line_error(res, "no text field 'text'")

    cases = [
        (["train", "tiny", "model.arch=lstm"], "model.arch"),
        (["train", "tiny", f"data.source={corpus}", "data.seq_len=100000", f"train.run_dir={tmp_path / 'b'}",
          f"data.cache_dir={tmp_path / 'cache'}"], "seq_len=100000"),
        (["train", "tiny", "optim.lr=fast"], "optim.lr"),
        (["train", "nowhere.yaml"], "does not exist"),
        (["compare", "--preset", "smoke", "-s", "train_tokens=lots", "--out", str(tmp_path)], "train_tokens"),
        (["eval", str(tmp_path / "nowhere")], "no checkpoint or model directory"),
    ]
    if not torch.cuda.is_available():
        cases.append((["train", "tiny", "train.device=cuda", f"train.run_dir={tmp_path / 'd'}"], "CUDA"))
        cases.append((["eval", "--arch", "mamba", "--device", "cuda"], "CUDA"))
    for args, needle in cases:
        assert_one_line_error(runner.invoke(app, args), needle)


def test_existing_run_is_refused_then_resumed_with_its_saved_config(tmp_path: Path, corpus: Path) -> None:
    run = tmp_path / "run"
    args = ["train", "tiny", *FAST, "train.steps=2", f"train.run_dir={run}", f"data.cache_dir={tmp_path}",
            f"data.source={corpus}"]
    first = runner.invoke(app, args)  # stderr is captured, so not a terminal
    assert first.exit_code == 0, first.output[-3000:]
    err = first.stderr
    # start-up banner, validation losses and plain progress lines (stderr is not a terminal here)
    for needle in ("parameters", "device cpu", "tokens/step", f"corpus {corpus}", "tokenizer byte"):
        assert needle in err, err
    assert "step 1: validation loss" in err and "step 2/2 | loss" in err and "\r" not in err
    # the same command again: the run exists
    assert_one_line_error(runner.invoke(app, args), "already holds checkpoints")
    # resume from the run directory alone: the saved config (seq_len 32, ...) comes back
    res = runner.invoke(app, ["train", str(run), "--resume", "--print-config"])
    assert res.exit_code == 0, res.output
    restored = yaml.safe_load(res.output)
    assert restored["data"]["seq_len"] == 32 and restored["train"]["steps"] == 2
    assert_one_line_error(runner.invoke(app, ["train", str(run), "--resume", "optim.lr=0.5"]),
                          "cannot resume with a changed optim.lr")
    res = runner.invoke(app, ["train", str(run), "--resume", "train.steps=3"])
    assert res.exit_code == 0, res.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and not summary["interrupted"]
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 3


def test_compare_stops_on_sigterm_with_a_checkpoint_and_exit_130(tmp_path: Path, corpus: Path) -> None:
    """SIGTERM in ``ttt compare`` (Ctrl-C is tested on ``ttt train``, tests/training/test_distributed.py)."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "ttt", "compare", "--preset", "smoke", "--device", "cpu", "--out", str(out),
           "--archs", "transformer", "train_tokens=100_000_000", "train_overrides.train.log_every=1",
           f"data={corpus}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "runs" / "transformer" / "metrics.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert (out / "runs" / "transformer" / "checkpoints" / "latest").is_file()


def test_command_wrapper_maps_interrupts_to_130() -> None:
    @command
    def interrupted() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as stop:
        interrupted()
    assert stop.value.exit_code == 130


def test_device_defaults_to_auto_everywhere() -> None:
    for info in app.registered_commands:
        params = inspect.signature(info.callback).parameters
        if "device" in params:
            default = params["device"].default.default
            assert default in ("auto", None), (info.name, default)  # None: the preset's, itself auto
