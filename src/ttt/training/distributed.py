"""Process-group setup and model wrapping (DDP or FSDP2) for ``torchrun`` launches."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ttt.util.device import pick_device


@dataclass
class DistInfo:
    """Where this process sits: ``rank``/``world_size``/``local_rank``, its device, and whether this
    module created the process group (and so must destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device_spec: str = "auto", backend: str = "auto", timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group from the ``torchrun`` environment (if ``WORLD_SIZE > 1``).

    ``timeout_s`` bounds every collective: a rank that stops or dies makes the others fail after that
    long (see :func:`is_timeout`) instead of waiting forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if backend == "nccl":  # abort a stuck NCCL collective when the timeout expires
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        owns = True
    elif dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def teardown(info: DistInfo, sync: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it.

    With ``sync`` all ranks meet at a barrier first (gloo aborts a rank that tears down while another
    still talks to it); pass ``sync=False`` on an error path, where other ranks may never arrive.
    """
    if info.owns_group and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank did not answer in time."""
    text = str(error).lower()
    return isinstance(error, dist.DistError) or "timed out" in text or "timeout" in text \
        or "connection closed by peer" in text or "connection reset" in text


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few floats over all ranks (float64; identity without a process group)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: float, info: DistInfo, device: torch.device) -> float:
    """Max of one float over all ranks."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(info: DistInfo) -> None:
    """Synchronise all ranks (no-op in one process)."""
    if info.distributed:
        dist.barrier()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of an HF causal LM (``model.layers`` or ``backbone.layers``)."""
    for attr in ("model", "backbone"):
        inner = getattr(model, attr, None)
        layers = getattr(inner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return list(layers)
    return []


def wrap_model(model: nn.Module, info: DistInfo, strategy: str) -> nn.Module:
    """Wrap for data parallelism: DDP, or FSDP2 (``fully_shard`` on every block, then the root).

    Without a process group the model is returned unchanged. FSDP2 modifies ``model`` in place (its
    parameters become sharded ``DTensor``s) and returns it.
    """
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown dist.strategy {strategy!r}; choose from ['ddp', 'fsdp']")


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP wrapper (FSDP2 models are not wrapped)."""
    return getattr(model, "module", model)


__all__ = [
    "DistInfo",
    "all_reduce_max",
    "all_reduce_sum",
    "barrier",
    "is_timeout",
    "setup",
    "teardown",
    "unwrap",
    "wrap_model",
]
