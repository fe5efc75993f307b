"""Depthwise causal 1-D convolution with a streaming state (math §6 conv_q/conv_k, §7 pre-conv).

Two implementations of one function: :func:`causal_conv1d_reference` (``F.conv1d`` over the state
concatenated with the input; readable, any device) and, for CPU tensors, a compiled channels-last
kernel (``csrc/causal_conv.cpp``: one pass over ``[B, L, D]``, no concatenation or transposes, with a
hand-written backward). :func:`causal_conv1d` picks the compiled one on CPU when it builds, else the
reference (with a one-time warning).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .extension import load_or_warn
from .workspace import check_out

SOURCE = Path(__file__).parent / "csrc" / "causal_conv.cpp"
_EXT: list = []  # [torch.ops.ttt_conv] once built, [None] if it cannot be built here


def _extension():
    """``torch.ops.ttt_conv`` (building it on first use), or ``None`` where it cannot be built."""
    if not _EXT:
        _EXT.append(load_or_warn("ttt_conv", [SOURCE], what="compiled causal conv", fallback="F.conv1d"))
    return _EXT[0]


class _CausalConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, state: Tensor | None, weight: Tensor, bias: Tensor | None) -> Tensor:
        ext = _extension()
        ctx.save_for_backward(x, state, weight)
        ctx.has_bias = bias is not None
        return ext.forward(x, state, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, state, weight = ctx.saved_tensors
        dx, dstate, dw, dbias = _extension().backward(x.contiguous(), state, weight, dy.contiguous(),
                                                      ctx.has_bias)
        return dx, (dstate if state is not None else None), dw, (dbias if ctx.has_bias else None)


def _new_state(x: Tensor, state: Tensor, k: int, lengths: Tensor | None) -> Tensor:
    """Inputs ``lengths[r] .. lengths[r]+k-2`` of ``[state, x]`` per row: the last ``k-1`` real inputs."""
    b, length, d = x.shape
    n = torch.full((b,), length, device=x.device) if lengths is None else lengths.to(x.device)
    idx = n.view(b, 1) + torch.arange(k - 1, device=x.device)  # [B, K-1] into [state, x]
    from_x = x.gather(1, (idx - (k - 1)).clamp(min=0).unsqueeze(-1).expand(b, k - 1, d)).transpose(1, 2)
    from_state = state.to(x.dtype).gather(-1, idx.clamp(max=k - 2).unsqueeze(1).expand(b, d, k - 1))
    return torch.where((idx < k - 1).unsqueeze(1), from_state, from_x)


def causal_conv1d_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, state: Tensor | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`causal_conv1d` through ``F.conv1d`` on ``[state, x]`` (the readable reference)."""
    b, length, d = _check(x, weight, state)
    k = weight.shape[-1]
    if state is None:
        state = x.new_zeros(b, d, k - 1)
    if length == 0:
        return x, state
    xp = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, D, K-1+L]
    y = F.conv1d(xp, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), groups=d)
    if k == 1:
        new_state = xp[..., :0]
    elif lengths is None:
        new_state = xp[..., xp.shape[-1] - (k - 1):]
    else:
        idx = lengths.to(x.device).view(b, 1) + torch.arange(k - 1, device=x.device)  # [B, K-1]
        new_state = xp.gather(-1, idx.unsqueeze(1).expand(b, d, k - 1))
    return y.transpose(1, 2), new_state


def _check(x: Tensor, weight: Tensor, state: Tensor | None) -> tuple[int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d expects x of shape [batch, length, dim], got {tuple(x.shape)}")
    b, length, d = x.shape
    if weight.dim() != 3 or weight.shape[0] != d or weight.shape[1] != 1:
        raise ValueError(f"conv weight must be [{d}, 1, K], got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if state is not None and state.shape != (b, d, k - 1):
        raise ValueError(f"conv state must be [{b}, {d}, {k - 1}], got {tuple(state.shape)}")
    return b, length, d


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    state: Tensor | None = None,
    lengths: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over ``x [B, L, D]`` with kernel ``weight [D, 1, K]``.

    ``state [B, D, K-1]`` holds the previous K-1 inputs (zeros at a sequence start). With ``lengths``,
    only the first ``lengths[r]`` tokens of row ``r`` are real; the returned state then holds the last
    K-1 *real* inputs, so padding never leaks into later calls. Returns ``(y [B, L, D], new_state)``.
    With ``out`` (a contiguous tensor shaped and typed like ``x``, not overlapping it) ``y`` is written
    there and returned as ``out``.
    """
    b, length, d = _check(x, weight, state)
    check_out(out, x)
    if x.device.type != "cpu" or length == 0 or _extension() is None:
        y, new_state = causal_conv1d_reference(x, weight, bias, state, lengths)
        return (y if out is None else out.copy_(y)), new_state
    k = weight.shape[-1]
    dtype = x.dtype
    w = weight.to(dtype).reshape(d, k)
    st = None if state is None else state.to(dtype).contiguous()
    bias = None if bias is None else bias.to(dtype)
    if x.stride(-1) != 1:  # the compiled forward reads any [B, L, D] view with unit channel stride
        x = x.contiguous()
    w = w.contiguous()
    if out is not None and not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, st, w, bias))):
        y = _extension().forward(x, st, w, bias, out)  # no autograd: straight into the caller's buffer
    else:
        y = _CausalConvFunction.apply(x, st, w, bias)
        if out is not None:
            y = out.copy_(y)
    if k == 1:
        return y, x.new_zeros(b, d, 0)
    return y, _new_state(x, x.new_zeros(b, d, k - 1) if state is None else state, k, lengths)
