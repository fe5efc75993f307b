"""Learning-rate schedules: linear warmup + cosine decay (outer), and the TTT-MLP inner-LR warmup."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """LR of optimizer step ``step`` (0-based).

    Linear warmup ``peak * (step + 1) / warmup`` for ``step < warmup``, then cosine decay from ``peak``
    at ``step = warmup`` to ``min_lr`` at ``step = total_steps`` (the last update, ``total - 1``, uses a
    value just above ``min_lr``).
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def inner_lr_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """TTT inner base LR at ``step``: linear from ``start`` to ``end`` over the outer warmup, then ``end``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def resolve_warmup(total_steps: int, warmup_steps: int | None, warmup_fraction: float) -> int:
    """Warmup length in steps (explicit, or a fraction of the run), at most ``total_steps``."""
    w = warmup_steps if warmup_steps is not None else int(round(warmup_fraction * total_steps))
    return max(0, min(int(w), total_steps))


__all__ = ["inner_lr_warmup", "resolve_warmup", "warmup_cosine"]
