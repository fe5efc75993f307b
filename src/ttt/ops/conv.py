"""Depthwise causal 1-D convolution with a streaming state (math §6 conv_q/conv_k, §7 pre-conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    state: Tensor | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv over ``x [B, L, D]`` with kernel ``weight [D, 1, K]``.

    ``state [B, D, K-1]`` holds the previous K-1 inputs (zeros at a sequence start). With ``lengths``,
    only the first ``lengths[r]`` tokens of row ``r`` are real; the returned state then holds the last
    K-1 *real* inputs, so padding never leaks into later calls. Returns ``(y [B, L, D], new_state)``.
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d expects x of shape [batch, length, dim], got {tuple(x.shape)}")
    b, length, d = x.shape
    if weight.dim() != 3 or weight.shape[0] != d or weight.shape[1] != 1:
        raise ValueError(f"conv weight must be [{d}, 1, K], got {tuple(weight.shape)}")
    k = weight.shape[-1]
    if state is None:
        state = x.new_zeros(b, d, k - 1)
    elif state.shape != (b, d, k - 1):
        raise ValueError(f"conv state must be [{b}, {d}, {k - 1}], got {tuple(state.shape)}")
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
