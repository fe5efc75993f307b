"""A deterministic, resumable, rank-sharded batch sampler."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import DataError

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer on a Python int (mod 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """A pseudo-random permutation of ``range(num_rows)`` that depends only on (seed, epoch).

    Rows are sorted by a splitmix64 hash of (seed, epoch, row): the same on every machine and for every
    numpy/torch version (no library RNG stream involved).
    """
    key = _mix64(_mix64(seed & _MASK64) ^ (epoch & _MASK64))
    z = np.arange(num_rows, dtype=np.uint64) + np.uint64(key)
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.argsort(z, kind="stable").astype(np.int64)


class ResumableSampler:
    """Yields batches of row indices, epoch after epoch, in a deterministic order.

    Each epoch visits the rows in :func:`epoch_permutation` ``(num_rows, seed, epoch)`` order, cut into
    *global* batches of ``batch_size`` rows. With ``world_size > 1`` every global batch is split into
    ``world_size`` contiguous slices: rank ``r`` gets rows ``[r * b, (r + 1) * b)`` of the global batch,
    ``b = batch_size // world_size``; the union over ranks is the single-process global batch.

    One ``iter()`` runs to the end of the current epoch (then the epoch counter advances); iterate again
    for the next epoch. :meth:`state_dict` records ``(epoch, position)``, ``position`` counting the rows
    of the epoch already handed out (over all ranks), so a resumed sampler continues with exactly the
    next global batch, also with a different ``world_size``.

    Args:
        num_rows: rows in the dataset.
        batch_size: the global batch size (all ranks together); a multiple of ``world_size``.
        seed: order seed.
        rank, world_size: this process's shard.
        drop_last: drop the final partial global batch of each epoch; otherwise it is yielded, each
            rank taking its slice of it (the slices may be shorter, or empty for the last ranks).
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = True) -> None:
        if num_rows < 0 or batch_size < 1:
            raise DataError(f"need num_rows >= 0 and batch_size >= 1, got {num_rows} and {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in a world of size {world_size}")
        if batch_size % world_size:
            raise DataError(f"the global batch_size {batch_size} is not divisible by world_size {world_size}")
        if drop_last and num_rows < batch_size:
            raise DataError(f"only {num_rows} rows, fewer than one global batch of {batch_size}: "
                            "use more data, a shorter seq_len or a smaller batch")
        if num_rows == 0:
            raise DataError("the sampler has no rows to sample")
        self.num_rows = int(num_rows)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self.position = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ---------------------------------------------------------------- order
    def order(self, epoch: int) -> np.ndarray:
        """The global row order of ``epoch``."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_permutation(self.num_rows, self.seed, epoch))
        return self._order_cache[1]

    def _end(self) -> int:
        """Rows of an epoch that are handed out."""
        return self.num_rows - self.num_rows % self.batch_size if self.drop_last else self.num_rows

    def __len__(self) -> int:
        """Batches per (full) epoch."""
        return self.num_rows // self.batch_size if self.drop_last else -(-self.num_rows // self.batch_size)

    def _local(self, global_batch: np.ndarray) -> list[int]:
        a = self.rank * self.local_batch_size
        return [int(i) for i in global_batch[a:a + self.local_batch_size]]

    def __iter__(self) -> Iterator[list[int]]:
        if self.position >= self._end():  # a finished epoch (e.g. restored from its last batch)
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < self._end():
            start = self.position
            batch = self.order(self.epoch)[start:min(start + self.batch_size, self._end())]
            self.position = start + len(batch)  # counted as handed out before the caller sees it
            yield self._local(batch)
        self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning."""
        self.epoch, self.position = int(epoch), 0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"epoch", "position", "seed", "num_rows", "batch_size"}`` (plain ints)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_rows": self.num_rows, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off (rank / world size may differ from the saving run).

        Raises:
            DataError: the state belongs to another dataset (``num_rows``) or seed.
        """
        if "num_rows" in state and int(state["num_rows"]) != self.num_rows:
            raise DataError(f"sampler state is for {state['num_rows']} rows, "
                            f"this dataset has {self.num_rows} "
                            "(the data or seq_len changed since the checkpoint)")
        if "seed" in state and int(state["seed"]) != self.seed:
            raise DataError(f"sampler state has seed {state['seed']}, this sampler uses {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
