"""Mini-batch TTT in the dual form: the fast path for TTT-Linear and TTT-MLP (math §3, §5).

Tokens are aligned on a grid of mini-batches of ``b`` tokens (a row whose state is ``pos`` tokens into
its open mini-batch starts ``pos`` slots into the grid; empty slots carry a zero learning rate and so
touch nothing). The targets are formed for all tokens at once; the sequential scan over mini-batches
(:mod:`ttt.ops.scan`, with its PyTorch, compiled-CPU and Triton backends and a hand-written backward)
works on the ``[batch*heads, n_minibatches, b, F]`` grid, and the output LayerNorm is again applied to
all tokens at once. Per-token weights are never materialised.

:func:`ttt_dual_heads` is the layer's entry point: it takes the projections in their own head-interleaved
layout, applies the rotary embedding and runs :func:`ttt_dual`; where the compiled scan applies, all of
it is one fused pass (:mod:`ttt.ops.scan.fused`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import layer_norm, rope_adjacent, ttt_learning_rate
from .scan import ttt_scan
from .scan.fused import fused_backend, ttt_dual_heads_fused
from .state import InnerState
from .workspace import check_out


def _validate(xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor, ln_b: Tensor,
              state: InnerState, lengths: Tensor | None) -> None:
    if xq.dim() != 4:
        raise ValueError(f"xq must be [batch, heads, length, head_dim], got shape {tuple(xq.shape)}")
    if xk.shape != xq.shape or xv.shape != xq.shape:
        raise ValueError(f"xq/xk/xv shapes differ: {tuple(xq.shape)}, {tuple(xk.shape)}, {tuple(xv.shape)}")
    _validate_rest(tuple(xq.shape), xq.device, lr, coef, ln_w, ln_b, state, lengths)


def _validate_rest(shape: tuple[int, ...], device: torch.device, lr: Tensor, coef: Tensor, ln_w: Tensor,
                   ln_b: Tensor, state: InnerState, lengths: Tensor | None) -> None:
    """The checks of :func:`_validate` past the projections', for inputs of ``shape [B, H, L, F]``."""
    bsz, heads, length, f = shape
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
    if w1.device != device:
        raise ValueError(f"state is on {w1.device} but the input is on {device}")
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
    backend: str | None = None,
) -> tuple[Tensor, InnerState]:
    """TTT-Linear / TTT-MLP (following ``state``) over a chunk of tokens, in the mini-batch dual form.

    Same contract as :func:`ttt.ops.reference.ttt_reference`: inputs ``[B, H, L, F]``, ``lr [B, H, L]``,
    ``coef [b]``, ``ln_w/ln_b [H, F]``, carried ``state``; optional ``lengths [B]`` (real tokens first).
    The inner loop runs in the state's dtype (fp32 for bf16/fp16 inputs, or fp64); the output has the
    input's dtype. The backward restarts from a checkpoint of the inner state every
    ``remat_group_size`` mini-batches (0: about ``sqrt(n_minibatches)``). ``backend`` picks the scan
    backend (see :mod:`ttt.ops.scan`; ``None``: ``$TTT_SCAN_BACKEND`` or automatic).
    ``ln_residual=False`` (TTT-Linear only) drops the inner LayerNorm and residual: the loss becomes
    ``0.5 * ||f(k) - v||^2`` and the output ``f(q)``; used to check the linear-attention identity.
    """
    _validate(xq, xk, xv, lr, coef, ln_w, ln_b, state, lengths)
    in_dtype = xq.dtype
    inner_dtype = state.W1.dtype
    bsz, heads, length, f = xq.shape
    mini_batch = coef.shape[0]
    device = xq.device
    if length == 0:
        return xq.new_zeros(xq.shape), state
    xq, xk, xv, lr = xq.to(inner_dtype), xk.to(inner_dtype), xv.to(inner_dtype), lr.to(inner_dtype)
    coef, ln_w, ln_b = coef.to(inner_dtype), ln_w.to(inner_dtype), ln_b.to(inner_dtype)

    starts = state.pos.to(device)
    s_min, s_max = int(starts.min()), int(starts.max())
    if lengths is None:
        n_vec = torch.full((bsz,), length, dtype=torch.long, device=device)
        uniform = s_min == s_max
    else:
        n_vec = lengths.to(device=device, dtype=torch.long)
        n_max = int(n_vec.max())
        if int(n_vec.min()) < 0 or n_max > length:
            raise ValueError(f"lengths must lie in [0, {length}], got {lengths.tolist()}")
        if n_max == 0:  # only padding: nothing touches the state
            return xq.new_zeros(xq.shape).to(in_dtype), state
        uniform = s_min == s_max and bool((n_vec == length).all())
    ends = starts + n_vec
    n_mb = -(-int(ends.max()) // mini_batch)
    total = n_mb * mini_batch
    if uniform and s_min == 0 and total == length:
        aq, ak, av, alr = xq, xk, xv, lr
    else:
        aq, ak, av = (_align(x, starts, n_vec, total) for x in (xq, xk, xv))
        alr = _align(lr, starts, n_vec, total)

    if not ln_residual and state.is_mlp:
        raise ValueError("ln_residual=False is only defined for TTT-Linear")
    rows = bsz * heads

    def grid(x: Tensor) -> Tensor:  # [B, H, total, F] -> [B*H, n_mb, b, F] (a view)
        return x.reshape(rows, n_mb, mini_batch, x.shape[-1])

    k, q = grid(ak).contiguous(), grid(aq).contiguous()
    if ln_residual:
        s = grid(ln_b.view(1, heads, 1, f) - (av - ak)).contiguous()
        lnw = ln_w.view(1, heads, f).expand(bsz, heads, f).reshape(rows, f)
    else:
        s, lnw = -grid(av).contiguous(), None
    lr_g = alr.reshape(rows, n_mb, mini_batch).contiguous()
    # mini-batch m of a row closes (its weights step) iff the row's tokens fill it entirely
    n_complete = (ends // mini_batch).repeat_interleave(heads)

    def flat(t: Tensor) -> Tensor:
        return t.reshape(rows, *t.shape[2:])

    init = tuple(flat(t).contiguous() for t in state.weights() + state.grads())
    zbar, final = ttt_scan(k, q, s, lr_g, coef, lnw, n_complete, init, group=remat_group_size,
                           backend=backend)
    zbar = zbar.reshape(bsz, heads, total, f)
    if ln_residual:
        out = aq + layer_norm(zbar, ln_w.view(1, heads, 1, f), ln_b.view(1, heads, 1, f))
    else:
        out = zbar
    if not (uniform and s_min == 0 and total == length):
        out = _unalign(out, starts, n_vec, length)

    def unflat(t: Tensor) -> Tensor:
        return t.reshape(bsz, heads, *t.shape[1:])

    final = [unflat(t) for t in final]
    n_w = len(final) // 2
    new = InnerState.from_parts(tuple(final[:n_w]), tuple(final[n_w:]), ends % mini_batch)
    return out.to(in_dtype), new


def ttt_dual_heads_composed(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor, ln_b: Tensor,
    state: InnerState, rope_theta: float, lengths: Tensor | None = None, remat_group_size: int = 0,
    backend: str | None = None,
) -> tuple[Tensor, InnerState]:
    """:func:`ttt_dual_heads` from the readable ops: rotary embedding of q and k, then :func:`ttt_dual`."""
    bsz, length = xq.shape[:2]
    mini_batch = coef.shape[0]
    positions = (state.pos.view(bsz, 1) + torch.arange(length, device=xq.device)) % mini_batch
    xq, xk, xv = (t.transpose(1, 2) for t in (xq, xk, xv))
    xq = rope_adjacent(xq, positions, rope_theta, period=mini_batch)
    xk = rope_adjacent(xk, positions, rope_theta, period=mini_batch)
    out, new = ttt_dual(xq, xk, xv, lr, coef, ln_w, ln_b, state, lengths, remat_group_size=remat_group_size,
                        backend=backend)
    return out.transpose(1, 2), new


def ttt_dual_heads(
    xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor, ln_b: Tensor,
    state: InnerState, rope_theta: float, lengths: Tensor | None = None, remat_group_size: int = 0,
    backend: str | None = None, out: Tensor | None = None, lr_gate: tuple[Tensor, float] | None = None,
) -> tuple[Tensor, InnerState]:
    """The TTT layer's inner part on head-interleaved projections ``xq, xk, xv [B, L, H, F]``.

    Rotates q and k (rotary embedding with base ``rope_theta`` at each token's position inside its
    mini-batch) and runs :func:`ttt_dual` (other arguments as there). Returns ``(out [B, L, H, F], state)``,
    ``out`` in the input's dtype. One fused compiled pass where :func:`ttt.ops.scan.fused.fused_backend`
    allows, else :func:`ttt_dual_heads_composed`. With ``out`` (a contiguous tensor shaped and typed like
    ``xq``, not overlapping the inputs) the result is written there and ``out`` is returned; the fused
    pass then writes it directly (no autograd, the input's dtype the inner one). With ``lr_gate = (bias
    [H], base_lr)``, ``lr`` holds the learning-rate gate's logits and the learning rates are
    :func:`ttt.ops.functional.ttt_learning_rate` of them: formed inside the fused pass at inference
    (read where they are, e.g. a strided view of the layer's projections), else by that function.
    """
    if xq.dim() != 4 or xk.shape != xq.shape or xv.shape != xq.shape:
        raise ValueError(f"xq/xk/xv must be [batch, length, heads, head_dim] alike, got {tuple(xq.shape)}, "
                         f"{tuple(xk.shape)}, {tuple(xv.shape)}")
    bsz, length, heads, f = xq.shape
    _validate_rest((bsz, heads, length, f), xq.device, lr, coef, ln_w, ln_b, state, lengths)
    check_out(out, xq)
    if lr_gate is not None and tuple(lr_gate[0].shape) != (heads,):
        raise ValueError(f"lr_gate bias must be [{heads}], got {tuple(lr_gate[0].shape)}")
    impl = fused_backend(xq, coef, state, lengths, backend)
    if lr_gate is not None and (impl is None or torch.is_grad_enabled()):
        lr, lr_gate = ttt_learning_rate(lr, lr_gate[0], lr_gate[1], f), None
    if impl is None:
        res, new = ttt_dual_heads_composed(xq, xk, xv, lr, coef, ln_w, ln_b, state, rope_theta, lengths,
                                           remat_group_size, backend)
    else:
        direct = out if out is not None and out.dtype == state.W1.dtype else None
        res, new = ttt_dual_heads_fused(impl, xq, xk, xv, lr, coef, ln_w, ln_b, state, rope_theta,
                                        remat_group_size, direct, lr_gate)
        if res.dtype != xq.dtype:
            res = res.to(xq.dtype)
    if out is not None and res.data_ptr() != out.data_ptr():
        res = out.copy_(res)
    return res, new
