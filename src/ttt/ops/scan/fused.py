"""The layer's whole inner part in one compiled pass: rotary embedding, target, scan, output LayerNorm.

Between its projections and its post-norm a TTT layer computes, per head (math §4-§6),

    q, k = rope(xq), rope(xk)           (positions inside the mini-batch)
    S    = ln_b - (xv - k)              (the reconstruction target, shifted by the LayerNorm bias)
    Zbar = scan(k, q, S, lr, ...)       (:func:`ttt.ops.scan.ttt_scan`)
    out  = q + ln_w * LN(Zbar) + ln_b

and at inference also the learning rates from the gate's logits, ``lr = base_lr * sigmoid(logit +
bias) / F`` (``lr_gate``; the logits read in place, a strided view of the layer's projections).

:func:`ttt.ops.dual.ttt_dual_heads_composed` is exactly that, written with the readable ops
(``rope_adjacent`` and ``ttt_dual``). With PyTorch ops it is a dozen passes over full ``[B, H, L, F]``
tensors plus their autograd backward and the head-layout copies. The compiled scan's ``heads_forward``
and ``heads_backward`` (``csrc/scan_io.h``, ``HeadsIo``) instead read the projections where they are
(strided ``[B, L, H, F]`` views of ``[B, L, D]``), form each mini-batch's inputs in a small per-thread
buffer and write ``out`` straight back as ``[B, L, H, F]``; the backward turns ``d out`` into the scan's
``d Zbar`` and the scan's ``dq, dk, dS`` into gradients of the projections in the same pass.
:func:`fused_backend` says when this path applies (the compiled scan is the chosen backend, the chunk
starts on a mini-batch boundary with every row full); otherwise :func:`ttt.ops.dual.ttt_dual_heads`
composes.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..functional import rope_table
from ..state import InnerState
from . import ScanBackend, default_group, resolve_backend


def fused_backend(xq: Tensor, coef: Tensor, state: InnerState, lengths: Tensor | None,
                  backend: str | None) -> ScanBackend | None:
    """The scan backend that runs these inputs in one fused pass, or ``None`` (then compose).

    It applies on the CPU when the chosen scan backend has the pass (the compiled scan), the inner state
    is float32/float64, every row is full (no ``lengths``) and the chunk starts on a mini-batch boundary.
    """
    inner = state.W1.dtype
    if (xq.device.type != "cpu" or xq.shape[1] == 0 or lengths is not None
            or inner not in (torch.float32, torch.float64) or bool(state.pos.any())):
        return None
    k, ln_w = _probes(coef.shape[0], xq.shape[-1], inner, xq.device)
    impl = resolve_backend(k, ln_w, state.weights() + state.grads(), backend)
    return impl if callable(getattr(impl, "heads_forward", None)) else None


# Small read-only tensors that are the same on every call, cached: at inference each tiny op costs far
# more than its arithmetic (right after the layer's GEMMs, its code and data are out of the caches).
@functools.lru_cache(maxsize=64)
def _probes(b: int, f: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Empty tensors of the scan layout's shape (``k [0, 1, b, F]``, ``ln_w [0, F]``) for
    :func:`ttt.ops.scan.resolve_backend`."""
    with torch.inference_mode(False):
        return torch.empty((0, 1, b, f), dtype=dtype, device=device), torch.empty((0, f), dtype=dtype,
                                                                                   device=device)


@functools.lru_cache(maxsize=64)
def _n_complete(rows: int, n: int, device: torch.device) -> Tensor:
    """``[rows]`` complete mini-batches per row, all ``n``."""
    with torch.inference_mode(False):
        return torch.full((rows,), n, dtype=torch.long, device=device)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a contiguous tensor of ``dtype`` (itself when it already is one)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


