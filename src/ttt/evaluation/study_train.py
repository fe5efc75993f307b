"""Training one architecture of the comparison study with :class:`ttt.training.Trainer`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .compare import StudyConfig, StudyData, StudyError, TrainOutcome


def trainer_overrides(arch: str, cfg: StudyConfig, run_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The dotted :class:`ttt.training.TrainConfig` overrides of one study run."""
    rows_per_step = cfg.batch_size
    tokens_per_step = rows_per_step * cfg.seq_len
    total_steps = max(1, math.ceil(cfg.train_tokens / tokens_per_step))
    eval_every = max(1, total_steps // max(cfg.num_evals, 1))
    out: dict[str, Any] = {
        "model.arch": arch,
        "model.size": cfg.size,
        "model.overrides": dict(cfg.model_overrides),
        "data.seq_len": cfg.seq_len,
        "data.cache_dir": str(cache_dir),
        "data.val_rows": cfg.curve_eval_windows,
        "data.tokenizer": cfg.tokenizer,
        "optim.lr": cfg.lr,
        "optim.weight_decay": cfg.weight_decay,
        "optim.warmup_steps": min(total_steps - 1, round(cfg.warmup_tokens / tokens_per_step)),
        "train.micro_batch_size": cfg.batch_size,
        "train.grad_accum": 1,
        "train.tokens": None,
        "train.steps": total_steps,
        "train.seed": cfg.seed,
        "train.device": cfg.device,
        "train.eval_every": eval_every,
        "train.log_every": max(1, eval_every // 4),
        "train.run_dir": str(run_dir),
        "checkpoint.every": eval_every,
        "checkpoint.keep": 1,
        "log.tensorboard": False,
        "log.csv": False,
    }
    if cfg.data is not None:
        out["data.source"] = cfg.data
    out.update(cfg.train_overrides)
    return out


def read_val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """``(tokens, val loss)`` records of ``run_dir/metrics.jsonl`` (last record per token count)."""
    f = run_dir / "metrics.jsonl"
    points: dict[int, float] = {}
    if f.exists():
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of an interrupted run
                continue
            if rec.get("split") == "val" and rec.get("loss") is not None:
                points[int(rec["tokens"])] = float(rec["loss"])
    return sorted(points.items())


def train_with_trainer(
    arch: str, cfg: StudyConfig, run_dir: Path, data: StudyData, log: Callable[[str], None]
) -> TrainOutcome:
    """Train (or resume) one run; the trained model stays in memory for the evaluation."""
    from ttt.training import CheckpointError, ConfigError, Trainer, load_config
    from ttt.training.checkpoint import latest_checkpoint

    cache_dir = run_dir.parent.parent / "data"
    try:
        tcfg = load_config(None, trainer_overrides(arch, cfg, run_dir, cache_dir))
    except ConfigError as e:
        raise StudyError(f"bad training settings for {arch}: {e}") from None
    resume = None
    try:
        if latest_checkpoint(run_dir) is not None:
            resume = True
            log(f"[{arch}] resuming from {latest_checkpoint(run_dir)}")
    except CheckpointError:
        resume = None
    trainer = Trainer(tcfg, resume=resume)
    try:
        summary = trainer.fit()
    except (ConfigError, CheckpointError) as e:
        raise StudyError(f"{arch}: {e}") from None
    if summary.get("interrupted"):
        raise StudyError(
            f"{arch}: training stopped early ({summary.get('stop_reason')}); run the same command again to "
            "resume from its checkpoint"
        )
    return TrainOutcome(
        model=trainer.raw_model,
        curve=read_val_curve(run_dir),
        tokens=int(summary["tokens"]),
        tokens_per_s=float(summary.get("tokens_per_s") or 0.0),
        train_seconds=float(summary.get("elapsed_s") or 0.0),
        extra={"summary": summary},
    )
