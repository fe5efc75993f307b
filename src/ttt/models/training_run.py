"""Find the model of a ``ttt train`` run: a run directory or one of its checkpoint directories.

A run directory holds ``checkpoints/step_XXXXXXXX/`` (``model.safetensors`` + ``meta.json`` with the
model config) and ``checkpoints/latest`` naming the newest complete one. Used by
``TTTForCausalLM.from_pretrained(run_dir)`` and ``ttt export``. Plain file and JSON handling only, so
it also works in an exported model's remote-code copy.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHTS = "model.safetensors"
META = "meta.json"


def is_training_checkpoint(path: str | Path) -> bool:
    """``path`` is a trainer checkpoint directory (``meta.json`` + ``model.safetensors``)."""
    p = Path(path)
    return (p / META).is_file() and (p / WEIGHTS).is_file()


def _steps(run_dir: Path) -> dict[int, Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return {}
    found = {}
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and is_training_checkpoint(p):
            found[int(m.group(1))] = p
    return found


def find_training_checkpoint(path: str | Path, step: int | None = None) -> Path | None:
    """The checkpoint directory of a run (``latest``, or ``step``) or ``path`` itself if it is one.

    Returns None when ``path`` is neither a run nor a checkpoint directory (e.g. a saved HF model).

    Raises:
        FileNotFoundError: ``step`` is given but the run holds no checkpoint of that step.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    if is_training_checkpoint(p):
        if step is not None and int(read_meta(p).get("step", -1)) != step:
            raise FileNotFoundError(f"{p} is the checkpoint of step {read_meta(p).get('step')}, not {step}")
        return p
    if p.name == "checkpoints":
        p = p.parent
    steps = _steps(p)
    if not steps:
        return None
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"run {p} has no checkpoint of step {step}; it has steps {sorted(steps)}")
        return steps[step]
    pointer = p / "checkpoints" / "latest"
    if pointer.is_file():
        named = p / "checkpoints" / pointer.read_text().strip()
        if is_training_checkpoint(named):
            return named
    return steps[max(steps)]


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint directory belongs to (None for a loose checkpoint)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (arch, model config, step, tokens, training config)."""
    return json.loads((Path(checkpoint) / META).read_text(encoding="utf-8"))


__all__ = ["find_training_checkpoint", "is_training_checkpoint", "read_meta", "run_dir_of"]
