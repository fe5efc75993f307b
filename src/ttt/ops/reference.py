"""Token-by-token primal form of TTT-Linear and TTT-MLP: slow, readable, obviously right (math §1-4).

Each token takes the gradient of its own self-supervised loss at the weights its mini-batch started
with (obtained here by ``torch.func.grad`` of the written-out loss, independently of the closed-form
LayerNorm backward of the fast path), adds it to the mini-batch's running sum, and reads its output
with the weights ``W0 - coef_i * sum``. Every ``b`` tokens the running weights become the new ``W0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import gelu_tanh, layer_norm
from .state import InnerState


def _f_res(x: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
    """The inner model without residual/LayerNorm, per head: ``x [H, F]`` -> ``[H, F]``."""
    if len(weights) == 2:
        w1, b1 = weights
        return torch.einsum("hf,hfg->hg", x, w1) + b1[:, 0]
    w1, b1, w2, b2 = weights
    h = gelu_tanh(torch.einsum("hf,hfg->hg", x, w1) + b1[:, 0])
    return torch.einsum("hg,hgf->hf", h, w2) + b2[:, 0]


def _inner_loss(weights: tuple[Tensor, ...], k: Tensor, v: Tensor, ln_w: Tensor, ln_b: Tensor) -> Tensor:
    """``0.5 * || LN(f_res(k)) - (v - k) ||^2``, summed over features and heads (heads are independent)."""
    pred = layer_norm(_f_res(k, weights), ln_w, ln_b)
    return 0.5 * ((pred - (v - k)) ** 2).sum()


def _plain_loss(weights: tuple[Tensor, ...], k: Tensor, v: Tensor, ln_w: Tensor, ln_b: Tensor) -> Tensor:
    """``0.5 * || f_res(k) - v ||^2``: the inner loss without LayerNorm and residual."""
    return 0.5 * ((_f_res(k, weights) - v) ** 2).sum()


def ttt_reference(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    lr: Tensor,
    coef: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    state: InnerState,
    lengths: Tensor | None = None,
    ln_residual: bool = True,
) -> tuple[Tensor, InnerState]:
    """Run the TTT inner loop one token at a time (TTT-Linear or TTT-MLP, following ``state``).

    Args:
        xq, xk, xv: ``[B, H, L, F]`` query / key / value views.
        lr: ``[B, H, L]`` per-token learning rates ``lr_j`` (math §4).
        coef: ``[b]`` per-position coefficients ``coef_i``; ``b`` is the mini-batch size.
        ln_w, ln_b: ``[H, F]`` inner LayerNorm parameters.
        state: the carried inner state (its ``pos`` says where each row is inside its mini-batch).
        lengths: optional ``[B]``: only the first ``lengths[r]`` tokens of row ``r`` are real.
        ln_residual: if False, the inner model has no LayerNorm and residual (output ``f_res(q)``).

    Returns:
        ``out [B, H, L, F]`` (``q + LN(f_res(q; W_t))``, zeros at padding) and the new state.
    """
    bsz, _, length, _ = xq.shape
    mb = coef.shape[0]
    grad_fn = torch.func.grad(_inner_loss if ln_residual else _plain_loss)
    rows_out, rows_state = [], []
    for r in range(bsz):
        n = length if lengths is None else int(lengths[r])
        w0 = [w[r] for w in state.weights()]
        acc = [g[r] for g in state.grads()]
        pos = int(state.pos[r])
        outs = []
        for t in range(n):
            grads = grad_fn(tuple(w0), xk[r, :, t], xv[r, :, t], ln_w, ln_b)
            acc = [a + lr[r, :, t].view(-1, *([1] * (a.dim() - 1))) * g for a, g in zip(acc, grads)]
            w_t = tuple(w - coef[pos] * a for w, a in zip(w0, acc))
            q = xq[r, :, t]
            outs.append(q + layer_norm(_f_res(q, w_t), ln_w, ln_b) if ln_residual else _f_res(q, w_t))
            pos += 1
            if pos == mb:
                w0, acc, pos = list(w_t), [torch.zeros_like(a) for a in acc], 0
        out = torch.stack(outs, dim=1) if outs else xq.new_zeros(xq.shape[1], 0, xq.shape[3])
        if n < length:
            out = torch.cat([out, xq.new_zeros(xq.shape[1], length - n, xq.shape[3])], dim=1)
        rows_out.append(out)
        rows_state.append((w0, acc, pos))
    ws = [torch.stack([s[0][i] for s in rows_state]) for i in range(len(state.weights()))]
    gs = [torch.stack([s[1][i] for s in rows_state]) for i in range(len(state.weights()))]
    pos_t = torch.tensor([s[2] for s in rows_state], dtype=torch.long, device=state.pos.device)
    return torch.stack(rows_out), InnerState.from_parts(tuple(ws), tuple(gs), pos_t)
