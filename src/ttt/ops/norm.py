"""Row normalisations of the TTT model: RMSNorm, and the TTT layer's output LayerNorm fused with its gate.

Each has a readable PyTorch reference and, for inference on the CPU (no gradient needed, float32 /
float64), a compiled kernel (``csrc/norms.cpp``, ``torch.ops.ttt_norm``) that makes one pass per row
instead of the reference's 4-6 passes over full-size tensors:

* :func:`rms_norm`: ``weight * x / sqrt(mean(x^2) + eps)``, computed in float32 (compiled for float32);
* :func:`gated_layer_norm_`: ``LayerNorm(y) * weight + bias``, times ``gelu_tanh(gate)`` when a gate is
  given; the compiled path writes the result over ``y`` (the caller owns that buffer).

Training (autograd) and other devices / dtypes use the reference. Where the library cannot be built
the reference is used with a one-time warning.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .extension import load_or_warn
from .functional import gelu_tanh

CSRC = Path(__file__).parent / "csrc"
SOURCE = CSRC / "norms.cpp"
HEADER = Path(__file__).parent / "scan" / "csrc" / "scan_kernels.h"  # vector helpers, vectorised tanh
_EXT: list = []  # [torch.ops.ttt_norm] once built, [None] if it cannot be built here


def _extension():
    """``torch.ops.ttt_norm`` (building it on first use), or ``None`` where it cannot be built."""
    if not _EXT:
        _EXT.append(load_or_warn("ttt_norm", [SOURCE], [HEADER], what="compiled normalisations",
                                 fallback="PyTorch ops", stacklevel=5))  # rms_norm -> _compiled -> here
    return _EXT[0]


def _compiled(x: Tensor, *params: Tensor):
    """The compiled library when it applies to these tensors (CPU, float32/64, no autograd), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return None
    if any(p.dtype != x.dtype or p.device != x.device for p in params):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return None
    return _extension()


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension, computed in float32 (as the official port and HF Llama do, also
    for float64 inputs), returned in ``x``'s dtype and multiplied by ``weight``."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """:func:`rms_norm_reference`, compiled for float32 CPU inference."""
    ext = _compiled(x, weight) if x.dtype == torch.float32 else None
    if ext is None:
        return rms_norm_reference(x, weight, eps)
    return ext.rms_norm(x, weight.contiguous(), float(eps))


def gated_layer_norm_reference(y: Tensor, weight: Tensor, bias: Tensor, eps: float,
                               gate: Tensor | None = None) -> Tensor:
    """``LayerNorm(y) * weight + bias`` over the last dimension, times ``gelu_tanh(gate)`` if given."""
    out = F.layer_norm(y, y.shape[-1:], weight, bias, eps)
    return out if gate is None else gelu_tanh(gate) * out


def gated_layer_norm_(y: Tensor, weight: Tensor, bias: Tensor, eps: float, gate: Tensor | None = None
                      ) -> Tensor:
    """:func:`gated_layer_norm_reference`; for CPU inference compiled and written over ``y`` (which must
    then be the caller's own buffer: contiguous, not needed afterwards). Returns the result."""
    gates = () if gate is None else (gate,)
    fits = y.is_contiguous() and (gate is None or gate.shape == y.shape)
    ext = _compiled(y, weight, bias, *gates) if fits else None
    if ext is None:
        return gated_layer_norm_reference(y, weight, bias, eps, gate)
    g2 = None
    if gate is not None:  # [rows, D]: a view of the gate when its rows are evenly spaced (else a copy)
        g2 = gate.reshape(-1, gate.shape[-1])
        if g2.stride(-1) != 1:
            g2 = g2.contiguous()
    return ext.layer_norm_gate_(y, weight.contiguous(), bias.contiguous(), float(eps), g2)
