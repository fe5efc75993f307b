"""Row normalisations of the TTT model: RMSNorm, and the TTT layer's output LayerNorm fused with its gate.

Each has a readable PyTorch reference and, on the CPU, a compiled kernel (``csrc/norms.cpp``,
``torch.ops.ttt_norm``) that makes one pass per row instead of the reference's 4-6 passes over
full-size tensors (each a fresh allocation):

* :func:`rms_norm`: ``weight * x / sqrt(mean(x^2) + eps)``, computed in float32; compiled for float32,
  for inference and for training (an autograd Function whose backward is one compiled pass as well:
  with ``g = weight * dy`` and ``xhat = x * rstd``, ``dx = rstd * (g - xhat * mean(g * xhat))`` and
  ``dweight = sum over rows of dy * xhat``). At 8k tokens and width 512 its forward and backward take
  about a sixth of the reference's time on the project's CPU (the reference's were a tenth of a
  TTT-Linear training step);
* :func:`gated_layer_norm_`: ``LayerNorm(y) * weight + bias``, times ``gelu_tanh(gate)`` when a gate is
  given (the TTT layer's post-norm and output gate); compiled (float32 / float64) for inference, written
  over ``y`` (the caller owns that buffer), and for training as an autograd Function whose backward is
  one pass per row: with ``xhat = (y - mean) * rstd``, ``n = weight * xhat + bias`` and
  ``dn = dout * gelu_tanh(gate)``, ``d gate = dout * n * gelu_tanh'(gate)``, ``d weight = sum dn * xhat``,
  ``d bias = sum dn`` and ``dy = rstd * (weight dn - mean(weight dn) - xhat * mean(weight dn * xhat))``.

Other devices and dtypes use the references. Where the library cannot be built the references are
used with a one-time warning.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

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


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _compiled(x: Tensor, *params: Tensor, autograd: bool = False):
    """The compiled library when it applies to these tensors (CPU, float32/64; without autograd unless
    the caller differentiates it itself), else None."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return None
    if any(p.dtype != x.dtype or p.device != x.device for p in params):
        return None
    if not autograd and _needs_grad(x, *params):
        return None
    return _extension()


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dimension, computed in float32 (as the official port and HF Llama do, also
    for float64 inputs), returned in ``x``'s dtype and multiplied by ``weight``."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class _RMSNormFunction(torch.autograd.Function):
    """The compiled RMSNorm with its compiled backward (saves ``x`` and each row's ``rstd``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x, weight = x.contiguous(), weight.contiguous()
        y, rstd = _extension().rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _extension().rms_norm_backward(dy.contiguous(), x, weight, rstd)
        return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """:func:`rms_norm_reference`, compiled for float32 on the CPU (inference and training)."""
    ext = _compiled(x, weight, autograd=True) if x.dtype == torch.float32 else None
    if ext is None:
        return rms_norm_reference(x, weight, eps)
    if _needs_grad(x, weight):
        return _RMSNormFunction.apply(x, weight, float(eps))
    return ext.rms_norm(x, weight.contiguous(), float(eps))


def gated_layer_norm_reference(y: Tensor, weight: Tensor, bias: Tensor, eps: float,
                               gate: Tensor | None = None) -> Tensor:
    """``LayerNorm(y) * weight + bias`` over the last dimension, times ``gelu_tanh(gate)`` if given."""
    out = F.layer_norm(y, y.shape[-1:], weight, bias, eps)
    return out if gate is None else gelu_tanh(gate) * out


class _GatedLayerNormFunction(torch.autograd.Function):
    """The compiled gated LayerNorm with its compiled backward (saves the input, the gate and each row's
    mean and rstd)."""

    @staticmethod
    def forward(ctx, y: Tensor, weight: Tensor, bias: Tensor, eps: float, gate: Tensor | None) -> Tensor:
        y, weight, bias = y.contiguous(), weight.contiguous(), bias.contiguous()
        gate = None if gate is None else gate.contiguous()
        out, mean, rstd = _extension().layer_norm_gate_forward(y, weight, bias, eps, gate)
        ctx.save_for_backward(y, weight, bias, gate, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout: Tensor):
        y, weight, bias, gate, mean, rstd = ctx.saved_tensors
        dy, dw, db, dg = _extension().layer_norm_gate_backward(dout.contiguous(), y, weight, bias, gate, mean,
                                                               rstd)
        need = ctx.needs_input_grad
        return (dy if need[0] else None, dw if need[1] else None, db if need[2] else None, None,
                dg if need[4] else None)


def gated_layer_norm_(y: Tensor, weight: Tensor, bias: Tensor, eps: float, gate: Tensor | None = None
                      ) -> Tensor:
    """:func:`gated_layer_norm_reference`, compiled on the CPU (float32 / float64). Without gradients the
    result is written over ``y`` (which must then be the caller's own buffer: contiguous, not needed
    afterwards); with gradients it is a new tensor from an autograd Function with a compiled backward.
    Returns the result."""
    gates = () if gate is None else (gate,)
    same_shape = gate is None or gate.shape == y.shape
    ext = _compiled(y, weight, bias, *gates, autograd=True) if same_shape else None
    if ext is not None and _needs_grad(y, weight, bias, *gates):
        return _GatedLayerNormFunction.apply(y, weight, bias, float(eps), gate)
    if ext is None or not y.is_contiguous():
        return gated_layer_norm_reference(y, weight, bias, eps, gate)
    g2 = None
    if gate is not None:  # [rows, D]: a view of the gate when its rows are evenly spaced (else a copy)
        g2 = gate.reshape(-1, gate.shape[-1])
        if g2.stride(-1) != 1:
            g2 = g2.contiguous()
    return ext.layer_norm_gate_(y, weight.contiguous(), bias.contiguous(), float(eps), g2)
