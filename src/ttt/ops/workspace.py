"""Reusable scratch memory for the large intermediates of inference on the CPU.

An inference call allocates the same big temporaries every time: a TTT layer's input projections
(``[B, L, 3D + H]``, 19 MB for 2k tokens at width 768) and the scan's output (``[B, L, D]``). Fresh
from the C allocator, such a block lives in 4 KiB pages, and the compiled scan reads it token by token
across the heads (``[B, L, H, F]`` views, rows ``D`` or more elements apart): each mini-batch touches
dozens of pages, so its loads wait on page walks and cold lines that prefetching cannot hide.

:func:`scratch` hands out such a temporary from a buffer that outlives the call: one per slot name and
thread, grown to the largest request and kept, and on Linux advised for transparent huge pages
(``madvise(MADV_HUGEPAGE)``, 2 MiB pages where the kernel grants them). Measured on the project's
2-core CPU, the compiled TTT-Linear scan of a 2k-token layer ran about 15% faster on it
(docs/benchmarks.md).

A slot's tensor is valid until the next request for the same slot on the same thread: use it only for
intermediates that do not leave the caller (never for a returned output or anything autograd saves).
Requests above :data:`MAX_BYTES` are plain allocations; :func:`release` frees this thread's buffers.
The ops that take such a buffer (``out=``) check it with :func:`check_out`.
"""

from __future__ import annotations

import math
import mmap
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

MAX_BYTES = 1 << 30  # larger requests get a fresh tensor (the buffer is kept for the thread's life)
_ALIGN = 1 << 21  # 2 MiB: the huge-page size on x86-64 and arm64 Linux
_local = threading.local()


def _buffers() -> dict[str, Tensor]:
    if not hasattr(_local, "buffers"):
        _local.buffers = {}
    return _local.buffers


def _new_buffer(nbytes: int) -> Tensor:
    """A byte tensor over an anonymous mapping of at least ``nbytes`` from a 2 MiB boundary, advised for
    huge pages (the tensor keeps the mapping alive)."""
    size = -(-nbytes // _ALIGN) * _ALIGN
    # private anonymous memory: a shared mapping (mmap's default) is shmem, which THP usually skips
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}
    mm = mmap.mmap(-1, size + _ALIGN, **private)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP disabled or unsupported: ordinary pages
            pass
    with torch.inference_mode(False):
        raw = torch.frombuffer(mm, dtype=torch.uint8)
    offset = -raw.data_ptr() % _ALIGN
    return raw[offset:offset + size]


def scratch(slot: str, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor of ``shape`` and ``dtype`` in this thread's buffer ``slot``.

    Valid until the next :func:`scratch` call for ``slot`` on this thread (which reuses the memory).
    """
    shape = tuple(int(s) for s in shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_BYTES:
        return torch.empty(shape, dtype=dtype)
    buffers = _buffers()
    buf = buffers.get(slot)
    if buf is None or buf.numel() < nbytes:
        buf = buffers[slot] = _new_buffer(max(nbytes, 1))
    with torch.inference_mode(False):  # a normal tensor even when asked for inside inference mode
        return buf[:nbytes].view(dtype).view(shape)


def check_out(out: Tensor | None, like: Tensor) -> None:
    """Raise a one-line ``ValueError`` unless ``out`` (a caller's output buffer) is None or a contiguous
    tensor of ``like``'s shape, dtype and device."""
    if out is not None and (out.shape != like.shape or out.dtype != like.dtype or out.device != like.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {tuple(like.shape)} on "
                         f"{like.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")


def release() -> None:
    """Drop this thread's scratch buffers (their memory returns to the OS once no tensor uses it)."""
    _buffers().clear()
