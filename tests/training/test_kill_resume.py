"""kill -9 at random times and at chosen points of checkpoint writes: resuming always reproduces the
uninterrupted run bit for bit (losses, LRs, validation, final weights, optimizer and RNG states)."""

from __future__ import annotations

import json
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from training_utils import records, tiny_overrides, train_child

from ttt.training import Trainer, load_config
from ttt.training.checkpoint import latest_checkpoint, open_checkpoint, read_optimizer_state

COMPARED = ("step", "tokens", "split", "loss", "lr", "grad_norm", "ttt_base_lr")


def _ctx() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "ttt.training", "training_utils"])
    return ctx


def _finished(run_dir: Path) -> bool:
    summary = run_dir / "summary.json"
    return summary.exists() and not json.loads(summary.read_text())["interrupted"]


def _child(ctx: Any, overrides: list[str], crash: tuple[str, int] | None = None) -> Any:
    proc = ctx.Process(target=train_child, args=(overrides, crash))
    proc.start()
    return proc


def _same_run(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        ra = [{k: r.get(k) for k in COMPARED} for r in records(a, split)]
        rb = [{k: r.get(k) for k in COMPARED} for r in records(b, split)]
        assert ra == rb, split
    ca, cb = open_checkpoint(a), open_checkpoint(b)  # both verified
    assert ca.step == cb.step
    wa, wb = load_file(str(ca.files["model.safetensors"])), load_file(str(cb.files["model.safetensors"]))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa, ob = read_optimizer_state(ca), read_optimizer_state(cb)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for name, state in oa["state"].items():
        assert all(torch.equal(v, ob["state"][name][k]) for k, v in state.items())
    assert json.loads(ca.files["trainer_state.json"].read_text()) == json.loads(
        cb.files["trainer_state.json"].read_text())  # step, tokens, sampler, every RNG
    for run in (a, b):
        left = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        assert left == [], left


def kill_loop(run_dir: Path, overrides: list[str], kills: int, seed: int, max_delay: float,
              crashes: list[tuple[str, int]]) -> dict[str, int]:
    """Crash the trainer at each of ``crashes``, then SIGKILL it ``kills`` times at random moments, then let
    it finish; returns counts of what the kills hit."""
    ctx, rng = _ctx(), random.Random(seed)
    stats = {"crashes": 0, "kills": 0, "during_write": 0, "latest_behind": 0, "runs": 0}
    for crash in crashes:
        proc = _child(ctx, overrides, crash)
        proc.join(120)
        stats["runs"] += 1
        assert proc.exitcode == -9, f"crash point {crash} was not reached (exit {proc.exitcode})"
        stats["crashes"] += 1
    for _ in range(kills):
        if _finished(run_dir):
            break
        proc = _child(ctx, overrides)
        time.sleep(rng.uniform(0.0, max_delay))
        proc.kill()
        proc.join(60)
        stats["runs"] += 1
        if proc.exitcode == -9:
            stats["kills"] += 1
            root = run_dir / "checkpoints"
            if root.is_dir() and any(p.name.startswith(".tmp-step_") for p in root.iterdir()):
                stats["during_write"] += 1
            latest = root / "latest"
            if latest.is_file() and latest_checkpoint(run_dir).name != latest.read_text().strip():
                stats["latest_behind"] += 1
    proc = _child(ctx, overrides)
    proc.join(300)
    stats["runs"] += 1
    assert proc.exitcode == 0
    return stats


def _common(arch: str, steps: int) -> tuple[str, ...]:
    return (f"model.arch={arch}", f"train.steps={steps}", "checkpoint.every=1", "checkpoint.keep=2",
            "train.eval_every=3", "optim.warmup_steps=2", "train.device=cpu")


def _straight(tmp_path: Path, cache: Path, arch: str, steps: int) -> Path:
    straight = tmp_path / "straight"
    Trainer(load_config("tiny", tiny_overrides(straight, cache, *_common(arch, steps))), log=None).fit()
    return straight


def test_kill_at_every_write_phase_and_at_random_times(tmp_path: Path, data_cache: Path) -> None:
    straight = _straight(tmp_path, data_cache, "transformer", 8)
    overrides = tiny_overrides(tmp_path / "killed", data_cache, *_common("transformer", 8))
    crashes = [("tmp", 2), ("rename", 2), ("prune", 1), ("metrics", 1)]
    stats = kill_loop(tmp_path / "killed", overrides, kills=3, seed=0, max_delay=0.5, crashes=crashes)
    print(f"kill loop (default): {stats}")
    assert stats["crashes"] == len(crashes)
    _same_run(straight, tmp_path / "killed")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ttt-linear", "transformer"])
def test_kill_loop_tens_of_random_kills(tmp_path: Path, data_cache: Path, arch: str) -> None:
    """Rounds of kills (each round a run killed until it finishes, then compared) until 40 kills landed."""
    steps = 24
    straight = _straight(tmp_path, data_cache, arch, steps)
    crashes = [(point, n) for point in ("tmp", "rename", "prune") for n in (2, 5)] + [("metrics", 1)]
    total: dict[str, int] = {}
    for round_ in range(20):
        run_dir = tmp_path / f"killed-{round_}"
        stats = kill_loop(run_dir, tiny_overrides(run_dir, data_cache, *_common(arch, steps)), kills=40,
                          seed=round_, max_delay=1.0, crashes=crashes if round_ == 0 else [])
        _same_run(straight, run_dir)
        total = {k: total.get(k, 0) + v for k, v in stats.items()}
        if total["kills"] >= 40:
            break
    print(f"kill loop ({arch}, slow): {total}")
    assert total["kills"] >= 40
