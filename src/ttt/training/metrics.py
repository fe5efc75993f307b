"""What a run reports: metric files (``metrics.jsonl``, ``metrics.csv``, TensorBoard) and console progress."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ttt.util.files import atomic_write_text

CSV_COLUMNS = (
    "step",
    "tokens",
    "split",
    "loss",
    "ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
    "ttt_base_lr",
)


def _truncate_jsonl(path: Path, max_step: int) -> list[dict[str, Any]]:
    """Drop the records after ``max_step`` (and unreadable lines); return the records kept."""
    if not path.exists():
        return []
    kept, records = [], []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if record.get("step", 0) <= max_step:
                kept.append(line)
                records.append(record)
        except (json.JSONDecodeError, AttributeError, TypeError):
            continue
    atomic_write_text(path, "".join(k + "\n" for k in kept))
    return records


def _truncate_csv(path: Path, max_step: int) -> None:
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
    w.writeheader()
    for r in rows:
        try:
            if int(r["step"]) <= max_step:
                w.writerow({k: r.get(k, "") for k in CSV_COLUMNS})
        except (KeyError, TypeError, ValueError):
            continue
    atomic_write_text(path, out.getvalue())


class MetricsLogger:
    """Writes records to ``run_dir/metrics.jsonl``, ``metrics.csv`` and ``run_dir/tb`` (rank 0 only).

    On resume from step ``s``, records after ``s`` (written by the interrupted run after its last
    checkpoint, and about to be recomputed) are dropped from the files, and TensorBoard purges them.
    """

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        tensorboard: bool = True,
        write_csv: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.jsonl = run_dir / "metrics.jsonl"
        self.csv = run_dir / "metrics.csv" if write_csv else None
        self.tb = None
        self.kept: list[dict[str, Any]] = []  # records of earlier runs kept on resume
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.kept = _truncate_jsonl(self.jsonl, resume_step)
            if self.csv is not None:
                _truncate_csv(self.csv, resume_step)
        else:
            self.jsonl.write_text("")
            if self.csv is not None:
                self.csv.unlink(missing_ok=True)
        if self.csv is not None and not self.csv.exists():
            with open(self.csv, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_COLUMNS).writeheader()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: jsonl/csv still work
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                purge = resume_step + 1 if resume_step is not None else None
                self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=purge)

    def recorded(self, step: int, split: str) -> dict[str, Any] | None:
        """The record of ``step`` / ``split`` kept from an earlier run (``None`` if there is none)."""
        return next((r for r in self.kept if r.get("step") == step and r.get("split") == split), None)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must contain ``step``; ``split`` is ``train`` or ``val``)."""
        if not self.enabled:
            return
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.csv is not None:
            row = {k: record.get(k, "") for k in CSV_COLUMNS}
            if row["ppl"] == "" and isinstance(record.get("loss"), float):
                row["ppl"] = math.exp(min(record["loss"], 50.0))
            with open(self.csv, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=CSV_COLUMNS).writerow(row)
        if self.tb is not None:
            split = record.get("split", "train")
            for key, value in record.items():
                if key in ("step", "split") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                self.tb.add_scalar(f"{split}/{key}", value, global_step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
            self.tb = None


class Progress:
    """Console progress of rank 0: a progress bar on a terminal, otherwise a plain line every ``every`` steps
    (log files get whole lines, not carriage returns).

    Args:
        enabled: report at all.
        total, initial: the run's last step and the step it starts from.
        desc: the bar's label.
        every: steps between plain lines.
        log: where plain lines (and :meth:`write` text) go.
    """

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, every: int,
                 log: Callable[[str], None]) -> None:
        self.enabled, self.total, self.every, self.log = enabled, total, every, log
        self.start_step, self.start_time = initial, time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        """After optimizer step ``step``."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        elif self.enabled and (step % self.every == 0 or step == self.total):
            done = step - self.start_step
            eta = (time.perf_counter() - self.start_time) / max(done, 1) * (self.total - step)
            self.log(f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | "
                     f"ETA {eta / 60:.1f} min")

    def write(self, text: str) -> None:
        """A line of text (above the bar, if there is one)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            self.log(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


__all__ = ["CSV_COLUMNS", "MetricsLogger", "Progress"]
