"""Helpers for the training tests: tiny configs, metrics readers, subprocess launches."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from ttt.training import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[2]

# A tiny, fast setup: 4 layers x 64 wide, rows of 64 tokens, 2 rows per micro-batch.
TINY = [
    "model.size=tiny",
    "data.seq_len=64",
    "data.val_rows=4",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "checkpoint.every=0",
    "log.progress=false",
    "log.tensorboard=false",
]


def tiny_overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [*TINY, f"train.run_dir={run_dir}", f"data.cache_dir={cache}", *extra]


def tiny_config(run_dir: Path, cache: Path, *extra: str) -> TrainConfig:
    return load_config("tiny", tiny_overrides(run_dir, cache, *extra))


def records(run_dir: Path, split: str = "train") -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("split") == split]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env["PYTHONPATH"]) if p)
    return env


def launch(args: list[str], nproc: int = 1) -> list[str]:
    """Command line for ``python -m ttt train ARGS`` (under torchrun when ``nproc > 1``)."""
    if nproc == 1:
        return [sys.executable, "-m", "ttt", "train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "ttt",
        "train",
        *args,
    ]


def run(args: list[str], nproc: int = 1, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        launch(args, nproc), env=cli_env(), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc
