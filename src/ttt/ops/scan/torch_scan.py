"""The scan over mini-batches in plain PyTorch: forward and hand-written reverse-scan backward.

This is the readable fast path and the fallback of every compiled backend; the compiled backends
(C++, Triton) implement exactly these per-mini-batch formulas. The derivation of the backward is
written down in ``docs/scan-backward.md``; the forward follows ``docs/math.md`` §3 and §5.

Layout (see :mod:`ttt.ops.scan`): per ``batch*heads`` row ``r`` and mini-batch ``m``, keys ``K``,
queries ``Q`` and ``S = ln_b - target`` are ``[b, F]``, the learning rates ``lr`` are ``[b]``. The
state is ``(W1, b1[, W2, b2], gW1, gb1[, gW2, gb2])``: weights at the start of the mini-batch and the
accumulated ``sum_j lr_j * grad_j`` of tokens already seen in it (non-zero only for a carried open
mini-batch or after a row ran out of tokens).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import GELU_C, gelu_tanh, gelu_tanh_backward, gelu_tanh_grad

EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# building blocks (batched over rows: every tensor has a leading [R] dimension)
# --------------------------------------------------------------------------------------------------

def _ln_grad(z: Tensor, s: Tensor, ln_w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradient ``G`` of ``0.5 * ||LN(z) - target||^2`` w.r.t. ``z`` (math §2), ``s = ln_b - target``.

    Returns ``(G, xhat, rstd, gy)`` with ``gy = ln_w * (ln_w * xhat + s)``; ``G`` is the LayerNorm
    backward of ``gy`` (:func:`_ln_backward`), computed with PyTorch's fused LayerNorm kernels.
    """
    f = z.shape[-1]
    xhat, mean, rstd = torch.ops.aten.native_layer_norm(z, [f], None, None, EPS)
    gy = ln_w * torch.addcmul(s, xhat, ln_w)
    g = torch.ops.aten.native_layer_norm_backward(gy, z, [f], mean, rstd, None, None,
                                                   [True, False, False])[0]
    return g, xhat, rstd, gy


def _ln_backward(d: Tensor, xhat: Tensor, rstd: Tensor) -> Tensor:
    """``rstd * (d - mean(d) - xhat * mean(d * xhat))``: LayerNorm backward (self-adjoint in ``d``)."""
    return rstd * (d - d.mean(-1, keepdim=True) - xhat * (d * xhat).mean(-1, keepdim=True))


