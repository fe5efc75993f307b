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


# ----------------------------------------------------------------------------------------------------
# kill -9 tests: a trainer in a child process (forkserver: torch is imported once), killed from outside or
# killing itself at a chosen point of a checkpoint write
CRASH_POINTS = ("tmp", "rename", "prune", "metrics")


def _crash_at(point: str, nth: int) -> None:
    """Make this process SIGKILL itself at the ``nth`` passage through ``point``:

    * ``tmp``: after the model file of a checkpoint is written into its temporary directory;
    * ``rename``: after ``step_N`` is renamed into place, before ``latest`` names it;
    * ``prune``: before a directory is deleted (an old checkpoint renamed away by the pruning);
    * ``metrics``: when the metric files are about to be rewritten on resume.
    """
    import shutil
    import signal

    from ttt.training import checkpoint as ckpt
    from ttt.training import metrics

    count = [0]

    def hit() -> None:
        count[0] += 1
        if count[0] == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(module: object, name: str, before: bool) -> None:
        original = getattr(module, name)

        def wrapped(*args: object, **kwargs: object) -> object:
            if before:
                hit()
            out = original(*args, **kwargs)
            if not before:
                hit()
            return out

        setattr(module, name, wrapped)

    if point == "tmp":
        wrap(ckpt, "save_file", before=False)
    elif point == "rename":
        wrap(ckpt, "atomic_write_text", before=True)
    elif point == "prune":
        wrap(shutil, "rmtree", before=True)  # this child process only
    elif point == "metrics":
        wrap(metrics, "atomic_write_text", before=True)
    else:
        raise ValueError(point)


def train_child(overrides: list[str], crash: tuple[str, int] | None = None) -> None:
    """Child process: train (resuming the run's latest checkpoint when there is one), optionally crashing."""
    import torch

    from ttt.training.checkpoint import list_checkpoints

    torch.set_num_threads(1)
    if crash is not None:
        _crash_at(*crash)
    cfg = load_config("tiny", overrides)
    from ttt.training import Trainer

    Trainer(cfg, resume=True if list_checkpoints(cfg.run_path()) else None, log=None).fit()
