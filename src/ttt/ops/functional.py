"""Small differentiable building blocks shared by the reference and the fast path (math §2, §6)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh(x: Tensor) -> Tensor:
    """The tanh approximation of GELU used by the inner TTT-MLP and the output gate."""
    return F.gelu(x, approximate="tanh")


def gelu_tanh_grad(x: Tensor) -> Tensor:
    """Derivative of :func:`gelu_tanh` with respect to its input."""
    inner = GELU_C * (x + 0.044715 * x.pow(3))
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3 * 0.044715 * x * x)


def gelu_tanh_backward(grad: Tensor, x: Tensor) -> Tensor:
    """``grad * gelu_tanh'(x)`` in one fused (twice-differentiable) kernel."""
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dimension with explicit (broadcastable, e.g. per-head) affine parameters."""
    return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=eps), weight)


def ln_l2_grad(z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """Gradient w.r.t. ``z`` of ``0.5 * ||LN(z) - target||^2`` (sum over the last dim).

    Equal to :func:`ln_l2_grad_closed_form`, computed with PyTorch's fused LayerNorm kernels (fewer
    small kernels inside the scan; both are differentiable for the outer backward).
    """
    return ln_l2_grad_shifted(z, bias - target, weight, eps)


def ln_l2_grad_shifted(z: Tensor, shift: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """:func:`ln_l2_grad` with ``shift = bias - target`` precomputed (saves one kernel in the scan)."""
    f = z.shape[-1]
    xhat, mean, rstd = torch.ops.aten.native_layer_norm(z, [f], None, None, eps)
    gy = weight * torch.addcmul(shift, xhat, weight)
    mask = [True, False, False]
    return torch.ops.aten.native_layer_norm_backward(gy, z, [f], mean, rstd, None, None, mask)[0]


def ln_l2_grad_closed_form(
    z: Tensor, target: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6
) -> Tensor:
    """Math §2 closed form: ``dZ = (F*gy - sum(gy) - xhat * sum(gy*xhat)) / (F * std)``,
    ``gy = weight * (LN(z) - target)``."""
    f = z.shape[-1]
    mu = z.mean(-1, keepdim=True)
    xc = z - mu
    var = (xc * xc).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = xc * rstd
    gy = weight * (xhat * weight + bias - target)
    return (f * gy - gy.sum(-1, keepdim=True) - xhat * (gy * xhat).sum(-1, keepdim=True)) * (rstd / f)


def rope_table(f: int, positions: Tensor, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos, sin [..., F/2]`` of the rotary angles ``pos * theta^(-2i/F)`` (computed in float64)."""
    inv_freq = theta ** (-torch.arange(0, f, 2, device=positions.device, dtype=torch.float64) / f)
    ang = positions.to(torch.float64)[..., None] * inv_freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_adjacent(x: Tensor, positions: Tensor, theta: float = 10000.0, period: int | None = None) -> Tensor:
    """Rotary embedding rotating adjacent feature pairs (2i, 2i+1) by ``pos * theta^(-2i/F)``.

    Args:
        x: ``[B, H, L, F]`` with even ``F``.
        positions: ``[B, L]`` integer positions (the project uses the position inside the mini-batch).
        period: if every position is known to lie in ``[0, period)``, the rotations are computed once
            per position and gathered (cheaper than one sine and cosine per token).
    """
    f = x.shape[-1]
    if f % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {f}")
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    if period is not None:  # one table lookup per token
        cos, sin = rope_table(f, torch.arange(period, device=x.device), theta, wide)
        cos, sin = cos[positions], sin[positions]  # [B, L, F/2]
    else:
        cos, sin = rope_table(f, positions, theta, wide)
    if x.dtype in (torch.float32, torch.float64):  # one complex multiply: (x0 + i x1) * e^{i ang}
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], f // 2, 2).contiguous())
        return torch.view_as_real(xc * torch.complex(cos, sin)[:, None]).flatten(-2)
    cos, sin = cos.to(x.dtype)[:, None], sin.to(x.dtype)[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def ttt_learning_rate(logits: Tensor, bias: Tensor, base_lr: float, head_dim: int,
                      dtype: torch.dtype | None = None) -> Tensor:
    """The inner learning rates ``base_lr * sigmoid(logits + bias) / head_dim`` (math §4) of the gate's
    logits ``[B, H, L]`` with a bias per head ``[H]``; the sum cast to ``dtype`` (when given) before the
    sigmoid."""
    z = logits + bias.view(1, -1, 1)
    return base_lr * torch.sigmoid(z if dtype is None else z.to(dtype)) / head_dim


def token_coefficients(learnable_token_idx: Tensor) -> Tensor:
    """``coef_i = max(0, 1/(i+1) + delta_i)`` for the positions of a mini-batch (math §4)."""
    b = learnable_token_idx.shape[-1]
    base = 1.0 / torch.arange(1, b + 1, device=learnable_token_idx.device, dtype=learnable_token_idx.dtype)
    return torch.clamp(base + learnable_token_idx, min=0.0)
