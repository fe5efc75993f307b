"""The dual form (fast path) against the token-by-token primal reference, and exact identities.

Tolerances: float64 comparisons use 1e-10 (observed ~1e-15); float32 uses rtol 1e-5 on small sizes.
"""

from __future__ import annotations

import pytest
import torch

from ttt.ops import InnerState, causal_conv1d, ttt_dual, ttt_reference


def make_inputs(bsz: int, heads: int, length: int, f: int, mb: int, mlp: bool, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=dtype)

    xq, xk, xv = r(bsz, heads, length, f), r(bsz, heads, length, f), r(bsz, heads, length, f)
    lr = torch.rand(bsz, heads, length, generator=g, dtype=dtype) * 0.5
    coef = (1.0 / torch.arange(1, mb + 1, dtype=dtype) + r(mb, scale=0.1)).clamp(min=0)
    ln_w, ln_b = 1 + r(heads, f, scale=0.1), r(heads, f, scale=0.1)
    f1 = 4 * f if mlp else f
    weights = [r(heads, f, f1, scale=0.1), r(heads, 1, f1, scale=0.1)]
    if mlp:
        weights += [r(heads, f1, f, scale=0.1), r(heads, 1, f, scale=0.1)]
    return (xq, xk, xv, lr, coef, ln_w, ln_b), tuple(weights)


def assert_states_close(a: InnerState, b: InnerState, **tol) -> None:
    for x, y in zip(a.weights() + a.grads(), b.weights() + b.grads(), strict=True):
        torch.testing.assert_close(x, y, **tol)
    assert torch.equal(a.pos, b.pos)


F64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize(
    "bsz,heads,length,f,mb",
    [(2, 2, 21, 8, 4), (1, 3, 16, 4, 16), (2, 1, 7, 6, 1), (1, 2, 5, 4, 8), (3, 2, 33, 16, 16)],
)
def test_dual_equals_reference_float64(mlp, bsz, heads, length, f, mb) -> None:
    args, weights = make_inputs(bsz, heads, length, f, mb, mlp)
    state = InnerState.from_weights(weights, bsz)
    out_ref, st_ref = ttt_reference(*args, state)
    out, st = ttt_dual(*args, state)
    torch.testing.assert_close(out, out_ref, **F64)
    assert_states_close(st, st_ref, **F64)


@pytest.mark.parametrize("mlp", [False, True])
def test_dual_equals_reference_with_lengths_and_open_minibatch(mlp) -> None:
    """Rows start at different positions inside their mini-batch and have different real lengths."""
    args, weights = make_inputs(3, 2, 13, 8, 4, mlp, seed=1)
    state = InnerState.from_weights(weights, 3)
    # advance rows by 0, 1 and 3 tokens first, so they carry open mini-batches
    pre_args, _ = make_inputs(3, 2, 3, 8, 4, mlp, seed=2)
    pre_args = pre_args[:4] + args[4:]
    _, state = ttt_reference(*pre_args, state, lengths=torch.tensor([0, 1, 3]))
    lengths = torch.tensor([13, 6, 0])
    out_ref, st_ref = ttt_reference(*args, state, lengths=lengths)
    out, st = ttt_dual(*args, state, lengths=lengths)
    torch.testing.assert_close(out, out_ref, **F64)
    assert_states_close(st, st_ref, **F64)
    assert st.pos.tolist() == [(0 + 13) % 4, (1 + 6) % 4, 3]
    assert out[1, :, 6:].abs().max() == 0 and out[2].abs().max() == 0


@pytest.mark.parametrize("mlp", [False, True])
def test_dual_gradients_equal_reference(mlp) -> None:
    args, weights = make_inputs(2, 2, 11, 4, 4, mlp, seed=3)
    leaves = [t.clone().requires_grad_() for t in args + weights]
    grads = []
    for fn in (ttt_reference, ttt_dual):
        for t in leaves:
            t.grad = None
        state = InnerState.from_weights(tuple(leaves[7:]), 2)
        out, st = fn(*leaves[:7], state)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
        loss = loss + sum((w * w).sum() for w in st.weights() + st.grads())
        loss.backward()
        grads.append([t.grad.clone() for t in leaves])
    for g_ref, g in zip(*grads, strict=True):
        torch.testing.assert_close(g, g_ref, **F64)