def _ln_grad_backward(dg: Tensor, g: Tensor, gy: Tensor, xhat: Tensor, rstd: Tensor, s: Tensor,
                      ln_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of :func:`_ln_grad`: given ``dG`` return ``(dZ, dS, d ln_w)`` (``d ln_w`` per row)."""
    f = xhat.shape[-1]
    dgy = _ln_backward(dg, xhat, rstd)
    s2 = (gy * xhat).mean(-1, keepdim=True)
    dxhat = -rstd * (dg * s2 + gy * (dg * xhat).mean(-1, keepdim=True)) + ln_w * ln_w * dgy
    drstd = (dg * g).sum(-1, keepdim=True) / rstd
    dz = _ln_backward(dxhat, xhat, rstd) - rstd * rstd * drstd * xhat / f
    ds = ln_w * dgy
    dlnw = dgy * (2.0 * ln_w * xhat + s)
    return dz, ds, dlnw


def _tril(b: int, device: torch.device) -> Tensor:
    return torch.ones(b, b, dtype=torch.bool, device=device).tril()


def _tril_e(coef: Tensor, lr: Tensor) -> Tensor:
    """``E[..., i, j] = coef_i * lr[..., j]`` for ``j <= i``, else 0: ``lr [..., b]`` -> ``[..., b, b]``."""
    b = coef.shape[0]
    return torch.where(_tril(b, coef.device), coef.view(b, 1) * lr.unsqueeze(-2), coef.new_zeros(()))


# --------------------------------------------------------------------------------------------------
# one mini-batch, forward
# --------------------------------------------------------------------------------------------------

def linear_step(state: tuple[Tensor, ...], k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor,
                ln_w: Tensor | None, complete: Tensor | None, first: bool, e: Tensor
                ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One TTT-Linear mini-batch: ``k, q, s [R, b, F]``, ``lr [R, b]``, ``e = E [R, b, b]``.

    ``complete [R]`` (bool) says which rows close the mini-batch (``None``: all of them); ``first``
    adds the carried accumulators' term to the outputs. ``ln_w is None`` drops the inner LayerNorm
    (then ``s = -target`` and the gradient is ``Z + s``). Returns ``(Zbar [R, b, F], new state)``.
    """
    w, bias, gw, gb = state
    z = torch.baddbmm(bias, k, w)
    g = z + s if ln_w is None else _ln_grad(z, s, ln_w)[0]
    a = e * (torch.bmm(q, k.transpose(1, 2)) + 1.0)
    zbar = torch.baddbmm(torch.baddbmm(bias, q, w), a, g, alpha=-1.0)
    if first:
        zbar = zbar - coef.view(1, -1, 1) * torch.baddbmm(gb, q, gw)
    lg = lr.unsqueeze(-1) * g
    acc_w = torch.baddbmm(gw, k.transpose(1, 2), lg)
    acc_b = gb + lg.sum(1, keepdim=True)
    return zbar, _close(complete, coef[-1], (w, bias), (acc_w, acc_b))


def mlp_step(state: tuple[Tensor, ...], k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor,
             ln_w: Tensor, complete: Tensor | None, first: bool, e: Tensor
             ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One TTT-MLP mini-batch (the dual form applied layer by layer); same contract as linear_step."""
    w1, b1, w2, b2, gw1, gb1, gw2, gb2 = state
    z1 = torch.baddbmm(b1, k, w1)
    x2 = gelu_tanh(z1)
    z2 = torch.baddbmm(b2, x2, w2)
    g2 = _ln_grad(z2, s, ln_w)[0]
    g1 = gelu_tanh_backward(torch.bmm(g2, w2.transpose(1, 2)), z1)
    c = coef.view(1, -1, 1)
    a1 = e * (torch.bmm(q, k.transpose(1, 2)) + 1.0)
    zb1 = torch.baddbmm(torch.baddbmm(b1, q, w1), a1, g1, alpha=-1.0)
    if first:
        zb1 = zb1 - c * torch.baddbmm(gb1, q, gw1)
    xb2 = gelu_tanh(zb1)
    a2 = e * (torch.bmm(xb2, x2.transpose(1, 2)) + 1.0)
    zb2 = torch.baddbmm(torch.baddbmm(b2, xb2, w2), a2, g2, alpha=-1.0)
    if first:
        zb2 = zb2 - c * torch.baddbmm(gb2, xb2, gw2)
    lg1, lg2 = lr.unsqueeze(-1) * g1, lr.unsqueeze(-1) * g2
    accs = (torch.baddbmm(gw1, k.transpose(1, 2), lg1), gb1 + lg1.sum(1, keepdim=True),
            torch.baddbmm(gw2, x2.transpose(1, 2), lg2), gb2 + lg2.sum(1, keepdim=True))
    return zb2, _close(complete, coef[-1], (w1, b1, w2, b2), accs)


def _close(complete: Tensor | None, coef_last: Tensor, weights: tuple[Tensor, ...],
           accs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """End of a mini-batch: complete rows step their weights by ``coef_last * acc`` and reset ``acc``."""
    if complete is None:
        return (tuple(w - coef_last * a for w, a in zip(weights, accs))
                + tuple(torch.zeros_like(a) for a in accs))
    c = complete.view(-1, 1, 1)
    new_w = tuple(torch.where(c, w - coef_last * a, w) for w, a in zip(weights, accs))
    new_a = tuple(torch.where(c, torch.zeros((), dtype=a.dtype, device=a.device), a) for a in accs)
    return new_w + new_a


# --------------------------------------------------------------------------------------------------
# one mini-batch, backward (recomputes the step's forward from its start state)
# --------------------------------------------------------------------------------------------------

def _close_backward(complete: Tensor | None, coef_last: Tensor, accs: tuple[Tensor, ...],
                    d_new: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor]:
    """Backward of :func:`_close`: returns ``(d weights, d accs, d coef_last)``."""
    n = len(accs)
    d_w, d_acc_out = d_new[:n], d_new[n:]
    if complete is None:
        return d_w, tuple(-coef_last * dw for dw in d_w), -sum((a * dw).sum() for a, dw in zip(accs, d_w))
    c = complete.view(-1, 1, 1)
    d_acc = tuple(torch.where(c, -coef_last * dw, da) for dw, da in zip(d_w, d_acc_out))
    d_cl = -sum(torch.where(c, a * dw, torch.zeros((), dtype=a.dtype, device=a.device)).sum()
                for a, dw in zip(accs, d_w))
    return d_w, d_acc, d_cl


def _e_backward(d_e: Tensor, coef: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of :func:`_tril_e`: ``(d coef [b], d lr [R, b])``."""
    d_e = torch.where(_tril(coef.shape[0], coef.device), d_e, d_e.new_zeros(()))
    return (d_e * lr.unsqueeze(1)).sum((0, 2)), (d_e * coef.view(1, -1, 1)).sum(1)


def _dual_output_backward(d_out: Tensor, x: Tensor, keys: Tensor, w: Tensor, g: Tensor, e: Tensor,
                          p: Tensor, gw: Tensor, gb: Tensor, coef: Tensor, first: bool
                          ) -> tuple[Tensor, ...]:
    """Backward of one dual-form output ``out = X W + b - (E * P) G [- coef (X gW + gb)]``.

    ``P = X Keys^T + 1`` (math §5; docs/scan-backward.md steps 3-4). Returns the contributions
    ``(dW, db, dX, dKeys, dG, dgW, dgb, dcoef [b], dE)``; ``dgW, dgb`` are zeros unless ``first``.
    """
    t = lambda y: y.transpose(1, 2)  # noqa: E731
    d_w = torch.bmm(t(x), d_out)
    d_b = d_out.sum(1, keepdim=True)
    dx = torch.bmm(d_out, t(w))
    d_a = -torch.bmm(d_out, t(g))
    dg = -torch.bmm(t(e * p), d_out)
    d_gw, d_gb, d_coef = torch.zeros_like(gw), torch.zeros_like(gb), torch.zeros_like(coef)
    if first:
        cz = coef.view(1, -1, 1) * d_out
        d_gw = -torch.bmm(t(x), cz)
        d_gb = -cz.sum(1, keepdim=True)
        dx = dx - torch.bmm(cz, t(gw))
        d_coef = -(torch.baddbmm(gb, x, gw) * d_out).sum((0, 2))
    d_s = d_a * e
    dx = dx + torch.bmm(d_s, keys)
    d_keys = torch.bmm(t(d_s), x)
    return d_w, d_b, dx, d_keys, dg, d_gw, d_gb, d_coef, d_a * p


def linear_step_backward(state: tuple[Tensor, ...], k: Tensor, q: Tensor, s: Tensor, lr: Tensor,
                         coef: Tensor, ln_w: Tensor | None, complete: Tensor | None, first: bool, e: Tensor,
                         d_zbar: Tensor, d_new: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Gradients of one TTT-Linear mini-batch.

    Returns ``(d state (4 tensors)..., dk, dq, ds, dlr, dcoef [b], dln_w [R, F] or None)``.
    """
    w, bias, gw, gb = state
    z = torch.baddbmm(bias, k, w)
    if ln_w is None:
        g = z + s
    else:
        g, xhat, rstd, gy = _ln_grad(z, s, ln_w)
    qk1 = torch.bmm(q, k.transpose(1, 2)) + 1.0
    lg = lr.unsqueeze(-1) * g
    acc_w = torch.baddbmm(gw, k.transpose(1, 2), lg)
    acc_b = gb + lg.sum(1, keepdim=True)

    (d_w, d_b), (d_accw, d_accb), d_cl = _close_backward(complete, coef[-1], (acc_w, acc_b), d_new)
    d_coef = torch.zeros_like(coef)
    d_coef[-1] = d_cl
    # accumulators: acc = g_in + K^T (lr * G)
    d_gw, d_gb = d_accw, d_accb
    d_lg = torch.baddbmm(d_accb, k, d_accw)
    dk = torch.bmm(lg, d_accw.transpose(1, 2))
    dlr = (g * d_lg).sum(-1)
    dg = lr.unsqueeze(-1) * d_lg
    # output: Zbar = Q W + b - (E * (Q K^T + 1)) G [- c (Q gW + gb)]
    o_w, o_b, dq, o_k, o_g, o_gw, o_gb, o_coef, d_e = _dual_output_backward(
        d_zbar, q, k, w, g, e, qk1, gw, gb, coef, first)
    d_w, d_b, dk, dg = d_w + o_w, d_b + o_b, dk + o_k, dg + o_g
    d_gw, d_gb = d_gw + o_gw, d_gb + o_gb
    dc, dl = _e_backward(d_e, coef, lr)
    d_coef, dlr = d_coef + o_coef + dc, dlr + dl
    # G = grad of the inner loss at Z = K W + b
    if ln_w is None:
        dz, ds, dlnw = dg, dg, None
    else:
        dz, ds, dlnw = _ln_grad_backward(dg, g, gy, xhat, rstd, s, ln_w)
        dlnw = dlnw.sum(1)
    dk = dk + torch.bmm(dz, w.transpose(1, 2))
    d_w = d_w + torch.bmm(k.transpose(1, 2), dz)
    d_b = d_b + dz.sum(1, keepdim=True)
    return d_w, d_b, d_gw, d_gb, dk, dq, ds, dlr, d_coef, dlnw


def _gelu_tanh_grad2(x: Tensor) -> Tensor:
    """Second derivative of :func:`gelu_tanh`."""
    t = torch.tanh(GELU_C * (x + 0.044715 * x * x * x))
    du = GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return (1.0 - t * t) * (du + 3 * 0.044715 * GELU_C * x * x - x * t * du * du)


def mlp_step_backward(state: tuple[Tensor, ...], k: Tensor, q: Tensor, s: Tensor, lr: Tensor,
                      coef: Tensor, ln_w: Tensor, complete: Tensor | None, first: bool, e: Tensor,
                      d_zbar: Tensor, d_new: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Gradients of one TTT-MLP mini-batch.

    Returns ``(d state (8 tensors)..., dk, dq, ds, dlr, dcoef [b], dln_w [R, F])``.
    """
    w1, b1, w2, b2, gw1, gb1, gw2, gb2 = state
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    z1 = torch.baddbmm(b1, k, w1)
    x2 = gelu_tanh(z1)
    z2 = torch.baddbmm(b2, x2, w2)
    g2, xhat, rstd, gy = _ln_grad(z2, s, ln_w)
    p = torch.bmm(g2, t(w2))
    dgelu1 = gelu_tanh_grad(z1)
    g1 = p * dgelu1
    c = coef.view(1, -1, 1)
    qk1 = torch.bmm(q, t(k)) + 1.0
    zb1 = torch.baddbmm(torch.baddbmm(b1, q, w1), e * qk1, g1, alpha=-1.0)
    if first:
        zb1 = zb1 - c * torch.baddbmm(gb1, q, gw1)
    xb2 = gelu_tanh(zb1)
    xx1 = torch.bmm(xb2, t(x2)) + 1.0
    lr_c = lr.unsqueeze(-1)
    lg1, lg2 = lr_c * g1, lr_c * g2
    accs = (torch.baddbmm(gw1, t(k), lg1), gb1 + lg1.sum(1, keepdim=True),
            torch.baddbmm(gw2, t(x2), lg2), gb2 + lg2.sum(1, keepdim=True))

    (d_w1, d_b1, d_w2, d_b2), d_acc, d_cl = _close_backward(complete, coef[-1], accs, d_new)
    d_gw1, d_gb1, d_gw2, d_gb2 = d_acc
    d_coef = torch.zeros_like(coef)
    d_coef[-1] = d_cl
    # accumulators
    d_lg1 = torch.baddbmm(d_gb1, k, d_gw1)
    d_lg2 = torch.baddbmm(d_gb2, x2, d_gw2)
    dk = torch.bmm(lg1, t(d_gw1))
    dx2 = torch.bmm(lg2, t(d_gw2))
    dlr = (g1 * d_lg1).sum(-1) + (g2 * d_lg2).sum(-1)
    dg1, dg2 = lr_c * d_lg1, lr_c * d_lg2
    # second layer output: Zbar2 = Xbar2 W2 + b2 - (E * (Xbar2 X2^T + 1)) G2 [- c (Xbar2 gW2 + gb2)]
    o_w, o_b, dxb2, o_x2, o_g, o_gw, o_gb, o_coef, d_e2 = _dual_output_backward(
        d_zbar, xb2, x2, w2, g2, e, xx1, gw2, gb2, coef, first)
    d_w2, d_b2, dx2, dg2 = d_w2 + o_w, d_b2 + o_b, dx2 + o_x2, dg2 + o_g
    d_gw2, d_gb2, d_coef = d_gw2 + o_gw, d_gb2 + o_gb, d_coef + o_coef
    # first layer output: Zbar1 = Q W1 + b1 - (E * (Q K^T + 1)) G1 [- c (Q gW1 + gb1)]
    dzb1 = gelu_tanh_backward(dxb2, zb1)
    o_w, o_b, dq, o_k, o_g, o_gw, o_gb, o_coef, d_e1 = _dual_output_backward(
        dzb1, q, k, w1, g1, e, qk1, gw1, gb1, coef, first)
    d_w1, d_b1, dk, dg1 = d_w1 + o_w, d_b1 + o_b, dk + o_k, dg1 + o_g
    d_gw1, d_gb1, d_coef = d_gw1 + o_gw, d_gb1 + o_gb, d_coef + o_coef
    d_e = d_e1 + d_e2
    dc, dl = _e_backward(d_e, coef, lr)
    d_coef, dlr = d_coef + dc, dlr + dl
    # G1 = (G2 W2^T) * gelu'(Z1)
    dp = dg1 * dgelu1
    dz1 = dg1 * p * _gelu_tanh_grad2(z1)
    dg2 = dg2 + torch.bmm(dp, w2)
    d_w2 = d_w2 + torch.bmm(t(dp), g2)
    # G2 = grad of the inner loss at Z2 = X2 W2 + b2
    dz2, ds, dlnw = _ln_grad_backward(dg2, g2, gy, xhat, rstd, s, ln_w)
    dx2 = dx2 + torch.bmm(dz2, t(w2))
    d_w2 = d_w2 + torch.bmm(t(x2), dz2)
    d_b2 = d_b2 + dz2.sum(1, keepdim=True)
    dz1 = dz1 + dx2 * dgelu1
    dk = dk + torch.bmm(dz1, t(w1))
    d_w1 = d_w1 + torch.bmm(t(k), dz1)
    d_b1 = d_b1 + dz1.sum(1, keepdim=True)
    return (d_w1, d_b1, d_w2, d_b2, d_gw1, d_gb1, d_gw2, d_gb2, dk, dq, ds, dlr, d_coef, dlnw.sum(1))


# --------------------------------------------------------------------------------------------------
# the whole scan
# --------------------------------------------------------------------------------------------------

def _complete(n_complete: Tensor, n: int) -> list[Tensor | None]:
    """Per mini-batch: which rows close it (``None`` when all do, the common case)."""
    lo = int(n_complete.min()) if n_complete.numel() else n
    return [None if m < lo else n_complete > m for m in range(n)]


def _steps(n_state: int):
    return (mlp_step, mlp_step_backward) if n_state == 8 else (linear_step, linear_step_backward)


def scan_forward(k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                 n_complete: Tensor, state: tuple[Tensor, ...], group: int, save: bool
                 ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Run every mini-batch; returns ``(Zbar [R, N, b, F], final state, checkpoints)``.

    With ``save`` the checkpoints are the states at the start of every ``group``-th mini-batch,
    stacked as ``[R, n_groups, ...]`` per state tensor (what :func:`scan_backward` restarts from).
    """
    step, _ = _steps(len(state))
    lnw = None if ln_w is None else ln_w.unsqueeze(1)
    e, complete = _tril_e(coef, lr), _complete(n_complete, k.shape[1])
    zbars, ckpts = [], []
    for m in range(k.shape[1]):
        if save and m % group == 0:
            ckpts.append(state)
        z, state = step(state, k[:, m], q[:, m], s[:, m], lr[:, m], coef, lnw, complete[m], m == 0, e[:, m])
        zbars.append(z)
    saved = tuple(torch.stack(c, 1) for c in zip(*ckpts)) if save else ()
    return torch.stack(zbars, 1), state, saved


def scan_backward(k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                  n_complete: Tensor, saved: tuple[Tensor, ...], group: int, d_zbar: Tensor,
                  d_final: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Reverse scan: returns ``(dk, dq, ds, dlr, dcoef, dln_w, *d_initial_state)``.

    Each group of mini-batches is recomputed forward from its checkpoint (keeping its ``group`` start
    states), then walked backwards, carrying the gradient of the state from the end to the start.
    """
    step, step_bw = _steps(len(d_final))
    n = k.shape[1]
    lnw = None if ln_w is None else ln_w.unsqueeze(1)
    e, complete = _tril_e(coef, lr), _complete(n_complete, n)
    dk, dq, ds = torch.empty_like(k), torch.empty_like(q), torch.empty_like(s)
    dlr = torch.empty_like(lr)
    dcoef = torch.zeros_like(coef)
    dlnw = None if ln_w is None else torch.zeros_like(ln_w)
    d_state = d_final
    for gi in reversed(range(saved[0].shape[1])):
        m0, m1 = gi * group, min(gi * group + group, n)
        st = tuple(c[:, gi] for c in saved)
        starts = [st]
        for m in range(m0, m1 - 1):
            _, st = step(st, k[:, m], q[:, m], s[:, m], lr[:, m], coef, lnw, complete[m], m == 0, e[:, m])
            starts.append(st)
        for m in reversed(range(m0, m1)):
            res = step_bw(starts[m - m0], k[:, m], q[:, m], s[:, m], lr[:, m], coef, lnw, complete[m],
                          m == 0, e[:, m], d_zbar[:, m], d_state)
            ns = len(d_state)
            d_state = res[:ns]
            dk[:, m], dq[:, m], ds[:, m], dlr[:, m] = res[ns:ns + 4]
            dcoef += res[ns + 4]
            if dlnw is not None:
                dlnw += res[ns + 5]
    return (dk, dq, ds, dlr, dcoef, dlnw, *d_state)
