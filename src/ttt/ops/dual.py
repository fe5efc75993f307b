"""Mini-batch TTT in the dual form: the fast path for TTT-Linear and TTT-MLP (spec §3, §5).

Tokens are aligned on a grid of mini-batches of ``b`` tokens (a row whose state is ``pos`` tokens into
its open mini-batch starts ``pos`` slots into the grid; empty slots carry a zero learning rate and so
touch nothing). Everything that does not depend on the inner weights (``E``, ``E * (Q K^T + 1)``,
targets) is computed for all mini-batches at once; only the scan over mini-batches is sequential, and
inside it every operation is a batched matmul over ``batch * heads``. Per-token weights are never
materialised. Optionally the scan is rematerialised in groups of mini-batches
(``torch.utils.checkpoint``), so training memory keeps only one weight state per group.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .functional import gelu_tanh, gelu_tanh_backward, layer_norm, ln_l2_grad_shifted
from .state import InnerState


def _validate(xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor, ln_b: Tensor,
              state: InnerState, lengths: Tensor | None) -> None:
    if xq.dim() != 4:
        raise ValueError(f"xq must be [batch, heads, length, head_dim], got shape {tuple(xq.shape)}")
    if xk.shape != xq.shape or xv.shape != xq.shape:
        raise ValueError(f"xq/xk/xv shapes differ: {tuple(xq.shape)}, {tuple(xk.shape)}, {tuple(xv.shape)}")
    bsz, heads, length, f = xq.shape
    if lr.shape != (bsz, heads, length):
        raise ValueError(f"lr must be [{bsz}, {heads}, {length}], got {tuple(lr.shape)}")
    if coef.dim() != 1 or coef.shape[0] < 1:
        raise ValueError(f"coef must be a non-empty vector [mini_batch_size], got {tuple(coef.shape)}")
    if ln_w.shape != (heads, f) or ln_b.shape != (heads, f):
        raise ValueError(f"inner LayerNorm parameters must be [{heads}, {f}], got {tuple(ln_w.shape)}")
    w1 = state.W1
    if w1.shape[:3] != (bsz, heads, f):
        raise ValueError(f"state.W1 must be [{bsz}, {heads}, {f}, *], got {tuple(w1.shape)} "
                         "(state batch size or head layout does not match the input)")
    if w1.device != xq.device:
        raise ValueError(f"state is on {w1.device} but the input is on {xq.device}")
    if not w1.is_floating_point():
        raise ValueError(f"state dtype must be floating point, got {w1.dtype}")
    if lengths is not None and lengths.shape != (bsz,):
        raise ValueError(f"lengths must be [{bsz}], got {tuple(lengths.shape)}")


def _align(x: Tensor, starts: Tensor, lengths: Tensor, total: int) -> Tensor:
    """Place row r's first ``lengths[r]`` tokens at grid slots ``starts[r] ...``; zeros elsewhere.

    ``x`` is ``[B, H, L, ...]``; the result is ``[B, H, total, ...]``.
    """
    bsz, heads, length = x.shape[:3]
    slots = torch.arange(total, device=x.device)
    src = slots.view(1, total) - starts.view(bsz, 1)  # token index that lands in each slot
    valid = (src >= 0) & (src < lengths.view(bsz, 1))
    idx = src.clamp(0, max(length - 1, 0))
    extra = x.shape[3:]
    gidx = idx.view(bsz, 1, total, *([1] * len(extra))).expand(bsz, heads, total, *extra)
    out = x.gather(2, gidx)
    mask = valid.view(bsz, 1, total, *([1] * len(extra)))
    return torch.where(mask, out, torch.zeros((), dtype=x.dtype, device=x.device))


def _unalign(y: Tensor, starts: Tensor, lengths: Tensor, length: int) -> Tensor:
    """Inverse of :func:`_align` for ``[B, H, total, F]``: token t of row r comes from slot starts[r]+t."""
    bsz, heads, total, f = y.shape
    t = torch.arange(length, device=y.device).view(1, length)
    src = (t + starts.view(bsz, 1)).clamp(max=total - 1)
    out = y.gather(2, src.view(bsz, 1, length, 1).expand(bsz, heads, length, f))
    valid = (t < lengths.view(bsz, 1)).view(bsz, 1, length, 1)
    return torch.where(valid, out, torch.zeros((), dtype=y.dtype, device=y.device))


def _scan_linear(carry: tuple[Tensor, ...], k: Tensor, q: Tensor, shift: Tensor, a: Tensor, lr: Tensor,
                 lr_last: Tensor, coef: Tensor, ln_w: Tensor | None, complete: Tensor | None, first: bool
                 ) -> tuple[Tensor, ...]:
    """Scan TTT-Linear over ``n`` mini-batches; returns ``(Zbar, W, b, gW, gb)``.

    Per mini-batch: keys and queries ``[BH, b, F]``, ``shift = ln_b - target`` (or ``-target``
    without LayerNorm), ``a = E * (Q K^T + 1)``, ``lr [BH, b, 1]`` and ``lr_last = coef_{b-1} * lr``.
    """
    w, bias, gw, gb = carry
    coef_last = coef[-1]
    coef_col = coef.view(-1, 1)
    outs = []
    # unbind once: indexing inside the loop would make autograd scatter into full-size zeros each step
    steps = zip(*(t.unbind(0) for t in (k, q, shift, a, lr, lr_last)))
    for i, (ki, qi, si, ai, lri, lli) in enumerate(steps):
        z = torch.baddbmm(bias, ki, w)
        g = ln_l2_grad_shifted(z, si, ln_w) if ln_w is not None else z + si
        zq = torch.baddbmm(torch.baddbmm(bias, qi, w), ai, g, alpha=-1.0)
        carried = first and i == 0  # tokens of the open mini-batch seen in earlier calls
        if carried:
            zq = zq - coef_col * (torch.bmm(qi, gw) + gb)
        outs.append(zq)
        if complete is None and not carried:  # nothing accumulated: step the weights directly
            lg = lli * g
            w = torch.baddbmm(w, ki.transpose(1, 2), lg, alpha=-1.0)
            bias = bias - lg.sum(1, keepdim=True)
            continue
        lg = lri * g
        gw_new = torch.baddbmm(gw, ki.transpose(1, 2), lg)
        gb_new = gb + lg.sum(1, keepdim=True)
        if complete is None:
            w, bias = w - coef_last * gw_new, bias - coef_last * gb_new
            gw, gb = torch.zeros_like(gw), torch.zeros_like(gb)
        else:
            c = complete[i].view(-1, 1, 1)
            w = torch.where(c, w - coef_last * gw_new, w)
            bias = torch.where(c, bias - coef_last * gb_new, bias)
            gw = torch.where(c, torch.zeros_like(gw_new), gw_new)
            gb = torch.where(c, torch.zeros_like(gb_new), gb_new)
    return (torch.stack(outs), w, bias, gw, gb)


def _scan_mlp(carry: tuple[Tensor, ...], k: Tensor, q: Tensor, shift: Tensor, a: Tensor, e: Tensor,
              lr: Tensor, lr_last: Tensor, coef: Tensor, ln_w: Tensor, complete: Tensor | None, first: bool
              ) -> tuple[Tensor, ...]:
    """Scan TTT-MLP over ``n`` mini-batches (dual form applied layer by layer).

    Same per-mini-batch inputs as :func:`_scan_linear` plus ``e`` (``E``, for the second layer's
    ``E * (Xbar2 X2^T + 1)``).
    """
    w1, b1, w2, b2, gw1, gb1, gw2, gb2 = carry
    coef_last = coef[-1]
    coef_col = coef.view(-1, 1)
    outs = []
    steps = zip(*(t.unbind(0) for t in (k, q, shift, a, e, lr, lr_last)))
    for i, (ki, qi, si, ai, ei, lri, lli) in enumerate(steps):
        z1 = torch.baddbmm(b1, ki, w1)
        x2 = gelu_tanh(z1)
        z2 = torch.baddbmm(b2, x2, w2)
        g2 = ln_l2_grad_shifted(z2, si, ln_w)
        g1 = gelu_tanh_backward(torch.bmm(g2, w2.transpose(1, 2)), z1)
        zb1 = torch.baddbmm(torch.baddbmm(b1, qi, w1), ai, g1, alpha=-1.0)
        carried = first and i == 0  # tokens of the open mini-batch seen in earlier calls
        if carried:
            zb1 = zb1 - coef_col * (torch.bmm(qi, gw1) + gb1)
        xb2 = gelu_tanh(zb1)
        a2 = ei * torch.baddbmm(ei.new_ones(()), xb2, x2.transpose(1, 2))
        zb2 = torch.baddbmm(torch.baddbmm(b2, xb2, w2), a2, g2, alpha=-1.0)
        if carried:
            zb2 = zb2 - coef_col * (torch.bmm(xb2, gw2) + gb2)
        outs.append(zb2)
        if complete is None and not carried:  # nothing accumulated: step the weights directly
            lg1, lg2 = lli * g1, lli * g2
            w1 = torch.baddbmm(w1, ki.transpose(1, 2), lg1, alpha=-1.0)
            b1 = b1 - lg1.sum(1, keepdim=True)
            w2 = torch.baddbmm(w2, x2.transpose(1, 2), lg2, alpha=-1.0)
            b2 = b2 - lg2.sum(1, keepdim=True)
            continue
        lg1, lg2 = lri * g1, lri * g2
        news = (torch.baddbmm(gw1, ki.transpose(1, 2), lg1), gb1 + lg1.sum(1, keepdim=True),
                torch.baddbmm(gw2, x2.transpose(1, 2), lg2), gb2 + lg2.sum(1, keepdim=True))
        if complete is None:
            w1, b1, w2, b2 = (p - coef_last * s for p, s in zip((w1, b1, w2, b2), news))
            gw1, gb1, gw2, gb2 = (torch.zeros_like(s) for s in news)
        else:
            c = complete[i].view(-1, 1, 1)
            w1, b1, w2, b2 = (torch.where(c, p - coef_last * s, p)
                              for p, s in zip((w1, b1, w2, b2), news))
            gw1, gb1, gw2, gb2 = (torch.where(c, torch.zeros_like(s), s) for s in news)
    return (torch.stack(outs), w1, b1, w2, b2, gw1, gb1, gw2, gb2)


def ttt_dual(
    xq: Tensor,
    xk: Tensor,
    xv: Tensor,
    lr: Tensor,
    coef: Tensor,
    ln_w: Tensor,
    ln_b: Tensor,
    state: InnerState,
    lengths: Tensor | None = None,
    remat_group_size: int = 0,
    ln_residual: bool = True,
) -> tuple[Tensor, InnerState]:
    """TTT-Linear / TTT-MLP (following ``state``) over a chunk of tokens, in the mini-batch dual form.

    Same contract as :func:`ttt.ops.reference.ttt_reference`: inputs ``[B, H, L, F]``, ``lr [B, H, L]``,
    ``coef [b]``, ``ln_w/ln_b [H, F]``, carried ``state``; optional ``lengths [B]`` (real tokens first).
    The inner loop runs in the state's dtype (fp32 for bf16/fp16 inputs, or fp64); the output has the
    input's dtype. ``remat_group_size > 0`` checkpoints the scan every that many mini-batches.
    ``ln_residual=False`` (TTT-Linear only) drops the inner LayerNorm and residual: the loss becomes
    ``0.5 * ||f(k) - v||^2`` and the output ``f(q)``; used to check the linear-attention identity.
    """
    _validate(xq, xk, xv, lr, coef, ln_w, ln_b, state, lengths)
    in_dtype = xq.dtype
    cd = state.W1.dtype
    bsz, heads, length, f = xq.shape
    mb = coef.shape[0]
    device = xq.device
    if length == 0:
        return xq.new_zeros(xq.shape), state
    xq, xk, xv, lr = xq.to(cd), xk.to(cd), xv.to(cd), lr.to(cd)
    coef, ln_w, ln_b = coef.to(cd), ln_w.to(cd), ln_b.to(cd)

    starts = state.pos.to(device)
    s_min, s_max = int(starts.min()), int(starts.max())
    if lengths is None:
        n_vec = torch.full((bsz,), length, dtype=torch.long, device=device)
        uniform = s_min == s_max
    else:
        n_vec = lengths.to(device=device, dtype=torch.long)
        if int(n_vec.min()) < 0 or int(n_vec.max()) > length:
            raise ValueError(f"lengths must lie in [0, {length}], got {lengths.tolist()}")
        uniform = s_min == s_max and bool((n_vec == length).all())
    ends = starts + n_vec
    n_mb = -(-int(ends.max()) // mb)
    total = n_mb * mb
    if uniform and s_min == 0 and total == length:
        aq, ak, av, alr = xq, xk, xv, lr
    else:
        aq, ak, av = (_align(x, starts, n_vec, total) for x in (xq, xk, xv))
        alr = _align(lr, starts, n_vec, total)

    bh = bsz * heads

    def grid(x: Tensor) -> Tensor:  # [B, H, total, F] -> [n_mb, B*H, b, F]
        return x.reshape(bh, n_mb, mb, x.shape[-1]).transpose(0, 1)

    k, q, v = grid(ak), grid(aq), grid(av)
    lr_g = alr.reshape(bh, n_mb, 1, mb).transpose(0, 1)  # [n_mb, BH, 1, b]
    lr_col = lr_g.transpose(-1, -2)  # [n_mb, BH, b, 1]
    if not ln_residual and state.is_mlp:
        raise ValueError("ln_residual=False is only defined for TTT-Linear")
    tgt = v - k if ln_residual else v
    shift = (ln_b.view(1, heads, 1, f).expand(bsz, heads, 1, f).reshape(1, bh, 1, f) - tgt if ln_residual
             else -tgt)
    tril = torch.ones(mb, mb, dtype=torch.bool, device=device).tril()
    e = torch.where(tril, coef.view(mb, 1) * lr_g, torch.zeros((), dtype=cd, device=device))  # [n, BH, b, b]
    a1 = e * (torch.matmul(q, k.transpose(-1, -2)) + 1.0)
    lnw = ln_w.view(1, heads, 1, f).expand(bsz, heads, 1, f).reshape(bh, 1, f)

    # complete[m, r]: row r fills mini-batch m entirely, so its weights move on at the boundary.
    bounds = (torch.arange(n_mb, device=device) + 1) * mb
    complete_rows = ends.view(1, bsz) >= bounds.view(n_mb, 1)  # [n_mb, B]
    complete = None
    if not bool(complete_rows.all()):
        complete = complete_rows.repeat_interleave(heads, dim=1)  # [n_mb, BH]

    def flat(t: Tensor) -> Tensor:
        return t.reshape(bh, *t.shape[2:])

    carry = tuple(flat(t) for t in state.weights() + state.grads())
    is_mlp = state.is_mlp
    lr_last = coef[-1] * lr_col
    group = remat_group_size if remat_group_size > 0 else n_mb
    zbars = []
    for g0 in range(0, n_mb, group):
        sl = slice(g0, min(g0 + group, n_mb))
        comp = None if complete is None else complete[sl]
        first = g0 == 0 and s_max > 0
        if is_mlp:
            args = (k[sl], q[sl], shift[sl], a1[sl], e[sl], lr_col[sl], lr_last[sl], coef, lnw, comp, first)
            fn = _scan_mlp
        else:
            args = (k[sl], q[sl], shift[sl], a1[sl], lr_col[sl], lr_last[sl], coef,
                    lnw if ln_residual else None, comp, first)
            fn = _scan_linear
        if remat_group_size > 0 and torch.is_grad_enabled():
            res = checkpoint(fn, carry, *args, use_reentrant=False)
        else:
            res = fn(carry, *args)
        zbars.append(res[0])
        carry = res[1:]
    zbar = torch.cat(zbars).transpose(0, 1).reshape(bsz, heads, total, f)
    if ln_residual:
        out = aq + layer_norm(zbar, ln_w.view(1, heads, 1, f), ln_b.view(1, heads, 1, f))
    else:
        out = zbar
    if not (uniform and s_min == 0 and total == length):
        out = _unalign(out, starts, n_vec, length)

    def unflat(t: Tensor) -> Tensor:
        return t.reshape(bsz, heads, *t.shape[1:])

    c = [unflat(t) for t in carry]
    pos = ends % mb
    if is_mlp:
        new = InnerState(c[0], c[1], c[4], c[5], pos, c[2], c[3], c[6], c[7])
    else:
        new = InnerState(c[0], c[1], c[2], c[3], pos)
    return out.to(in_dtype), new
