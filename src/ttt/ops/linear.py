"""``y = x W^T`` with the weight packed once for the CPU's GEMM (inference).

A GEMM routine copies blocks of both of its operands into the order its inner kernel reads them
("packing") on every call. A layer's weight is the same call after call, so its copy can be made once:
MKL, which PyTorch's x86 builds use for float32 matmuls, has a packed GEMM (``cblas_sgemm_pack`` once,
then ``cblas_sgemm_compute`` per call), reached through ``csrc/packed_gemm.cpp`` (``torch.ops.ttt_gemm``).
MKL lays a packed operand out by the whole product's shape (and its thread count): a packing serves
inputs of the row count it was made for. Results equal ``F.linear``'s up to summation order (on the
project's CPU they were bit-identical).

:func:`linear_reference` is ``F.linear``. :func:`pack_weight` packs ``W [N, K]`` for ``rows``-row inputs
and :func:`packed_linear` computes ``x W^T`` from it (optionally into ``out``). Both apply to float32 on
the CPU where the PyTorch build has MKL's packed routines (:func:`packing_available`, which also checks
one small product against the reference once); elsewhere :func:`pack_weight` returns None and callers
keep ``F.linear``. Measured on the project's 2-core CPU, a 2k-token TTT-Linear layer forward at width 768
(input projections ``[2048 x 768] x [768 x 2316]`` and ``o_proj``, cold weights as inside a model) took
0.93-0.98x of its time with ``torch.matmul`` (docs/benchmarks.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .extension import load_or_warn

SOURCE = Path(__file__).parent / "csrc" / "packed_gemm.cpp"
#: fewer rows than this and packing does not pay: in hot loops on the project's CPU a packed product of 1
#: to 64 rows was no faster than ``F.linear`` (sometimes slower), while at 2k rows the layer's two GEMMs
#: took 0.95x / 0.86x of their time (callers decide; :func:`pack_weight` packs for any row count)
PACK_MIN_ROWS = 128
_INT_MAX = 2**31 - 1  # MKL's LP64 interface: 32-bit sizes and leading dimensions
_EXT: list = []  # [torch.ops.ttt_gemm] once built and checked, [None] where it cannot be used


@dataclass(frozen=True)
class PackedWeight:
    """A weight ``[out_features, in_features]`` packed for inputs of ``rows`` rows (``data`` is opaque)."""

    data: Tensor
    rows: int
    out_features: int
    in_features: int


def linear_reference(x: Tensor, weight: Tensor) -> Tensor:
    """``x W^T`` with PyTorch's own GEMM."""
    return F.linear(x, weight)


def _extension():
    """``torch.ops.ttt_gemm`` where the packed GEMM works in this process (building the library on first
    use and checking one product), else None."""
    if not _EXT:
        with torch.inference_mode(False):  # the check's tensors
            ext = load_or_warn("ttt_gemm", [SOURCE], what="packed GEMM", fallback="torch.matmul",
                               stacklevel=5)  # (the warning names the layer's forward)
            if ext is not None and not (ext.available() and _self_check(ext)):
                ext = None
        _EXT.append(ext)
    return _EXT[0]


def _self_check(ext) -> bool:
    """One small packed product against the reference (guards against an MKL whose interface differs)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(40, 24, generator=gen)
    x = torch.randn(9, 24, generator=gen)
    y = ext.linear_out(x, ext.pack(w, 9), torch.empty(9, 40))
    if torch.allclose(y, linear_reference(x, w), rtol=1e-5, atol=1e-5):
        return True
    warnings.warn("packed GEMM disabled: its self-check disagreed with torch.matmul", RuntimeWarning,
                  stacklevel=4)
    return False


def packing_available() -> bool:
    """Whether :func:`pack_weight` can pack here (builds the library on first use)."""
    return _extension() is not None


def packable(weight: Tensor, rows: int) -> bool:
    """Whether :func:`pack_weight` packs ``weight`` for ``rows`` rows: a non-empty float32 CPU matrix, sizes
    within 32 bits, and the packed GEMM available here (checked last: it builds the library)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.numel() > 0 and rows >= 1 and max(rows, *weight.shape) <= _INT_MAX
            and packing_available())


def pack_weight(weight: Tensor, rows: int) -> PackedWeight | None:
    """``weight [N, K]`` packed for ``rows``-row inputs, or None where packing does not apply (see
    :func:`packable`)."""
    if not packable(weight, rows):
        return None
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in and out of inference mode
        data = _extension().pack(weight.detach(), rows)
    return PackedWeight(data, rows, weight.shape[0], weight.shape[1])


def packed_linear(x: Tensor, packed: PackedWeight, out: Tensor | None = None) -> Tensor:
    """``x W^T`` for ``x [..., K]`` with ``prod(...) == packed.rows``, from the packed weight; written into
    ``out [..., N]`` (contiguous) when given. No autograd: inference only."""
    k, n = packed.in_features, packed.out_features
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1:] != (k,):
        raise ValueError(f"packed_linear: x must be float32 [..., {k}] on the CPU, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    lead = x.shape[:-1]
    if x.numel() // k != packed.rows:
        raise ValueError(f"packed_linear: the weight is packed for {packed.rows} rows, x has "
                         f"{x.numel() // k} ({tuple(x.shape)})")
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError("packed_linear has no backward: call it under torch.no_grad() or inference mode")
    if out is None:
        out = torch.empty((*lead, n), dtype=x.dtype, device=x.device)
    elif out.shape != (*lead, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"packed_linear: out must be contiguous {x.dtype} {(*lead, n)}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    x2 = x.reshape(packed.rows, k)
    if x2.stride(1) != 1 or x2.stride(0) < k:  # (e.g. a broadcast row)
        x2 = x2.contiguous()
    _extension().linear_out(x2, packed.data, out.view(packed.rows, n))
    return out
