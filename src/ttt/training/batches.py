"""Batches of packed rows for the trainer: one global batch per optimizer step, split into micro-batches.

Every rank runs the same :class:`ttt.data.ResumableSampler` over the training rows with
``batch_size = global batch`` (rank 0 of world 1), so the data order and the sampler state do not depend
on the number of processes; micro-batch ``k = a * world_size + rank`` (``a`` the accumulation index) is
the slice ``[k * micro, (k + 1) * micro)`` of the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from ttt.data import PackedRows, ResumableSampler, collate

Batch = dict[str, torch.Tensor]


def to_device(rows: PackedRows, indices: list[int], device: torch.device) -> Batch:
    """The rows ``indices`` stacked into ``{"input_ids", "labels", "position_ids"}`` on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in collate([rows.row(i) for i in indices]).items()}


class GlobalBatches:
    """This rank's micro-batches of each global batch, epoch after epoch, resumable.

    Args:
        rows: the training rows.
        micro_batch_size: rows per micro-batch.
        grad_accum: micro-batches per rank per step.
        world_size, rank: this process's place.
        seed: the data order's seed.
        device: where batches go.
    """

    def __init__(self, rows: PackedRows, micro_batch_size: int, grad_accum: int, world_size: int, rank: int,
                 seed: int, device: torch.device) -> None:
        self.rows, self.micro, self.accum = rows, micro_batch_size, grad_accum
        self.world_size, self.rank, self.device = world_size, rank, device
        self.sampler = ResumableSampler(len(rows), micro_batch_size * grad_accum * world_size, seed)
        self._epoch: Iterator[list[int]] | None = None

    def _next_indices(self) -> list[int]:
        for _ in range(2):  # the current epoch, else a new one
            if self._epoch is None:
                self._epoch = iter(self.sampler)
            indices = next(self._epoch, None)
            if indices is not None:
                return indices
            self._epoch = None
        raise RuntimeError("the data sampler yields no batches")

    def next(self) -> list[Batch]:
        """The micro-batches of this rank in the next global batch."""
        indices = self._next_indices()
        slices = [(a * self.world_size + self.rank) * self.micro for a in range(self.accum)]
        return [to_device(self.rows, indices[s : s + self.micro], self.device) for s in slices]

    def state_dict(self) -> dict[str, Any]:
        """The sampler's position."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (also across world sizes)."""
        self.sampler.load_state_dict(state)
        self._epoch = None


def validation_batches(rows: PackedRows, num_rows: int, micro_batch_size: int, world_size: int, rank: int,
                       device: torch.device) -> Iterator[tuple[Batch, bool]]:
    """``(batch, counts)`` over the first ``num_rows`` rows, split across ranks.

    Every rank runs the same number of forward passes (FSDP needs it); a rank whose share ran out gets a
    stand-in batch with ``counts=False``, whose loss must not be counted.
    """
    per_round = micro_batch_size * world_size
    for r in range(math.ceil(num_rows / per_round)):
        start = r * per_round + rank * micro_batch_size
        real = [i for i in range(start, start + micro_batch_size) if i < num_rows]
        yield to_device(rows, real or [0], device), bool(real)


__all__ = ["Batch", "GlobalBatches", "to_device", "validation_batches"]