class _HeadsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl, group: int, cos: Tensor, sin: Tensor, n_complete: Tensor, xq: Tensor, xk: Tensor,
                xv: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor, ln_b: Tensor, *state: Tensor):
        out, final, saved, zbar = impl.heads_forward(xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete,
                                                     state, group, True)
        ctx.impl, ctx.group = impl, group
        ctx.save_for_backward(xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete, zbar, *saved)
        return (out, *final)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor, *d_final: Tensor):
        xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete, zbar, *saved = ctx.saved_tensors
        dxq, dxk, dxv, dlr, dcoef, dlnw, dlnb, *d_state = ctx.impl.heads_backward(
            xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete, tuple(saved), zbar, ctx.group, d_out,
            tuple(d.contiguous() for d in d_final))
        heads = ln_w.shape[0]
        dlnw = dlnw.view(-1, heads, dlnw.shape[-1]).sum(0)
        dlnb = dlnb.view(-1, heads, dlnb.shape[-1]).sum(0)
        return (None, None, None, None, None, dxq, dxk, dxv, dlr, dcoef.sum(0), dlnw, dlnb, *d_state)


@functools.lru_cache(maxsize=64)
def _rope_features(f: int, b: int, theta: float, dtype: torch.dtype, device: torch.device
                   ) -> tuple[Tensor, Tensor]:
    """The rotary table of positions ``0..b-1`` per feature (read-only; cached, it is the same every call):
    pair (2i, 2i+1) -> out[j] = x[j] * cos[j] + x[j ^ 1] * sin[j]."""
    with torch.inference_mode(False):  # normal tensors even when first built under inference mode
        cos, sin = rope_table(f, torch.arange(b, device=device), theta, dtype)
        return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)


def ttt_dual_heads_fused(impl: ScanBackend, xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, coef: Tensor,
                         ln_w: Tensor, ln_b: Tensor, state: InnerState, rope_theta: float,
                         remat_group_size: int = 0, out: Tensor | None = None,
                         lr_gate: tuple[Tensor, float] | None = None) -> tuple[Tensor, InnerState]:
    """Same contract as :func:`ttt.ops.dual.ttt_dual_heads` (without ``lengths``), in one pass of
    ``impl`` (from :func:`fused_backend`); the output in the inner state's dtype. Without autograd, a
    given ``out`` (contiguous ``[B, L, H, F]`` of that dtype) receives it and is returned, and
    ``lr_gate = (bias, base_lr)`` makes ``lr`` the gate's logits, turned into learning rates in the pass
    (with autograd it must be None: the caller forms ``lr``)."""
    bsz, length, heads, f = xq.shape
    inner = state.W1.dtype
    b = coef.shape[0]
    xq, xk, xv = (t if t.dtype == inner and t.stride(-1) == 1 else t.to(inner).contiguous()
                  for t in (xq, xk, xv))
    coef, ln_w, ln_b = (_as(t, inner) for t in (coef, ln_w, ln_b))
    if lr_gate is None:
        lr, lr_bias, lr_base = _as(lr, inner), None, 1.0
    else:  # the logits are read where they are (a strided view of the projections)
        lr, lr_bias, lr_base = lr if lr.dtype == inner else lr.to(inner), _as(lr_gate[0], inner), lr_gate[1]
    cos, sin = _rope_features(f, b, float(rope_theta), inner, xq.device)
    rows = bsz * heads
    n_mb = -(-length // b)
    n_complete = _n_complete(rows, length // b, xq.device)
    init = tuple(t.reshape(rows, *t.shape[2:]).contiguous() for t in state.weights() + state.grads())
    group = remat_group_size if remat_group_size > 0 else default_group(n_mb)
    tensors = (xq, xk, xv, lr, coef, ln_w, ln_b, *init)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        if lr_gate is not None:
            raise ValueError("lr_gate is for inference: with autograd pass the learning rates as lr")
        out, *final = _HeadsFunction.apply(impl, group, cos, sin, n_complete, *tensors)
    else:
        out, final, _, _ = impl.heads_forward(xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete, init,
                                              group, False, out, lr_bias, lr_base)
    final = [t.reshape(bsz, heads, *t.shape[1:]) for t in final]
    n_w = len(final) // 2
    pos = torch.full((bsz,), length % b, dtype=torch.long, device=xq.device)
    return out, InnerState.from_parts(tuple(final[:n_w]), tuple(final[n_w:]), pos)
