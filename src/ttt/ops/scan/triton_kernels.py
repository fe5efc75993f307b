"""Triton kernels of the TTT scan (forward, reverse-scan backward) and of the one-token decode step.

Loaded by :mod:`ttt.ops.scan.triton_scan` (twice at most: once compiled for the GPU, once under the
Triton interpreter for CPU tests), never imported directly. Every kernel runs one program per
``batch*heads`` row and computes exactly the per-mini-batch formulas of
:mod:`ttt.ops.scan.torch_scan` (``linear_step``, ``mlp_step`` and their backward); the design is in
``docs/triton.md``.

Conventions: the state of a row is one packed fp32 vector (TTT-Linear ``W | b | gW | gb``, TTT-MLP
``W1 | b1 | W2 | b2 | gW1 | gb1 | gW2 | gb2``, each row-major). Mini-batches of ``B`` tokens are
padded to ``BB = max(B, 16)`` rows (``tl.dot`` needs 16); padded rows load zeros (zero learning rate
and coefficient) and so touch nothing. ``PREC`` is the ``tl.dot`` input precision (``ieee`` or
``tf32``).
"""

from __future__ import annotations

import triton
import triton.language as tl

# --------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------

@triton.jit
def _sum(x, axis: tl.constexpr):
    """``tl.sum`` of fp32 (spelled as a reduce so that the interpreter runs it even when Triton was
    imported without ``TRITON_INTERPRET=1``: ``tl.sum`` itself is then a compiled-only function)."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tanh(u):
    """tanh from exp (no tanh in tl); exact to fp32 rounding. ``u`` is capped at 20 before ``exp``, where
    tanh is already 1 in fp32 and fp64 (1 - 8.5e-18), so ``exp`` never overflows (inf would give the same
    1.0 on a GPU, but the interpreter warns about it)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * tl.minimum(u, 20.0)) + 1.0)


# 0.7978845608028654 = sqrt(2 / pi), the tanh-GELU constant (a literal: the interpreter rejects a
# tl.constexpr global here and the compiler rejects a plain one)
@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


@triton.jit
def _gelu_grad(x):
    t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3 * 0.044715 * x * x)


@triton.jit
def _gelu_grad2(x):
    t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
    du = 0.7978845608028654 * (1.0 + 3 * 0.044715 * x * x)
    return (1.0 - t * t) * (du + 3 * 0.044715 * 0.7978845608028654 * x * x - x * t * du * du)


@triton.jit
def _ln_grad(z, s, lnw, F: tl.constexpr, EPS: tl.constexpr):
    """Rows of ``z [BB, F]``: ``(xhat, rstd, gy, G)`` of the inner loss (torch_scan._ln_grad)."""
    mu = _sum(z, 1) / F
    zc = z - mu[:, None]
    rstd = 1.0 / tl.sqrt(_sum(zc * zc, 1) / F + EPS)
    xhat = zc * rstd[:, None]
    gy = lnw[None, :] * (lnw[None, :] * xhat + s)
    g = rstd[:, None] * (gy - (_sum(gy, 1) / F)[:, None] - xhat * (_sum(gy * xhat, 1) / F)[:, None])
    return xhat, rstd, gy, g


@triton.jit
def _ln_grad_backward(dg, g, gy, xhat, rstd, s, lnw, F: tl.constexpr):
    """Backward of :func:`_ln_grad` given ``dG``: ``(dZ, dS, d ln_w summed over rows)``."""
    r = rstd[:, None]
    dgy = r * (dg - (_sum(dg, 1) / F)[:, None] - xhat * (_sum(dg * xhat, 1) / F)[:, None])
    s2 = _sum(gy * xhat, 1) / F
    m_dx = _sum(dg * xhat, 1) / F
    dxhat = -r * (dg * s2[:, None] + gy * m_dx[:, None]) + (lnw * lnw)[None, :] * dgy
    drstd = _sum(dg * g, 1) / rstd
    dz = r * (dxhat - (_sum(dxhat, 1) / F)[:, None] - xhat * (_sum(dxhat * xhat, 1) / F)[:, None])
    dz = dz - (rstd * rstd * drstd / F)[:, None] * xhat
    ds = lnw[None, :] * dgy
    dlnw = _sum(dgy * (2.0 * lnw[None, :] * xhat + s), 0)
    return dz, ds, dlnw


