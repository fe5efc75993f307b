"""Multi-process training on CPU (gloo): DDP/FSDP2 equal the single-process run; checkpoints move
between world sizes; SIGINT/SIGTERM save a checkpoint before exiting."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from training_utils import cli_env, launch, records, run, tiny_config, tiny_overrides, train_losses

from ttt.training import Trainer
from ttt.training.checkpoint import latest_checkpoint

REL_TOL = 1e-5  # 1 vs 2 processes differ only in float summation order
COMMON = (
    "model.arch=transformer",
    "train.steps=4",
    "train.global_batch_size=4",
    "train.eval_every=2",
    "checkpoint.every=2",
    "checkpoint.keep=5",
)


def _close(a: list[float], b: list[float]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= REL_TOL * abs(y), (a, b)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """The reference: one process, micro-batch 2 x accumulation 2."""
    run_dir = tmp_path_factory.mktemp("single") / "run"
    summary = Trainer(tiny_config(run_dir, data_cache, *COMMON)).fit()
    assert summary["world_size"] == 1
    return run_dir


def test_ddp_matches_single_process_and_checkpoints_cross_world_sizes(
    single: Path, tmp_path: Path, data_cache: Path
) -> None:
    ref = train_losses(single)
    # 2 processes, micro-batch 2 x accumulation 1: same global batch of 4 rows
    ddp = tmp_path / "ddp"
    run(["tiny", *tiny_overrides(ddp, data_cache, *COMMON)], nproc=2)
    _close(train_losses(ddp), ref)
    _close([r["loss"] for r in records(ddp, "val")], [r["loss"] for r in records(single, "val")])
    # world size 2 -> 1: resume the DDP run's step-2 checkpoint in one process
    to_one = tmp_path / "to_one"
    Trainer(tiny_config(to_one, data_cache, *COMMON), resume=ddp / "checkpoints" / "step_00000002").fit()
    _close(train_losses(to_one), ref[2:])
    # world size 1 -> 2
    to_two = tmp_path / "to_two"
    resume = f"--resume-from={single / 'checkpoints' / 'step_00000002'}"
    run(["tiny", *tiny_overrides(to_two, data_cache, *COMMON), resume], nproc=2)
    _close(train_losses(to_two), ref[2:])


def test_fsdp2_matches_single_process(single: Path, tmp_path: Path, data_cache: Path) -> None:
    fsdp = tmp_path / "fsdp"
    run(["tiny", *tiny_overrides(fsdp, data_cache, *COMMON, "dist.strategy=fsdp")], nproc=2)
    ref = train_losses(single)
    _close(train_losses(fsdp), ref)
    # an FSDP2 checkpoint (gathered to full tensors) resumes in one process
    back = tmp_path / "back"
    Trainer(tiny_config(back, data_cache, *COMMON), resume=fsdp / "checkpoints" / "step_00000002").fit()
    _close(train_losses(back), ref[2:])


def test_sigint_saves_checkpoint_then_resumes(tmp_path: Path, data_cache: Path) -> None:
    """Ctrl-C in ``ttt train`` (SIGTERM is tested on ``ttt compare``, tests/cli/test_cli_behaviour.py)."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, data_cache, "model.arch=transformer", "train.steps=100000")
    proc = subprocess.Popen(
        launch(["tiny", *args]), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= 2:
                break
            if proc.poll() is not None:
                raise AssertionError(f"trainer exited early: {proc.communicate()}")
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None
    saved = int(ckpt.name.split("_")[1])
    assert saved >= 2 and saved == records(run_dir)[-1]["step"]
    summary = Trainer(
        tiny_config(
            run_dir, data_cache, "model.arch=transformer", "train.steps=100000", "train.max_steps_this_run=1"
        ),
        resume=True,
    ).fit()
    assert summary["steps"] == saved + 1


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of a ``torchrun`` worker of the given rank (searched among the launcher's descendants)."""
    todo = [launcher]
    while todo:
        pid = todo.pop()
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env and pid != launcher:
            return pid
        todo += [int(c) for c in children]
    return None


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_with_a_clear_error(tmp_path: Path, data_cache: Path) -> None:
    """SIGSTOP on rank 1: rank 0's next collective times out after dist.timeout_s and the job ends."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(run_dir, data_cache, "model.arch=transformer", "train.steps=100000",
                          "dist.timeout_s=5")
    proc = subprocess.Popen(launch(["tiny", *args], nproc=2), env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        deadline = time.time() + 180
        while not ((run_dir / "metrics.jsonl").exists() and len(records(run_dir)) >= 2):
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        stopped = _rank_pid(proc.pid, 1)
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        _, err = proc.communicate(timeout=150)
        waited = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0 and waited < 120, err[-3000:]
    needle = "error: rank 0: a collective operation did not complete within dist.timeout_s=5 s"
    assert needle in err, err[-3000:]