@pytest.mark.parametrize("mlp", [False, True])
def test_dual_float32_matches_reference(mlp) -> None:
    args, weights = make_inputs(2, 2, 19, 16, 8, mlp, dtype=torch.float32, seed=4)
    state = InnerState.from_weights(weights, 2)
    out_ref, st_ref = ttt_reference(*args, state)
    out, st = ttt_dual(*args, state)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert_states_close(st, st_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mlp", [False, True])
def test_gradcheck_float64(mlp) -> None:
    args, weights = make_inputs(1, 2, 6, 4, 4, mlp, seed=5)
    leaves = tuple(t.clone().requires_grad_() for t in args + weights)

    def fn(*xs):
        state = InnerState.from_weights(tuple(xs[7:]), 1)
        out, st = ttt_dual(*xs[:7], state)
        return out, *st.weights(), *st.grads()

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("splits", [[1] * 23, [5, 5, 5, 8], [16, 7], [3, 17, 3], [1, 15, 1, 6], [23]])
def test_chunked_equals_whole(mlp, splits) -> None:
    args, weights = make_inputs(2, 2, 23, 8, 8, mlp, seed=6)
    state0 = InnerState.from_weights(weights, 2)
    out_all, st_all = ttt_dual(*args, state0)
    st, outs, start = state0, [], 0
    for n in splits:
        sl = slice(start, start + n)
        out, st = ttt_dual(args[0][:, :, sl], args[1][:, :, sl], args[2][:, :, sl], args[3][:, :, sl],
                           *args[4:], st)
        outs.append(out)
        start += n
    torch.testing.assert_close(torch.cat(outs, dim=2), out_all, **F64)
    assert_states_close(st, st_all, **F64)


@pytest.mark.parametrize("mlp", [False, True])
def test_remat_is_exact(mlp) -> None:
    args, weights = make_inputs(2, 2, 37, 8, 4, mlp, seed=7)
    res = []
    for group in (0, 1, 3):
        leaves = [t.clone().requires_grad_() for t in args + weights]
        out, st = ttt_dual(*leaves[:7], InnerState.from_weights(tuple(leaves[7:]), 2), remat_group_size=group)
        (out.square().sum() + st.W1.square().sum()).backward()
        res.append([out.detach()] + [t.grad for t in leaves])
    for other in res[1:]:
        for a, b in zip(res[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_linear_attention_identity() -> None:
    """Spec §8: one mini-batch over the sequence, W0 = 0, b0 = 0, no LN/residual, constant lr and
    coef = 1: TTT-Linear's output equals unnormalised causal linear attention ``eta * tril(QK^T) V``."""
    bsz, heads, length, f = 2, 3, 12, 8
    args, _ = make_inputs(bsz, heads, length, f, length, mlp=False, seed=8)
    xq, xk, xv, _, _, ln_w, ln_b = args
    eta = 0.37
    lr = torch.full((bsz, heads, length), eta, dtype=torch.float64)
    coef = torch.ones(length, dtype=torch.float64)
    weights = (torch.zeros(heads, f, f, dtype=torch.float64), torch.zeros(heads, 1, f, dtype=torch.float64))
    state = InnerState.from_weights(weights, bsz)
    out, _ = ttt_dual(xq, xk, xv, lr, coef, ln_w, ln_b, state, ln_residual=False)
    scores = torch.tril(xq @ xk.transpose(-1, -2) + 1.0)  # the +1 is the bias's update
    expect = eta * scores @ xv
    torch.testing.assert_close(out, expect, **F64)
    ref, _ = ttt_reference(xq, xk, xv, lr, coef, ln_w, ln_b, state, ln_residual=False)
    torch.testing.assert_close(ref, expect, **F64)


def test_bf16_inputs_use_fp32_state() -> None:
    args, weights = make_inputs(2, 2, 20, 16, 8, mlp=False, dtype=torch.float32, seed=9)
    state = InnerState.from_weights(weights, 2)
    out32, _ = ttt_dual(*args, state)
    args16 = tuple(a.to(torch.bfloat16) for a in args)
    out16, st16 = ttt_dual(*args16, state)
    assert out16.dtype == torch.bfloat16 and st16.W1.dtype == torch.float32
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 2e-2, rel


def test_bad_inputs_raise() -> None:
    args, weights = make_inputs(2, 2, 8, 4, 4, mlp=False)
    state = InnerState.from_weights(weights, 2)
    with pytest.raises(ValueError, match="xq must be"):
        ttt_dual(args[0][0], *args[1:], state)
    with pytest.raises(ValueError, match="shapes differ"):
        ttt_dual(args[0], args[1][:, :, :4], *args[2:], state)
    with pytest.raises(ValueError, match="lr must be"):
        ttt_dual(*args[:3], args[3][:, :, :3], *args[4:], state)
    with pytest.raises(ValueError, match="state.W1"):
        ttt_dual(*args, InnerState.from_weights(weights, 3))
    with pytest.raises(ValueError, match="lengths must lie"):
        ttt_dual(*args, state, lengths=torch.tensor([9, 1]))
    with pytest.raises(ValueError, match="coef must be"):
        ttt_dual(*args[:4], args[4][:0], *args[5:], state)


def test_causal_conv_streaming_and_lengths() -> None:
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    w, b = torch.randn(6, 1, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    full, st_full = causal_conv1d(x, w, b)
    expect = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), w, b, groups=6)
    torch.testing.assert_close(full, expect.transpose(1, 2))
    y1, st = causal_conv1d(x[:, :3], w, b)
    y2, st = causal_conv1d(x[:, 3:], w, b, st)
    torch.testing.assert_close(torch.cat([y1, y2], 1), full)
    torch.testing.assert_close(st, st_full)
    # padding after the real tokens does not enter the state
    xp = torch.cat([x[:, :5], torch.randn(2, 4, 6, dtype=torch.float64)], 1)
    _, st_pad = causal_conv1d(xp, w, b, lengths=torch.tensor([5, 5]))
    _, st_ref = causal_conv1d(x[:, :5], w, b)
    torch.testing.assert_close(st_pad, st_ref)


@pytest.mark.parametrize("mlp", [False, True])
def test_one_token_step_equals_dual(mlp) -> None:
    """The decoding step (primal form) equals the dual form for one token, from every position in the
    mini-batch (rows at different positions, one padded row), outputs, states and gradients."""
    from ttt.ops import ttt_step

    mb = 4
    args, weights = make_inputs(5, 2, 1, 8, mb, mlp, seed=10)
    pre, _ = make_inputs(5, 2, 7, 8, mb, mlp, seed=11)
    state = InnerState.from_weights(weights, 5)
    _, state = ttt_dual(*pre[:4], *args[4:], state, lengths=torch.tensor([0, 1, 2, 3, 7]))
    assert state.pos.tolist() == [0, 1, 2, 3, 3]
    lengths = torch.tensor([1, 1, 1, 1, 0])
    leaves = [t.clone().requires_grad_() for t in args]
    results = []
    for fn in (ttt_dual, ttt_step):
        for t in leaves:
            t.grad = None
        out, st = fn(*leaves, state, lengths=lengths)
        (out.square().sum() + sum(w.square().sum() for w in st.weights() + st.grads())).backward()
        results.append((out.detach(), st, [t.grad.clone() for t in leaves]))
    (o1, s1, g1), (o2, s2, g2) = results
    torch.testing.assert_close(o2, o1, **F64)
    assert_states_close(s2, s1, **F64)
    for a, b in zip(g2, g1, strict=True):
        torch.testing.assert_close(a, b, **F64)
    assert s2.pos.tolist() == [1, 2, 3, 0, 3]
