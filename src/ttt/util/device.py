"""Turning a ``--device`` / ``train.device`` string into a :class:`torch.device`."""

from __future__ import annotations

import torch

from .config import ConfigError


def pick_device(spec: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA if available, else CPU; ``cuda`` -> ``cuda:local_rank``; ``cpu`` / ``cuda:N`` as is.

    Raises:
        ConfigError: an unknown device string, or CUDA asked for on a machine without it.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available on this machine")
        if spec == "cuda":
            return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        try:
            return torch.device(spec)
        except RuntimeError:
            pass
    raise ConfigError(f"unknown device {spec!r}; choose from ['auto', 'cpu', 'cuda', 'cuda:N']")


__all__ = ["pick_device"]