@triton.jit
def _load_rows(ptr, ib, fo, rmask, F: tl.constexpr):
    """``[BB, F]`` block of a ``[.., B, F]`` tensor (rows past ``B`` are 0), as fp32."""
    return tl.load(ptr + ib[:, None] * F + fo[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, x, ib, fo, rmask, F: tl.constexpr):
    tl.store(ptr + ib[:, None] * F + fo[None, :], x.to(ptr.dtype.element_ty), mask=rmask[:, None])


@triton.jit
def _off(r0, c0, ROWS: tl.constexpr, COLS: tl.constexpr, LD: tl.constexpr):
    """Offsets of the ``[ROWS, COLS]`` block at ``(r0, c0)`` of a row-major matrix with ``LD`` columns."""
    return (r0 + tl.arange(0, ROWS))[:, None] * LD + (c0 + tl.arange(0, COLS))[None, :]


@triton.jit
def _mat(ptr, r0, c0, ROWS: tl.constexpr, COLS: tl.constexpr, LD: tl.constexpr):
    """Pointers of the ``[ROWS, COLS]`` block at ``(r0, c0)`` of a row-major matrix with ``LD`` columns."""
    return ptr + _off(r0, c0, ROWS, COLS, LD)


# --------------------------------------------------------------------------------------------------
# TTT-Linear: the state (W, b, gW, gb) stays in registers for the whole scan
# --------------------------------------------------------------------------------------------------

@triton.jit
def _linear_fwd_step(w, bv, gw, gb, kk, qq, ss, lr, coef, e, lnw, c_last, complete, first,
                     F: tl.constexpr, HAS_LN: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr):
    """torch_scan.linear_step on register tiles; returns ``(Zbar, W, b, gW, gb)``."""
    z = _dot(kk, w, PREC) + bv[None, :]
    if HAS_LN:
        _, _, _, g = _ln_grad(z, ss, lnw, F, EPS)
    else:
        g = z + ss
    a = e * (_dot(qq, tl.trans(kk), PREC) + 1.0)
    zbar = _dot(qq, w, PREC) + bv[None, :] - _dot(a, g, PREC)
    if first:
        zbar = zbar - coef[:, None] * (_dot(qq, gw, PREC) + gb[None, :])
    lg = lr[:, None] * g
    acc_w = gw + _dot(tl.trans(kk), lg, PREC)
    acc_b = gb + _sum(lg, 0)
    w = tl.where(complete, w - c_last * acc_w, w)
    bv = tl.where(complete, bv - c_last * acc_b, bv)
    gw = tl.where(complete, 0.0, acc_w)
    gb = tl.where(complete, 0.0, acc_b)
    return zbar, w, bv, gw, gb


@triton.jit
def linear_fwd_kernel(k_ptr, q_ptr, s_ptr, lr_ptr, coef_ptr, lnw_ptr, nc_ptr, st_ptr, zbar_ptr, out_ptr,
                      ck_ptr, N, group, NG,
                      B: tl.constexpr, BB: tl.constexpr, F: tl.constexpr, HAS_LN: tl.constexpr,
                      SAVE: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr):
    """One program per row: scan all ``N`` mini-batches; writes Zbar, the final state, checkpoints."""
    r = tl.program_id(0).to(tl.int64)
    SZ: tl.constexpr = 2 * (F * F + F)
    ib = tl.arange(0, BB)
    fo = tl.arange(0, F)
    rmask = ib < B
    st = st_ptr + r * SZ
    w = tl.load(_mat(st, 0, 0, F, F, F))
    bv = tl.load(st + F * F + fo)
    gw = tl.load(_mat(st + F * F + F, 0, 0, F, F, F))
    gb = tl.load(st + 2 * F * F + F + fo)
    coef = tl.load(coef_ptr + ib, mask=rmask, other=0.0).to(tl.float32)
    c_last = tl.load(coef_ptr + B - 1).to(tl.float32)
    if HAS_LN:
        lnw = tl.load(lnw_ptr + r * F + fo).to(tl.float32)
    else:
        lnw = tl.full([F], 0.0, tl.float32)
    tril = ib[:, None] >= ib[None, :]
    nc = tl.load(nc_ptr + r)
    for m in range(N):
        if SAVE:
            if m % group == 0:
                ck = ck_ptr + (r * NG + m // group) * SZ
                tl.store(_mat(ck, 0, 0, F, F, F), w)
                tl.store(ck + F * F + fo, bv)
                tl.store(_mat(ck + F * F + F, 0, 0, F, F, F), gw)
                tl.store(ck + 2 * F * F + F + fo, gb)
        base = (r * N + m) * B * F
        kk = _load_rows(k_ptr + base, ib, fo, rmask, F)
        qq = _load_rows(q_ptr + base, ib, fo, rmask, F)
        ss = _load_rows(s_ptr + base, ib, fo, rmask, F)
        lr = tl.load(lr_ptr + (r * N + m) * B + ib, mask=rmask, other=0.0).to(tl.float32)
        e = tl.where(tril, coef[:, None] * lr[None, :], 0.0)
        zbar, w, bv, gw, gb = _linear_fwd_step(w, bv, gw, gb, kk, qq, ss, lr, coef, e, lnw, c_last,
                                               m < nc, m == 0, F, HAS_LN, PREC, EPS)
        _store_rows(zbar_ptr + base, zbar, ib, fo, rmask, F)
    out = out_ptr + r * SZ
    tl.store(_mat(out, 0, 0, F, F, F), w)
    tl.store(out + F * F + fo, bv)
    tl.store(_mat(out + F * F + F, 0, 0, F, F, F), gw)
    tl.store(out + 2 * F * F + F + fo, gb)


@triton.jit
def linear_bwd_kernel(k_ptr, q_ptr, s_ptr, lr_ptr, coef_ptr, lnw_ptr, nc_ptr, ck_ptr, dzbar_ptr, dst_ptr,
                      scr_ptr, dk_ptr, dq_ptr, ds_ptr, dlr_ptr, dcoef_ptr, dlnw_ptr, N, group, NG,
                      B: tl.constexpr, BB: tl.constexpr, F: tl.constexpr, HAS_LN: tl.constexpr,
                      PREC: tl.constexpr, EPS: tl.constexpr):
    """Reverse scan of one row (torch_scan.scan_backward with linear_step_backward).

    ``dst`` holds the gradient of the final state on entry and that of the initial state on exit;
    each group is recomputed from its checkpoint into ``scr`` (``group`` start states of this row).
    ``dcoef [R, BB]`` and ``dlnw [R, F]`` are per-row partial sums.
    """
    r = tl.program_id(0).to(tl.int64)
    SZ: tl.constexpr = 2 * (F * F + F)
    ib = tl.arange(0, BB)
    fo = tl.arange(0, F)
    rmask = ib < B
    coef = tl.load(coef_ptr + ib, mask=rmask, other=0.0).to(tl.float32)
    c_last = tl.load(coef_ptr + B - 1).to(tl.float32)
    if HAS_LN:
        lnw = tl.load(lnw_ptr + r * F + fo).to(tl.float32)
    else:
        lnw = tl.full([F], 0.0, tl.float32)
    tril = ib[:, None] >= ib[None, :]
    nc = tl.load(nc_ptr + r)
    dst = dst_ptr + r * SZ
    d_w = tl.load(_mat(dst, 0, 0, F, F, F))
    d_b = tl.load(dst + F * F + fo)
    d_gw = tl.load(_mat(dst + F * F + F, 0, 0, F, F, F))
    d_gb = tl.load(dst + 2 * F * F + F + fo)
    dcoef = tl.full([BB], 0.0, tl.float32)
    dlnw = tl.full([F], 0.0, tl.float32)
    scr = scr_ptr + r * group * SZ
    for gg in range(NG):
        gi = NG - 1 - gg
        m0 = gi * group
        m1 = tl.minimum(m0 + group, N)
        ck = ck_ptr + (r * NG + gi) * SZ
        w = tl.load(_mat(ck, 0, 0, F, F, F))
        bv = tl.load(ck + F * F + fo)
        gw = tl.load(_mat(ck + F * F + F, 0, 0, F, F, F))
        gb = tl.load(ck + 2 * F * F + F + fo)
        tl.debug_barrier()  # the previous group's reads of scr are done
        for m in range(m0, m1):
            sl = scr + (m - m0) * SZ
            tl.store(_mat(sl, 0, 0, F, F, F), w)
            tl.store(sl + F * F + fo, bv)
            tl.store(_mat(sl + F * F + F, 0, 0, F, F, F), gw)
            tl.store(sl + 2 * F * F + F + fo, gb)
            if m + 1 < m1:
                base = (r * N + m) * B * F
                kk = _load_rows(k_ptr + base, ib, fo, rmask, F)
                qq = _load_rows(q_ptr + base, ib, fo, rmask, F)
                ss = _load_rows(s_ptr + base, ib, fo, rmask, F)
                lr = tl.load(lr_ptr + (r * N + m) * B + ib, mask=rmask, other=0.0).to(tl.float32)
                e = tl.where(tril, coef[:, None] * lr[None, :], 0.0)
                _, w, bv, gw, gb = _linear_fwd_step(w, bv, gw, gb, kk, qq, ss, lr, coef, e, lnw, c_last,
                                                    m < nc, m == 0, F, HAS_LN, PREC, EPS)
        tl.debug_barrier()  # scr is written
        for mm in range(m0, m1):
            m = m1 - 1 - (mm - m0)
            sl = scr + (m - m0) * SZ
            w = tl.load(_mat(sl, 0, 0, F, F, F))
            bv = tl.load(sl + F * F + fo)
            gw = tl.load(_mat(sl + F * F + F, 0, 0, F, F, F))
            gb = tl.load(sl + 2 * F * F + F + fo)
            base = (r * N + m) * B * F
            kk = _load_rows(k_ptr + base, ib, fo, rmask, F)
            qq = _load_rows(q_ptr + base, ib, fo, rmask, F)
            ss = _load_rows(s_ptr + base, ib, fo, rmask, F)
            dz_out = _load_rows(dzbar_ptr + base, ib, fo, rmask, F)
            lr = tl.load(lr_ptr + (r * N + m) * B + ib, mask=rmask, other=0.0).to(tl.float32)
            e = tl.where(tril, coef[:, None] * lr[None, :], 0.0)
            complete = m < nc
            # recompute the step
            z = _dot(kk, w, PREC) + bv[None, :]
            if HAS_LN:
                xhat, rstd, gy, g = _ln_grad(z, ss, lnw, F, EPS)
            else:
                g = z + ss
            qk1 = _dot(qq, tl.trans(kk), PREC) + 1.0
            a = e * qk1
            lg = lr[:, None] * g
            acc_w = gw + _dot(tl.trans(kk), lg, PREC)
            acc_b = gb + _sum(lg, 0)
            # close: W' = W - c_last * acc (complete rows), acc' = 0 / acc
            d_cl = _sum(_sum(acc_w * d_w, 1), 0) + _sum(acc_b * d_b, 0)
            d_cl = tl.where(complete, -d_cl, 0.0)
            d_gw = tl.where(complete, -c_last * d_w, d_gw)
            d_gb = tl.where(complete, -c_last * d_b, d_gb)
            # accumulators: acc = g_in + K^T (lr * G)
            d_lg = _dot(kk, d_gw, PREC) + d_gb[None, :]
            dk = _dot(lg, tl.trans(d_gw), PREC)
            dlr = _sum(g * d_lg, 1)
            dg = lr[:, None] * d_lg
            # output: Zbar = Q W + b - A G [- c (Q gW + gb)]
            d_w = d_w + _dot(tl.trans(qq), dz_out, PREC)
            d_b = d_b + _sum(dz_out, 0)
            dq = _dot(dz_out, tl.trans(w), PREC)
            d_a = -_dot(dz_out, tl.trans(g), PREC)
            dg = dg - _dot(tl.trans(a), dz_out, PREC)
            if m == 0:
                cz = coef[:, None] * dz_out
                d_gw = d_gw - _dot(tl.trans(qq), cz, PREC)
                d_gb = d_gb - _sum(cz, 0)
                dq = dq - _dot(cz, tl.trans(gw), PREC)
                dcoef = dcoef - _sum((_dot(qq, gw, PREC) + gb[None, :]) * dz_out, 1)
            # A = E * (Q K^T + 1)
            d_sqk = d_a * e
            dq = dq + _dot(d_sqk, kk, PREC)
            dk = dk + _dot(tl.trans(d_sqk), qq, PREC)
            d_e = tl.where(tril, d_a * qk1, 0.0)
            dcoef = dcoef + _sum(d_e * lr[None, :], 1) + tl.where(ib == B - 1, d_cl, 0.0)
            dlr = dlr + _sum(d_e * coef[:, None], 0)
            # G = grad of the inner loss at Z = K W + b
            if HAS_LN:
                dz, ds, dl = _ln_grad_backward(dg, g, gy, xhat, rstd, ss, lnw, F)
                dlnw = dlnw + dl
            else:
                dz = dg
                ds = dg
            dk = dk + _dot(dz, tl.trans(w), PREC)
            d_w = d_w + _dot(tl.trans(kk), dz, PREC)
            d_b = d_b + _sum(dz, 0)
            _store_rows(dk_ptr + base, dk, ib, fo, rmask, F)
            _store_rows(dq_ptr + base, dq, ib, fo, rmask, F)
            _store_rows(ds_ptr + base, ds, ib, fo, rmask, F)
            tl.store(dlr_ptr + (r * N + m) * B + ib, dlr.to(dlr_ptr.dtype.element_ty), mask=rmask)
    tl.store(_mat(dst, 0, 0, F, F, F), d_w)
    tl.store(dst + F * F + fo, d_b)
    tl.store(_mat(dst + F * F + F, 0, 0, F, F, F), d_gw)
    tl.store(dst + 2 * F * F + F + fo, d_gb)
    tl.store(dcoef_ptr + r * BB + ib, dcoef)
    tl.store(dlnw_ptr + r * F + fo, dlnw)


# --------------------------------------------------------------------------------------------------
# TTT-MLP: the state (W1 [F, F1], W2 [F1, F], ...) is too large for registers at F1 = 4F; it lives in
# this program's slice of global memory (L2-resident) and every mini-batch streams over hidden tiles
# of BH columns of W1 / rows of W2, keeping only [BB, F] and [BB, BB] activations on chip.
# --------------------------------------------------------------------------------------------------

@triton.jit
def _copy(src, dst, SZ: tl.constexpr):
    CH: tl.constexpr = 1024
    for o in range(0, SZ, CH):
        idx = o + tl.arange(0, CH)
        tl.store(dst + idx, tl.load(src + idx, mask=idx < SZ), mask=idx < SZ)


@triton.jit
def _mlp_fwd_step(src, dst, kk, qq, ss, lr, coef, e, a1, lnw, c_last, complete, first,
                  BB: tl.constexpr, F: tl.constexpr, F1: tl.constexpr, BH: tl.constexpr,
                  PREC: tl.constexpr, EPS: tl.constexpr):
    """torch_scan.mlp_step reading the state at ``src`` and writing the new one at ``dst`` (may alias)."""
    O_B1: tl.constexpr = F * F1
    O_W2: tl.constexpr = F * F1 + F1
    O_B2: tl.constexpr = 2 * F * F1 + F1
    HALF: tl.constexpr = 2 * F * F1 + F1 + F
    NT: tl.constexpr = F1 // BH
    fo = tl.arange(0, F)
    ho = tl.arange(0, BH)
    b2 = tl.load(src + O_B2 + fo)
    gb2 = tl.load(src + HALF + O_B2 + fo)
    z2 = tl.full([BB, F], 0.0, tl.float32) + b2[None, :]
    for t in range(NT):
        w1 = tl.load(_mat(src, 0, t * BH, F, BH, F1))
        b1 = tl.load(src + O_B1 + t * BH + ho)
        w2 = tl.load(_mat(src + O_W2, t * BH, 0, BH, F, F))
        z2 += _dot(_gelu(_dot(kk, w1, PREC) + b1[None, :]), w2, PREC)
    _, _, _, g2 = _ln_grad(z2, ss, lnw, F, EPS)
    lg2 = lr[:, None] * g2
    zb2 = tl.full([BB, F], 0.0, tl.float32) + b2[None, :]
    xx = tl.full([BB, BB], 0.0, tl.float32)
    for t in range(NT):
        o_w1 = _off(0, t * BH, F, BH, F1)
        o_b1 = O_B1 + t * BH + ho
        o_w2 = O_W2 + _off(t * BH, 0, BH, F, F)
        w1 = tl.load(src + o_w1)
        b1 = tl.load(src + o_b1)
        w2 = tl.load(src + o_w2)
        gw1 = tl.load(src + HALF + o_w1)
        gb1 = tl.load(src + HALF + o_b1)
        gw2 = tl.load(src + HALF + o_w2)
        z1 = _dot(kk, w1, PREC) + b1[None, :]
        x2 = _gelu(z1)
        g1 = _dot(g2, tl.trans(w2), PREC) * _gelu_grad(z1)
        zb1 = _dot(qq, w1, PREC) + b1[None, :] - _dot(a1, g1, PREC)
        if first:
            zb1 = zb1 - coef[:, None] * (_dot(qq, gw1, PREC) + gb1[None, :])
        xb2 = _gelu(zb1)
        zb2 += _dot(xb2, w2, PREC)
        if first:
            zb2 -= coef[:, None] * _dot(xb2, gw2, PREC)
        xx += _dot(xb2, tl.trans(x2), PREC)
        lg1 = lr[:, None] * g1
        acc_w1 = gw1 + _dot(tl.trans(kk), lg1, PREC)
        acc_b1 = gb1 + _sum(lg1, 0)
        acc_w2 = gw2 + _dot(tl.trans(x2), lg2, PREC)
        tl.debug_barrier()
        d_w1 = dst + o_w1
        d_b1 = dst + o_b1
        d_w2 = dst + o_w2
        tl.store(d_w1, tl.where(complete, w1 - c_last * acc_w1, w1))
        tl.store(d_b1, tl.where(complete, b1 - c_last * acc_b1, b1))
        tl.store(d_w2, tl.where(complete, w2 - c_last * acc_w2, w2))
        tl.store(d_w1 + HALF, tl.where(complete, 0.0, acc_w1))
        tl.store(d_b1 + HALF, tl.where(complete, 0.0, acc_b1))
        tl.store(d_w2 + HALF, tl.where(complete, 0.0, acc_w2))
    zb2 -= _dot(e * (xx + 1.0), g2, PREC)
    if first:
        zb2 -= coef[:, None] * gb2[None, :]
    acc_b2 = gb2 + _sum(lg2, 0)
    tl.store(dst + O_B2 + fo, tl.where(complete, b2 - c_last * acc_b2, b2))
    tl.store(dst + HALF + O_B2 + fo, tl.where(complete, 0.0, acc_b2))
    tl.debug_barrier()
    return zb2


@triton.jit
def mlp_fwd_kernel(k_ptr, q_ptr, s_ptr, lr_ptr, coef_ptr, lnw_ptr, nc_ptr, st_ptr, zbar_ptr, out_ptr,
                   ck_ptr, N, group, NG,
                   B: tl.constexpr, BB: tl.constexpr, F: tl.constexpr, F1: tl.constexpr, BH: tl.constexpr,
                   SAVE: tl.constexpr, PREC: tl.constexpr, EPS: tl.constexpr):
    """One program per row; ``out`` holds the initial state on entry and is updated in place."""
    r = tl.program_id(0).to(tl.int64)
    SZ: tl.constexpr = 2 * (2 * F * F1 + F1 + F)
    ib = tl.arange(0, BB)
    fo = tl.arange(0, F)
    rmask = ib < B
    out = out_ptr + r * SZ
    coef = tl.load(coef_ptr + ib, mask=rmask, other=0.0).to(tl.float32)
    c_last = tl.load(coef_ptr + B - 1).to(tl.float32)
    lnw = tl.load(lnw_ptr + r * F + fo).to(tl.float32)
    tril = ib[:, None] >= ib[None, :]
    nc = tl.load(nc_ptr + r)
    for m in range(N):
        if SAVE:
            if m % group == 0:
                _copy(out, ck_ptr + (r * NG + m // group) * SZ, SZ)
        base = (r * N + m) * B * F
        kk = _load_rows(k_ptr + base, ib, fo, rmask, F)
        qq = _load_rows(q_ptr + base, ib, fo, rmask, F)
        ss = _load_rows(s_ptr + base, ib, fo, rmask, F)
        lr = tl.load(lr_ptr + (r * N + m) * B + ib, mask=rmask, other=0.0).to(tl.float32)
        e = tl.where(tril, coef[:, None] * lr[None, :], 0.0)
        a1 = e * (_dot(qq, tl.trans(kk), PREC) + 1.0)
        zb2 = _mlp_fwd_step(out, out, kk, qq, ss, lr, coef, e, a1, lnw, c_last, m < nc, m == 0,
                            BB, F, F1, BH, PREC, EPS)
        _store_rows(zbar_ptr + base, zb2, ib, fo, rmask, F)


@triton.jit
def mlp_bwd_kernel(k_ptr, q_ptr, s_ptr, lr_ptr, coef_ptr, lnw_ptr, nc_ptr, ck_ptr, dzbar_ptr, dst_ptr,
                   scr_ptr, tmp_ptr, dk_ptr, dq_ptr, ds_ptr, dlr_ptr, dcoef_ptr, dlnw_ptr, N, group, NG,
                   B: tl.constexpr, BB: tl.constexpr, F: tl.constexpr, F1: tl.constexpr, BH: tl.constexpr,
                   PREC: tl.constexpr, EPS: tl.constexpr):
    """Reverse scan of one row (torch_scan.scan_backward with mlp_step_backward), hidden-tiled.

    Per mini-batch: pass A recomputes Z2; pass B walks the hidden tiles once for everything that needs
    only G2 (and keeps ``dZ1`` minus its dZ2 part in ``tmp [R, BB, F1]``); after the LayerNorm backward,
    pass C adds the terms that need dZ2. The state gradient ``dst`` is updated in place.
    """
    r = tl.program_id(0).to(tl.int64)
    O_B1: tl.constexpr = F * F1
    O_W2: tl.constexpr = F * F1 + F1
    O_B2: tl.constexpr = 2 * F * F1 + F1
    HALF: tl.constexpr = 2 * F * F1 + F1 + F
    SZ: tl.constexpr = 2 * HALF
    NT: tl.constexpr = F1 // BH
    ib = tl.arange(0, BB)
    fo = tl.arange(0, F)
    ho = tl.arange(0, BH)
    rmask = ib < B
    coef = tl.load(coef_ptr + ib, mask=rmask, other=0.0).to(tl.float32)
    c_last = tl.load(coef_ptr + B - 1).to(tl.float32)
    lnw = tl.load(lnw_ptr + r * F + fo).to(tl.float32)
    tril = ib[:, None] >= ib[None, :]
    nc = tl.load(nc_ptr + r)
    dst = dst_ptr + r * SZ
    tmp = tmp_ptr + r * BB * F1
    dcoef = tl.full([BB], 0.0, tl.float32)
    dlnw = tl.full([F], 0.0, tl.float32)
    scr = scr_ptr + r * group * SZ
    for gg in range(NG):
        gi = NG - 1 - gg
        m0 = gi * group
        m1 = tl.minimum(m0 + group, N)
        tl.debug_barrier()
        _copy(ck_ptr + (r * NG + gi) * SZ, scr, SZ)
        tl.debug_barrier()
        for m in range(m0, m1 - 1):
            base = (r * N + m) * B * F
            kk = _load_rows(k_ptr + base, ib, fo, rmask, F)
            qq = _load_rows(q_ptr + base, ib, fo, rmask, F)
            ss = _load_rows(s_ptr + base, ib, fo, rmask, F)
            lr = tl.load(lr_ptr + (r * N + m) * B + ib, mask=rmask, other=0.0).to(tl.float32)
            e = tl.where(tril, coef[:, None] * lr[None, :], 0.0)
            a1 = e * (_dot(qq, tl.trans(kk), PREC) + 1.0)
            sl = scr + (m - m0) * SZ
            _mlp_fwd_step(sl, sl + SZ, kk, qq, ss, lr, coef, e, a1, lnw, c_last, m < nc, m == 0,
                          BB, F, F1, BH, PREC, EPS)
        for mm in range(m0, m1):
            m = m1 - 1 - (mm - m0)
            st = scr + (m - m0) * SZ
            base = (r * N + m) * B * F
            kk = _load_rows(k_ptr + base, ib, fo, rmask, F)
            qq = _load_rows(q_ptr + base, ib, fo, rmask, F)
            ss = _load_rows(s_ptr + base, ib, fo, rmask, F)
            dz_out = _load_rows(dzbar_ptr + base, ib, fo, rmask, F)
            lr = tl.load(lr_ptr + (r * N + m) * B + ib, mask=rmask, other=0.0).to(tl.float32)
            e = tl.where(tril, coef[:, None] * lr[None, :], 0.0)
            qk1 = _dot(qq, tl.trans(kk), PREC) + 1.0
            a1 = e * qk1
            complete = m < nc
            first = m == 0
            # pass A: Z2 and the inner-loss gradient G2
            b2 = tl.load(st + O_B2 + fo)
            gb2 = tl.load(st + HALF + O_B2 + fo)
            z2 = tl.full([BB, F], 0.0, tl.float32) + b2[None, :]
            for t in range(NT):
                w1 = tl.load(_mat(st, 0, t * BH, F, BH, F1))
                b1 = tl.load(st + O_B1 + t * BH + ho)
                w2 = tl.load(_mat(st + O_W2, t * BH, 0, BH, F, F))
                z2 += _dot(_gelu(_dot(kk, w1, PREC) + b1[None, :]), w2, PREC)
            xhat, rstd, gy, g2 = _ln_grad(z2, ss, lnw, F, EPS)
            lg2 = lr[:, None] * g2
            # b2 / gb2 part of the close and of the output
            d_b2n = tl.load(dst + O_B2 + fo)
            d_gb2n = tl.load(dst + HALF + O_B2 + fo)
            acc_b2 = gb2 + _sum(lg2, 0)
            d_cl = tl.where(complete, -_sum(acc_b2 * d_b2n, 0), 0.0)
            d_gb2c = tl.where(complete, -c_last * d_b2n, d_gb2n)
            d_b2 = d_b2n + _sum(dz_out, 0)
            cz = coef[:, None] * dz_out
            d_gb2 = d_gb2c
            if first:
                d_gb2 = d_gb2 - _sum(cz, 0)
                dcoef = dcoef - _sum(gb2[None, :] * dz_out, 1)
            d_a2 = -_dot(dz_out, tl.trans(g2), PREC)
            d_s2 = d_a2 * e
            # pass B
            xx = tl.full([BB, BB], 0.0, tl.float32)
            d_lg2 = tl.full([BB, F], 0.0, tl.float32) + d_gb2c[None, :]
            dg2 = tl.full([BB, F], 0.0, tl.float32)
            d_a1 = tl.full([BB, BB], 0.0, tl.float32)
            dq = tl.full([BB, F], 0.0, tl.float32)
            dk = tl.full([BB, F], 0.0, tl.float32)
            dlr = tl.full([BB], 0.0, tl.float32)
            for t in range(NT):
                o_w1 = _off(0, t * BH, F, BH, F1)
                o_b1 = O_B1 + t * BH + ho
                o_w2 = O_W2 + _off(t * BH, 0, BH, F, F)
                w1 = tl.load(st + o_w1)
                b1 = tl.load(st + o_b1)
                w2 = tl.load(st + o_w2)
                gw1 = tl.load(st + HALF + o_w1)
                gb1 = tl.load(st + HALF + o_b1)
                gw2 = tl.load(st + HALF + o_w2)
                q_w1 = dst + o_w1
                q_b1 = dst + o_b1
                q_w2 = dst + o_w2
                d_w1n = tl.load(q_w1)
                d_b1n = tl.load(q_b1)
                d_w2n = tl.load(q_w2)
                z1 = _dot(kk, w1, PREC) + b1[None, :]
                x2 = _gelu(z1)
                dgel = _gelu_grad(z1)
                p = _dot(g2, tl.trans(w2), PREC)
                g1 = p * dgel
                zb1 = _dot(qq, w1, PREC) + b1[None, :] - _dot(a1, g1, PREC)
                if first:
                    zb1 = zb1 - coef[:, None] * (_dot(qq, gw1, PREC) + gb1[None, :])
                xb2 = _gelu(zb1)
                xx += _dot(xb2, tl.trans(x2), PREC)
                lg1 = lr[:, None] * g1
                acc_w1 = gw1 + _dot(tl.trans(kk), lg1, PREC)
                acc_b1 = gb1 + _sum(lg1, 0)
                acc_w2 = gw2 + _dot(tl.trans(x2), lg2, PREC)
                cl = _sum(_sum(acc_w1 * d_w1n, 1), 0) + _sum(acc_b1 * d_b1n, 0)
                cl += _sum(_sum(acc_w2 * d_w2n, 1), 0)
                d_cl += tl.where(complete, -cl, 0.0)
                d_gw1 = tl.where(complete, -c_last * d_w1n, tl.load(q_w1 + HALF))
                d_gb1 = tl.where(complete, -c_last * d_b1n, tl.load(q_b1 + HALF))
                d_gw2 = tl.where(complete, -c_last * d_w2n, tl.load(q_w2 + HALF))
                # accumulators
                d_lg1 = _dot(kk, d_gw1, PREC) + d_gb1[None, :]
                d_lg2 += _dot(x2, d_gw2, PREC)
                dk += _dot(lg1, tl.trans(d_gw1), PREC)
                dx2 = _dot(lg2, tl.trans(d_gw2), PREC)
                dlr += _sum(g1 * d_lg1, 1)
                dg1 = lr[:, None] * d_lg1
                # second layer output
                d_w2 = d_w2n + _dot(tl.trans(xb2), dz_out, PREC)
                dxb2 = _dot(dz_out, tl.trans(w2), PREC)
                if first:
                    d_gw2 = d_gw2 - _dot(tl.trans(xb2), cz, PREC)
                    dxb2 = dxb2 - _dot(cz, tl.trans(gw2), PREC)
                    dcoef = dcoef - _sum(_dot(xb2, gw2, PREC) * dz_out, 1)
                dxb2 += _dot(d_s2, x2, PREC)
                dx2 += _dot(tl.trans(d_s2), xb2, PREC)
                # first layer output
                dzb1 = dxb2 * _gelu_grad(zb1)
                d_w1 = d_w1n + _dot(tl.trans(qq), dzb1, PREC)
                d_b1 = d_b1n + _sum(dzb1, 0)
                dq += _dot(dzb1, tl.trans(w1), PREC)
                d_a1 -= _dot(dzb1, tl.trans(g1), PREC)
                dg1 -= _dot(tl.trans(a1), dzb1, PREC)
                if first:
                    cz1 = coef[:, None] * dzb1
                    d_gw1 = d_gw1 - _dot(tl.trans(qq), cz1, PREC)
                    d_gb1 = d_gb1 - _sum(cz1, 0)
                    dq -= _dot(cz1, tl.trans(gw1), PREC)
                    dcoef = dcoef - _sum((_dot(qq, gw1, PREC) + gb1[None, :]) * dzb1, 1)
                # G1 = (G2 W2^T) * gelu'(Z1)
                dp = dg1 * dgel
                dg2 += _dot(dp, w2, PREC)
                d_w2 += _dot(tl.trans(dp), g2, PREC)
                t_part = dg1 * p * _gelu_grad2(z1) + dx2 * dgel
                tl.store(_mat(tmp, 0, t * BH, BB, BH, F1), t_part)
                tl.debug_barrier()
                tl.store(q_w1, d_w1)
                tl.store(q_b1, d_b1)
                tl.store(q_w2, d_w2)
                tl.store(q_w1 + HALF, d_gw1)
                tl.store(q_b1 + HALF, d_gb1)
                tl.store(q_w2 + HALF, d_gw2)
            # after the tiles: A2, the rest of dG2, E, A1, and the LayerNorm backward
            xx1 = xx + 1.0
            dlr += _sum(g2 * d_lg2, 1)
            dg2 += lr[:, None] * d_lg2 - _dot(tl.trans(e * xx1), dz_out, PREC)
            d_e = tl.where(tril, d_a2 * xx1 + d_a1 * qk1, 0.0)
            d_s1 = d_a1 * e
            dq += _dot(d_s1, kk, PREC)
            dk += _dot(tl.trans(d_s1), qq, PREC)
            dcoef = dcoef + _sum(d_e * lr[None, :], 1)
            dlr += _sum(d_e * coef[:, None], 0)
            dz2, ds, dl = _ln_grad_backward(dg2, g2, gy, xhat, rstd, ss, lnw, F)
            dlnw += dl
            d_b2 += _sum(dz2, 0)
            tl.debug_barrier()
            # pass C: the terms through dZ2
            for t in range(NT):
                o_w1 = _off(0, t * BH, F, BH, F1)
                o_b1 = O_B1 + t * BH + ho
                o_w2 = O_W2 + _off(t * BH, 0, BH, F, F)
                w1 = tl.load(st + o_w1)
                b1 = tl.load(st + o_b1)
                w2 = tl.load(st + o_w2)
                z1 = _dot(kk, w1, PREC) + b1[None, :]
                x2 = _gelu(z1)
                dz1 = tl.load(_mat(tmp, 0, t * BH, BB, BH, F1))
                dz1 += _dot(dz2, tl.trans(w2), PREC) * _gelu_grad(z1)
                q_w1 = dst + o_w1
                q_b1 = dst + o_b1
                q_w2 = dst + o_w2
                d_w2 = tl.load(q_w2) + _dot(tl.trans(x2), dz2, PREC)
                d_w1 = tl.load(q_w1) + _dot(tl.trans(kk), dz1, PREC)
                d_b1 = tl.load(q_b1) + _sum(dz1, 0)
                dk += _dot(dz1, tl.trans(w1), PREC)
                tl.debug_barrier()
                tl.store(q_w2, d_w2)
                tl.store(q_w1, d_w1)
                tl.store(q_b1, d_b1)
            tl.store(dst + O_B2 + fo, d_b2)
            tl.store(dst + HALF + O_B2 + fo, d_gb2)
            dcoef += tl.where(ib == B - 1, d_cl, 0.0)
            _store_rows(dk_ptr + base, dk, ib, fo, rmask, F)
            _store_rows(dq_ptr + base, dq, ib, fo, rmask, F)
            _store_rows(ds_ptr + base, ds, ib, fo, rmask, F)
            tl.store(dlr_ptr + (r * N + m) * B + ib, dlr.to(dlr_ptr.dtype.element_ty), mask=rmask)
            tl.debug_barrier()
    tl.store(dcoef_ptr + r * BB + ib, dcoef)
    tl.store(dlnw_ptr + r * F + fo, dlnw)


# --------------------------------------------------------------------------------------------------
# one-token decode step (ttt.ops.decode.ttt_step): matrix-vector work, no tl.dot, one program per row
# --------------------------------------------------------------------------------------------------

@triton.jit
def _ln_vec(z, lnw, F: tl.constexpr, EPS: tl.constexpr):
    """``(xhat, rstd)`` of a vector."""
    zc = z - _sum(z, 0) / F
    rstd = 1.0 / tl.sqrt(_sum(zc * zc, 0) / F + EPS)
    return zc * rstd, rstd


@triton.jit
def _ln_grad_vec(z, s, lnw, F: tl.constexpr, EPS: tl.constexpr):
    xhat, rstd = _ln_vec(z, lnw, F, EPS)
    gy = lnw * (lnw * xhat + s)
    return rstd * (gy - _sum(gy, 0) / F - xhat * (_sum(gy * xhat, 0) / F))


@triton.jit
def _decode_prologue(q_ptr, k_ptr, v_ptr, lr_ptr, coef_ptr, lnw_ptr, lnb_ptr, pos_ptr, act_ptr, H, MB,
                     F: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    bi = r // H
    h = r % H
    fo = tl.arange(0, F)
    qv = tl.load(q_ptr + r * F + fo).to(tl.float32)
    kv = tl.load(k_ptr + r * F + fo).to(tl.float32)
    vv = tl.load(v_ptr + r * F + fo).to(tl.float32)
    lr = tl.load(lr_ptr + r).to(tl.float32)
    lnw = tl.load(lnw_ptr + h * F + fo).to(tl.float32)
    lnb = tl.load(lnb_ptr + h * F + fo).to(tl.float32)
    pos = tl.load(pos_ptr + bi)
    active = tl.load(act_ptr + bi) != 0
    c = tl.load(coef_ptr + pos).to(tl.float32)
    c_last = tl.load(coef_ptr + MB - 1).to(tl.float32)
    closes = active & (pos == MB - 1)
    return r, fo, qv, kv, vv, lr, lnw, lnb, active, closes, c, c_last


@triton.jit
def _decode_out(out_ptr, r, fo, qv, z, lnw, lnb, active, F: tl.constexpr, EPS: tl.constexpr):
    xhat, _ = _ln_vec(z, lnw, F, EPS)
    out = tl.where(active, qv + xhat * lnw + lnb, 0.0)
    tl.store(out_ptr + r * F + fo, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _decode_put(new_w, new_g, old_w, acc_old, acc_new, active, closes, c_last):
    """New weight / accumulator of one state tensor: ttt_step's closing rule."""
    acc = tl.where(active, acc_new, acc_old)
    tl.store(new_w, tl.where(closes, old_w - c_last * acc_new, old_w))
    tl.store(new_g, tl.where(closes, 0.0, acc))


@triton.jit
def linear_decode_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, coef_ptr, lnw_ptr, lnb_ptr, pos_ptr, act_ptr,
                         w_ptr, b_ptr, gw_ptr, gb_ptr, out_ptr, nw_ptr, nb_ptr, ngw_ptr, ngb_ptr, H, MB,
                         F: tl.constexpr, EPS: tl.constexpr):
    """TTT-Linear ttt_step for row ``r = batch * H + head``: reads the state, writes a new one."""
    r, fo, qv, kv, vv, lr, lnw, lnb, active, closes, c, c_last = _decode_prologue(
        q_ptr, k_ptr, v_ptr, lr_ptr, coef_ptr, lnw_ptr, lnb_ptr, pos_ptr, act_ptr, H, MB, F)
    o_w = r * F * F + _off(0, 0, F, F, F)
    o_b = r * F + fo
    w = tl.load(w_ptr + o_w)
    bv = tl.load(b_ptr + o_b)
    gw = tl.load(gw_ptr + o_w)
    gb = tl.load(gb_ptr + o_b)
    z = _sum(kv[:, None] * w, 0) + bv
    g = _ln_grad_vec(z, lnb - (vv - kv), lnw, F, EPS)
    lg = lr * g
    gw_new = gw + kv[:, None] * lg[None, :]
    gb_new = gb + lg
    zq = _sum(qv[:, None] * w, 0) + bv - c * (_sum(qv[:, None] * gw_new, 0) + gb_new)
    _decode_out(out_ptr, r, fo, qv, zq, lnw, lnb, active, F, EPS)
    _decode_put(nw_ptr + o_w, ngw_ptr + o_w, w, gw, gw_new, active, closes, c_last)
    _decode_put(nb_ptr + o_b, ngb_ptr + o_b, bv, gb, gb_new, active, closes, c_last)


@triton.jit
def mlp_decode_kernel(q_ptr, k_ptr, v_ptr, lr_ptr, coef_ptr, lnw_ptr, lnb_ptr, pos_ptr, act_ptr,
                      w1_ptr, b1_ptr, w2_ptr, b2_ptr, gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr, out_ptr,
                      nw1_ptr, nb1_ptr, nw2_ptr, nb2_ptr, ngw1_ptr, ngb1_ptr, ngw2_ptr, ngb2_ptr, H, MB,
                      F: tl.constexpr, F1: tl.constexpr, BH: tl.constexpr, EPS: tl.constexpr):
    """TTT-MLP ttt_step for one row, streaming over hidden tiles of ``BH``."""
    r, fo, qv, kv, vv, lr, lnw, lnb, active, closes, c, c_last = _decode_prologue(
        q_ptr, k_ptr, v_ptr, lr_ptr, coef_ptr, lnw_ptr, lnb_ptr, pos_ptr, act_ptr, H, MB, F)
    NT: tl.constexpr = F1 // BH
    ho = tl.arange(0, BH)
    o_b2 = r * F + fo
    b2 = tl.load(b2_ptr + o_b2)
    gb2 = tl.load(gb2_ptr + o_b2)
    z2 = b2
    for t in range(NT):
        w1 = tl.load(w1_ptr + r * F * F1 + _off(0, t * BH, F, BH, F1))
        b1 = tl.load(b1_ptr + r * F1 + t * BH + ho)
        w2 = tl.load(w2_ptr + r * F1 * F + _off(t * BH, 0, BH, F, F))
        z2 += _sum(_gelu(_sum(kv[:, None] * w1, 0) + b1)[:, None] * w2, 0)
    g2 = _ln_grad_vec(z2, lnb - (vv - kv), lnw, F, EPS)
    lg2 = lr * g2
    gb2_new = gb2 + lg2
    z = b2 - c * gb2_new
    for t in range(NT):
        o_w1 = r * F * F1 + _off(0, t * BH, F, BH, F1)
        o_b1 = r * F1 + t * BH + ho
        o_w2 = r * F1 * F + _off(t * BH, 0, BH, F, F)
        w1 = tl.load(w1_ptr + o_w1)
        b1 = tl.load(b1_ptr + o_b1)
        w2 = tl.load(w2_ptr + o_w2)
        gw1 = tl.load(gw1_ptr + o_w1)
        gb1 = tl.load(gb1_ptr + o_b1)
        gw2 = tl.load(gw2_ptr + o_w2)
        z1 = _sum(kv[:, None] * w1, 0) + b1
        x2 = _gelu(z1)
        lg1 = lr * _sum(w2 * g2[None, :], 1) * _gelu_grad(z1)
        gw1_new = gw1 + kv[:, None] * lg1[None, :]
        gb1_new = gb1 + lg1
        gw2_new = gw2 + x2[:, None] * lg2[None, :]
        zq1 = _sum(qv[:, None] * w1, 0) + b1 - c * (_sum(qv[:, None] * gw1_new, 0) + gb1_new)
        xq2 = _gelu(zq1)
        z += _sum(xq2[:, None] * w2, 0) - c * _sum(xq2[:, None] * gw2_new, 0)
        _decode_put(nw1_ptr + o_w1, ngw1_ptr + o_w1, w1, gw1, gw1_new, active, closes, c_last)
        _decode_put(nb1_ptr + o_b1, ngb1_ptr + o_b1, b1, gb1, gb1_new, active, closes, c_last)
        _decode_put(nw2_ptr + o_w2, ngw2_ptr + o_w2, w2, gw2, gw2_new, active, closes, c_last)
    _decode_out(out_ptr, r, fo, qv, z, lnw, lnb, active, F, EPS)
    _decode_put(nb2_ptr + o_b2, ngb2_ptr + o_b2, b2, gb2, gb2_new, active, closes, c_last)
