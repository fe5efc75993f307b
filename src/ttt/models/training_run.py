"""Find the model of a ``ttt train`` run: a run directory or one of its checkpoint directories.

A run directory holds ``checkpoints/step_XXXXXXXX/`` (``model.safetensors`` + ``meta.json`` with the
model config) and ``checkpoints/latest`` naming the newest complete one. Used by
``TTTForCausalLM.from_pretrained(run_dir)`` (the commands open checkpoints with
:func:`ttt.training.checkpoint.open_checkpoint`). Plain file and JSON handling only, so
it also works in an exported model's remote-code copy.
"""

from __future__ import annotations

import hashlib
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
    """The checkpoint directory of a run (``step``, else by the trainer's ``latest`` rule) or ``path``
    itself if it is one.

    The ``latest`` rule is :func:`ttt.training.checkpoint.latest_state`'s: ``latest`` names the checkpoint
    and naming one that does not exist is an error; a ``step_N`` newer than the one named wins.

    Returns None when ``path`` is neither a run nor a checkpoint directory (e.g. a saved HF model).

    Raises:
        FileNotFoundError: ``step`` is given but the run holds no checkpoint of that step, or ``latest``
            names no checkpoint directory.
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
    pointer = p / "checkpoints" / "latest"
    if not steps and not pointer.exists():
        return None
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"run {p} has no checkpoint of step {step}; it has steps {sorted(steps)}")
        return steps[step]
    if pointer.is_file():
        name = pointer.read_text().strip()
        m = _STEP_RE.match(name)
        if not m or not (p / "checkpoints" / name).is_dir():
            raise FileNotFoundError(f"{pointer} names {name[:80]!r}, which is not a checkpoint directory")
        named = int(m.group(1))
        return steps[max(steps)] if steps and max(steps) > named else p / "checkpoints" / name
    return steps[max(steps)]


def verify_weights(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` after checking its own digest and the size and sha256 of
    ``model.safetensors`` against it (as :func:`ttt.training.checkpoint.open_checkpoint` does).

    Raises:
        ValueError: a format other than 2, a corrupt ``meta.json`` or corrupt weights.
    """
    path = Path(checkpoint)
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: meta.json is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != 2:
        raise ValueError(f"checkpoint {path}: not a format 2 checkpoint")
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    if meta.get("meta_sha256") != digest:
        raise ValueError(f"checkpoint {path}: meta.json is corrupt (its content does not match its "
                         "meta_sha256)")
    want = (meta.get("files") or {}).get(WEIGHTS) or {}
    file = path / WEIGHTS
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if file.stat().st_size != want.get("bytes") or h.hexdigest() != want.get("sha256"):
        raise ValueError(f"checkpoint {path}: {WEIGHTS} is corrupt: its sha256 differs from the one "
                         "meta.json records")
    return meta


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint directory belongs to (None for a loose checkpoint)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's ``meta.json`` (arch, model config, step, tokens, training config)."""
    return json.loads((Path(checkpoint) / META).read_text(encoding="utf-8"))


__all__ = ["find_training_checkpoint", "is_training_checkpoint", "read_meta", "run_dir_of", "verify_weights"]
