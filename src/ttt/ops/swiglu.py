"""The SwiGLU gate of the model's feed-forward network: ``silu(gate) * up``.

:func:`swiglu_reference` is the PyTorch composition. On the CPU (float32 / float64) :func:`swiglu` runs a
compiled kernel (``csrc/swiglu.cpp``, ``torch.ops.ttt_swiglu``) that reads ``gate`` and ``up`` once and
writes the product once, and for training an autograd Function whose backward is one compiled pass too:
with ``s = sigmoid(gate)``,

    d up   = dh * gate * s
    d gate = dh * up * s * (1 + gate * (1 - s))        (silu'(g) = s + g s (1 - s))

The composition allocates a full ``[tokens, FFN]`` tensor per op (two in the forward, three in its
backward); at 8k tokens and FFN width 1376 its forward and backward take about 1.3 times the compiled
pair's time on the project's CPU (both are dominated by fresh output tensors: page faults and memory
traffic). Other devices and dtypes use the reference; where the library cannot be
built the reference is used with a one-time warning.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .extension import load_or_warn

SOURCE = Path(__file__).parent / "csrc" / "swiglu.cpp"
HEADER = Path(__file__).parent / "scan" / "csrc" / "scan_kernels.h"  # vector helpers, vectorised exp
_EXT: list = []  # [torch.ops.ttt_swiglu] once built, [None] if it cannot be built here


def _extension():
    """``torch.ops.ttt_swiglu`` (building it on first use), or ``None`` where it cannot be built."""
    if not _EXT:
        _EXT.append(load_or_warn("ttt_swiglu", [SOURCE], [HEADER], what="compiled SwiGLU",
                                 fallback="PyTorch ops", stacklevel=5))  # swiglu -> _compiled -> here
    return _EXT[0]


def swiglu_reference(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` with PyTorch ops."""
    return F.silu(gate) * up


def _compiled(gate: Tensor, up: Tensor):
    """The compiled library when it applies (CPU, float32/64, one shape and dtype), else None."""
    if (gate.device.type != "cpu" or gate.dtype not in (torch.float32, torch.float64) or gate.numel() == 0
            or up.dtype != gate.dtype or up.device != gate.device or up.shape != gate.shape):
        return None
    return _extension()


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        return _extension().forward(gate, up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: Tensor) -> tuple[Tensor | None, Tensor | None]:
        gate, up = ctx.saved_tensors
        dg, du = _extension().backward(dh.contiguous(), gate, up)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


def swiglu(gate: Tensor, up: Tensor, inplace: bool = False) -> Tensor:
    """``silu(gate) * up`` (:func:`swiglu_reference`), compiled on the CPU. With ``inplace`` and no
    gradient needed ``gate`` is the caller's own buffer, which may receive the result (use the returned
    tensor)."""
    ext = _compiled(gate, up)
    grad = torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)
    if ext is None:
        if inplace and not grad:
            return F.silu(gate, inplace=True).mul_(up)
        return swiglu_reference(gate, up)
    if grad:
        return _SwiGLUFunction.apply(gate, up)
    up = up.contiguous()
    if inplace and gate.is_contiguous():
        return ext.forward(gate, up, gate)
    return ext.forward(gate.contiguous(), up)
