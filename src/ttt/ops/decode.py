"""One-token step of TTT-Linear / TTT-MLP in the primal form: the fast path for decoding (math §3, §5).

For a single new token per row there is nothing to parallelise, so instead of the dual form's grid
machinery this applies the update rule directly: take the token's gradient at the open mini-batch's
start weights, add it (times ``lr``) to the accumulators, read the output with ``W - coef_pos * acc``,
and close the mini-batch for the rows whose token was its last. Rows may sit at different positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import scan
from .functional import gelu_tanh, gelu_tanh_backward, layer_norm, ln_l2_grad
from .state import InnerState


def _fused_decoder(xq: Tensor, tensors: tuple[Tensor, ...], state: InnerState):
    """The Triton backend if it should run this step (same selection and fallback rules as the scan)."""
    name = scan.requested_backend()
    if name not in ("auto", "triton") or (name == "auto" and xq.device.type != "cuda"):
        return None
    forced = name == "triton"
    impl = scan.get_backend("triton")
    if impl is None:
        scan.warn_once(f"TTT scan backend 'triton' is unavailable ({scan.why_unavailable('triton')}); "
                       "using the PyTorch decode step")
        return None
    reason = impl.decode_unsupported(xq, state)
    if reason is None and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        reason = "inputs require grad (the fused step has no backward)"
    if reason is None:
        return impl
    if forced:
        scan.warn_once(f"TTT scan backend 'triton' does not support this decode step ({reason}); "
                       "using the PyTorch decode step")
    return None


def ttt_step(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    lr: Tensor,
    coef: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    state: InnerState,
    lengths: Tensor | None = None,
) -> tuple[Tensor, InnerState]:
    """Advance every row by its one token; same contract as :func:`ttt.ops.dual.ttt_dual` with ``L = 1``.

    ``lengths`` (0 or 1 per row) marks rows whose token is padding: their state is left untouched and
    their output is 0.
    """
    if xq.dim() != 4 or xq.shape[2] != 1:
        raise ValueError(f"ttt_step expects [batch, heads, 1, head_dim] inputs, got {tuple(xq.shape)}")
    fused = _fused_decoder(xq, (xq, xk, xv, lr, coef, ln_w, ln_b, *state.weights(), *state.grads()), state)
    res = None if fused is None else fused.decode(xq, xk, xv, lr, coef, ln_w, ln_b, state, lengths)
    if res is not None:
        return res
    in_dtype, cd = xq.dtype, state.W1.dtype
    bsz, heads, _, f = xq.shape
    mb = coef.shape[0]
    q, k, v = xq.to(cd), xk.to(cd), xv.to(cd)  # [B, H, 1, F]
    lr_t = lr.to(cd).view(bsz, heads, 1, 1)
    coef = coef.to(cd)
    lw, lb = ln_w.to(cd).view(1, heads, 1, f), ln_b.to(cd).view(1, heads, 1, f)
    pos = state.pos.to(q.device)
    c = coef[pos].view(bsz, 1, 1, 1)  # coefficient of each row's position
    if lengths is None:
        active = torch.ones(bsz, dtype=torch.bool, device=q.device)
    else:
        active = lengths.to(q.device) > 0
    closes = active & (pos == mb - 1)
    c_last = coef[-1]

    if not state.is_mlp:
        w, b, gw, gb = state.W1, state.b1, state.gW1, state.gb1
        g = ln_l2_grad(k @ w + b, v - k, lw, lb)  # [B, H, 1, F]
        lg = lr_t * g
        gw_new = gw + k.transpose(-1, -2) @ lg
        gb_new = gb + lg
        z = q @ w + b - c * (q @ gw_new + gb_new)
        news = [(w, gw_new), (b, gb_new)]
    else:
        w1, b1, w2, b2 = state.W1, state.b1, state.W2, state.b2
        z1 = k @ w1 + b1
        x2 = gelu_tanh(z1)
        g2 = ln_l2_grad(x2 @ w2 + b2, v - k, lw, lb)
        g1 = gelu_tanh_backward(g2 @ w2.transpose(-1, -2), z1)
        lg1, lg2 = lr_t * g1, lr_t * g2
        gw1_new, gb1_new = state.gW1 + k.transpose(-1, -2) @ lg1, state.gb1 + lg1
        gw2_new, gb2_new = state.gW2 + x2.transpose(-1, -2) @ lg2, state.gb2 + lg2
        zq1 = q @ w1 + b1 - c * (q @ gw1_new + gb1_new)
        xq2 = gelu_tanh(zq1)
        z = xq2 @ w2 + b2 - c * (xq2 @ gw2_new + gb2_new)
        news = [(w1, gw1_new), (b1, gb1_new), (w2, gw2_new), (b2, gb2_new)]
    out = q + layer_norm(z, lw, lb)

    act = active.view(bsz, 1, 1, 1)
    cls = closes.view(bsz, 1, 1, 1)
    weights, grads = [], []
    for (w_old, acc_new), acc_old in zip(news, state.grads()):
        acc = torch.where(act, acc_new, acc_old)
        weights.append(torch.where(cls, w_old - c_last * acc_new, w_old))
        grads.append(torch.where(cls, torch.zeros_like(acc), acc))
    new_pos = torch.where(active, (pos + 1) % mb, pos)
    out = torch.where(act, out, torch.zeros((), dtype=out.dtype, device=out.device))
    new = InnerState.from_parts(tuple(weights), tuple(grads), new_pos)
    return out.to(in_dtype), new
