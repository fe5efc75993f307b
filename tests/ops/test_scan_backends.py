"""Every scan backend against the token-by-token reference and against each other.

``BACKENDS`` lists the backends under test; add a name there to test a new one. A backend that cannot
load is skipped, except ``cpp`` where a C++ compiler exists (there it must build).

Errors are measured per tensor as ``max|a - b| / max|b|`` (``b`` the reference): at most 1e-10 in
float64 and 1e-5 in float32 (the float32 result is compared with the float64 reference).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from ttt.ops import InnerState, extension, rope_adjacent, ttt_dual, ttt_reference
from ttt.ops import scan as scan_mod
from ttt.ops.dual import ttt_dual_heads, ttt_dual_heads_composed
from ttt.ops.scan import cpp_scan, default_group, get_backend, torch_scan, ttt_scan

BACKENDS = ["torch", "cpp"]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _backend(name: str):
    impl = get_backend(name)
    if impl is None:
        why = scan_mod.why_unavailable(name)
        if name == "cpp" and shutil.which(os.environ.get("CXX", "c++").split()[0]):
            pytest.fail(f"a C++ compiler exists but the cpp scan did not load: {why}")
        pytest.skip(f"backend {name} unavailable: {why}")
    return impl


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().item()
    return (a.double() - b.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def make_inputs(bsz, heads, length, f, mb, mlp, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=dtype)

    xq, xk, xv = r(bsz, heads, length, f), r(bsz, heads, length, f), r(bsz, heads, length, f)
    lr = torch.rand(bsz, heads, length, generator=g, dtype=dtype) * 0.5 / f**0.5
    coef = 1.0 / torch.arange(1, mb + 1, dtype=dtype) + r(mb, scale=0.05).abs()
    ln_w, ln_b = 1 + r(heads, f, scale=0.1), r(heads, f, scale=0.1)
    f1 = 4 * f if mlp else f
    weights = [r(heads, f, f1, scale=f**-0.5), r(heads, 1, f1, scale=0.1)]
    if mlp:
        weights += [r(heads, f1, f, scale=f1**-0.5), r(heads, 1, f, scale=0.1)]
    return [xq, xk, xv, lr, coef, ln_w, ln_b], weights


def _run(fn, inputs, weights, carried, lengths, **kw):
    """Run ``fn`` (reference or dual) from fresh leaves; returns outputs, final state and all gradients."""
    leaves_in = [t.detach().clone().requires_grad_() for t in inputs]
    if carried is None:
        leaves_w = [t.detach().clone().requires_grad_() for t in weights]
        state = InnerState.from_weights(tuple(leaves_w), inputs[0].shape[0])
    else:  # a carried state: its weights and partial accumulators are the leaves
        leaves_w = [t.detach().clone().requires_grad_() for t in carried.weights() + carried.grads()]
        n = len(leaves_w) // 2
        ws, gs = leaves_w[:n], leaves_w[n:]
        state = InnerState(ws[0], ws[1], gs[0], gs[1], carried.pos.clone(),
                           *((ws[2], ws[3], gs[2], gs[3]) if n == 4 else ()))
    out, st = fn(*leaves_in, state, lengths=lengths, **kw)
    g = torch.Generator().manual_seed(123)
    final = st.weights() + st.grads()
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    for t in final:
        loss = loss + (t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)).sum()
    loss.backward()
    grads = [t.grad for t in leaves_in + leaves_w]
    return [out.detach(), *(t.detach() for t in final)], grads, st.pos


CASES = [  # bsz, heads, length, f, mb, prefix (carried tokens per row), ragged lengths, remat group
    (2, 2, 11, 16, 1, None, None, 0),
    (1, 2, 23, 16, 7, None, None, 2),
    (2, 1, 37, 16, 16, [0, 5], None, 1),
    (2, 2, 45, 16, 16, [3, 9], [45, 20], 2),
    (1, 1, 70, 16, 64, None, None, 0),
    (2, 1, 19, 32, 7, [2, 6], [13, 19], 0),
    (1, 1, 9, 128, 4, None, None, 2),
]


def _check_against_reference(backend, mlp, case, dtype):
    bsz, heads, length, f, mb, prefix, ragged, group = case
    impl = _backend(backend)
    assert impl is not None
    inputs64, weights64 = make_inputs(bsz, heads, length, f, mb, mlp, seed=length + f + mb)
    carried64 = None
    if prefix is not None:  # run a prefix first, so rows carry partially filled mini-batches
        pre, _ = make_inputs(bsz, heads, max(prefix), f, mb, mlp, seed=7)
        with torch.no_grad():
            fresh = InnerState.from_weights(tuple(weights64), bsz)
            _, carried64 = ttt_reference(*pre[:4], *inputs64[4:], fresh, lengths=torch.tensor(prefix))
    lengths = None if ragged is None else torch.tensor(ragged)
    ref_vals, ref_grads, ref_pos = _run(ttt_reference, inputs64, weights64, carried64, lengths)
    cast = [t.to(dtype) for t in inputs64]
    carried = None
    if carried64 is not None:
        carried = carried64._map(lambda t: t.to(dtype) if t.is_floating_point() else t)
    vals, grads, pos = _run(ttt_dual, cast, [w.to(dtype) for w in weights64], carried, lengths,
                            remat_group_size=group, backend=backend)
    assert torch.equal(pos, ref_pos)
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(vals, ref_vals, strict=True)):
        assert a.dtype == dtype
        assert rel_err(a, b) <= tol, f"value {i}: {rel_err(a, b):.2e}"
    names = ["xq", "xk", "xv", "lr", "coef", "ln_w", "ln_b"]
    names += [f"state{i}" for i in range(len(ref_grads) - 7)]
    for name, a, b in zip(names, grads, ref_grads, strict=True):
        assert a is not None and b is not None, name
        assert rel_err(a, b) <= tol, f"grad {name}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[2]}-F{c[3]}-b{c[4]}-g{c[7]}"
                         + ("-carried" if c[5] else "") + ("-ragged" if c[6] else ""))
def test_backend_equals_reference_float64(backend, mlp, case) -> None:
    _check_against_reference(backend, mlp, case, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["b7", "b16-carried-ragged"])
def test_backend_equals_reference_float32(backend, mlp, case) -> None:
    _check_against_reference(backend, mlp, case, torch.float32)


# --------------------------------------------------------------------------------------------------
# the layer's inner part on [B, L, H, F] projections: rotary embedding + dual form (fused when compiled)
# --------------------------------------------------------------------------------------------------

THETA = 500.0


def _reference_heads(xq, xk, xv, lr, coef, ln_w, ln_b, state, lengths=None):
    """Rotary embedding + the token-by-token reference, on [B, L, H, F] inputs."""
    mb = coef.shape[0]
    pos = (state.pos.view(-1, 1) + torch.arange(xq.shape[1])) % mb
    q, k, v = (t.transpose(1, 2) for t in (xq, xk, xv))
    q, k = rope_adjacent(q, pos, THETA), rope_adjacent(k, pos, THETA)
    out, st = ttt_reference(q, k, v, lr, coef, ln_w, ln_b, state, lengths)
    return out.transpose(1, 2), st


def _heads(fn):
    return lambda *a, lengths=None, **kw: fn(*a, THETA, lengths, **kw)


@pytest.fixture
def heads_calls(monkeypatch):
    """Counts the compiled scan's fused-pass calls."""
    impl = _backend("cpp")
    calls = []
    real = type(impl).heads_forward

    def spy(self, *a, **kw):
        calls.append(a[0].shape)
        return real(self, *a, **kw)

    monkeypatch.setattr(type(impl), "heads_forward", spy)
    return calls


HEADS_CASES = [CASES[0], CASES[1], CASES[4], CASES[6],
               (2, 3, 40, 16, 8, [8, 16], None, 2),  # carried weights, starting on a mini-batch boundary
               (2, 1, 37, 16, 16, [0, 5], None, 1),  # starts inside a mini-batch: composed
               (2, 2, 45, 16, 16, None, [45, 20], 2)]  # ragged: composed


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", HEADS_CASES, ids=lambda c: f"L{c[2]}-F{c[3]}-b{c[4]}-g{c[7]}"
                         + ("-carried" if c[5] else "") + ("-ragged" if c[6] else ""))
def test_heads_fused_equals_reference(heads_calls, mlp, dtype, case) -> None:
    """Outputs, final state and every gradient of ttt_dual_heads (fused where it applies) against the
    token-by-token reference, and the fused pass against the composition of readable ops."""
    bsz, heads, length, f, mb, prefix, ragged, group = case
    inputs64, weights64 = make_inputs(bsz, heads, length, f, mb, mlp, seed=length + f + mb)
    for i in range(3):
        inputs64[i] = inputs64[i].transpose(1, 2).contiguous()
    carried64 = None
    if prefix is not None:
        pre, _ = make_inputs(bsz, heads, max(prefix), f, mb, mlp, seed=7)
        with torch.no_grad():
            fresh = InnerState.from_weights(tuple(weights64), bsz)
            _, carried64 = ttt_reference(*pre[:4], *inputs64[4:], fresh, lengths=torch.tensor(prefix))
    lengths = None if ragged is None else torch.tensor(ragged)
    ref = _run(_reference_heads, inputs64, weights64, carried64, lengths)
    cast = [t.to(dtype) for t in inputs64]
    carried = None
    if carried64 is not None:
        carried = carried64._map(lambda t: t.to(dtype) if t.is_floating_point() else t)
    weights = [w.to(dtype) for w in weights64]
    kw = {"remat_group_size": group, "backend": "cpp"}
    fused = _run(_heads(ttt_dual_heads), cast, weights, carried, lengths, **kw)
    expect_fused = ragged is None and (prefix is None or all(p % mb == 0 for p in prefix))
    assert len(heads_calls) == (1 if expect_fused else 0)
    composed = _run(_heads(ttt_dual_heads_composed), cast, weights, carried, lengths, **kw)
    tol = TOL[dtype]
    for got in (fused, composed):
        assert torch.equal(got[2], ref[2])
        for i, (a, b) in enumerate(zip(got[0], ref[0], strict=True)):
            assert a.dtype == dtype and rel_err(a, b) <= tol, f"value {i}: {rel_err(a, b):.2e}"
        for i, (a, b) in enumerate(zip(got[1], ref[1], strict=True)):
            assert a is not None and rel_err(a, b) <= tol, f"grad {i}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_heads_learning_rate_gate(heads_calls, mlp, dtype) -> None:
    """``lr_gate = (bias, base_lr)``: ``lr`` holds the gate's logits, here a strided [B, H, L] view of a
    column block of a [B, L, D + H] tensor as in the layer. At inference the fused pass forms the
    learning rates itself; composed, with autograd, or on the PyTorch backend ``ttt_learning_rate`` forms
    them first. All equal the run given those learning rates (fp64 1e-12, fp32 1e-6 relative); a bias of
    the wrong shape is a one-line error."""
    from ttt.ops.functional import ttt_learning_rate

    bsz, heads, length, f, mb = 2, 3, 20, 8, 4
    inputs, weights = make_inputs(bsz, heads, length, f, mb, mlp, seed=5, dtype=dtype)
    xq, xk, xv = (t.transpose(1, 2).contiguous() for t in inputs[:3])
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(bsz, length, heads * f + heads, generator=g, dtype=dtype)
    logits = wide[..., heads * f:].transpose(1, 2)  # [B, H, L], strides (L * (D + H), 1, D + H)
    bias, base = torch.randn(heads, generator=g, dtype=dtype), 0.7
    lr = ttt_learning_rate(logits, bias, base, f)
    state = InnerState.from_weights(tuple(weights), bsz)
    tol = 1e-12 if dtype == torch.float64 else 1e-6

    def run(backend, gate):
        return ttt_dual_heads(xq, xk, xv, logits if gate else lr, *inputs[4:], state, THETA, backend=backend,
                              lr_gate=(bias, base) if gate else None)

    with torch.no_grad():
        ref = run("torch", False)
        for backend, gate in (("cpp", True), ("cpp", False), ("torch", True)):
            n = len(heads_calls)
            out, st = run(backend, gate)
            assert len(heads_calls) == n + (backend == "cpp")  # the cpp runs are the fused pass
            assert rel_err(out, ref[0]) <= tol, (backend, gate, rel_err(out, ref[0]))
            for a, b in zip(st.weights(), ref[1].weights(), strict=True):
                assert rel_err(a, b) <= tol, (backend, gate)
    out, _ = run("cpp", True)  # grad mode: the learning rates formed first, same result
    assert rel_err(out.detach(), ref[0]) <= tol
    with pytest.raises(ValueError, match=r"lr_gate bias must be \[3\]"):
        ttt_dual_heads(xq, xk, xv, logits, *inputs[4:], state, THETA, lr_gate=(bias[:2], base))


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_heads_fused_reads_strided_projections(heads_calls, mlp) -> None:
    """q, k, v as column blocks of one [B, L, 3D] tensor (and v with a non-unit feature stride): the
    same values and gradients as from contiguous copies."""
    bsz, heads, length, f, mb = 2, 3, 21, 8, 4
    inputs, weights = make_inputs(bsz, heads, length, f, mb, mlp, seed=3)
    big = torch.cat([t.transpose(1, 2).reshape(bsz, length, heads * f) for t in inputs[:3]], -1)
    state = InnerState.from_weights(tuple(weights), bsz)
    results = []
    for strided in (True, False):
        leaf = big.clone().requires_grad_()
        parts = [leaf[..., i * heads * f:(i + 1) * heads * f].view(bsz, length, heads, f) for i in range(3)]
        if strided:
            parts[2] = parts[2].transpose(0, 1).contiguous().transpose(0, 1)
            parts[1] = parts[1].flip(-1).contiguous().flip(-1)  # a negative feature stride
        else:
            parts = [p.contiguous() for p in parts]
        out, st = ttt_dual_heads(*parts, *inputs[3:], state, THETA, backend="cpp")
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        results.append((out.detach(), st.W1, leaf.grad))
    for a, b in zip(*results, strict=True):
        assert rel_err(a, b) <= 1e-13
    assert len(heads_calls) == 2


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("path", ["fused", "fused-grad", "composed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_heads_out_buffer(heads_calls, mlp, path, dtype) -> None:
    """``out=``: the result lands in the given tensor (returned as it), bit-identical to a fresh output,
    on the fused pass written in place (with and without autograd) and on the composed one (ragged rows)
    copied in; a badly shaped, typed or laid-out buffer is refused with its description."""
    inputs, weights = make_inputs(2, 3, 37, 16, 8, mlp, seed=5, dtype=dtype)
    inputs = [t.transpose(1, 2).contiguous() if i < 3 else t for i, t in enumerate(inputs)]
    state = InnerState.from_weights(tuple(w.clone().requires_grad_(path == "fused-grad") for w in weights), 2)
    lengths = torch.tensor([37, 20]) if path == "composed" else None
    with torch.set_grad_enabled(path == "fused-grad"):
        ref, st_ref = ttt_dual_heads(*inputs, state, THETA, lengths, backend="cpp")
        buf = torch.full_like(inputs[0], float("nan"))
        out, st = ttt_dual_heads(*inputs, state, THETA, lengths, backend="cpp", out=buf)
    assert out.data_ptr() == buf.data_ptr() and torch.equal(out, ref) and torch.equal(st.W1, st_ref.W1)
    assert len(heads_calls) == (0 if path == "composed" else 2)
    for bad in (inputs[0][:, :-1].clone(), inputs[0].to(torch.float16), inputs[0].transpose(0, 1).contiguous()
                .transpose(0, 1)):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            ttt_dual_heads(*inputs, state, THETA, lengths, backend="cpp", out=bad)


def test_heads_forward_op_checks_out() -> None:
    """The compiled op refuses an ``out`` of the wrong shape (the Python layer above checks first)."""
    impl = _backend("cpp")
    inputs, weights = make_inputs(1, 2, 8, 16, 4, False, seed=6)
    xq, xk, xv = (t.transpose(1, 2).contiguous() for t in inputs[:3])
    cos, sin = torch.ones(4, 16, dtype=torch.float64), torch.zeros(4, 16, dtype=torch.float64)
    inner = InnerState.from_weights(tuple(weights), 1)
    state = tuple(t.reshape(2, *t.shape[2:]) for t in inner.weights() + inner.grads())
    args = (xq, xk, xv, inputs[3], inputs[4], inputs[5], inputs[6], cos, sin,
            torch.full((2,), 2, dtype=torch.long), state, 1, False)
    out, *_ = impl.heads_forward(*args, out=torch.empty_like(xq))
    assert out.shape == xq.shape
    with pytest.raises(RuntimeError, match="out must have shape"):
        impl.heads_forward(*args, out=torch.empty(1, 8, 2, 8, dtype=torch.float64))


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_heads_fused_without_autograd_is_the_same(heads_calls, mlp) -> None:
    """The inference pass (no checkpoints, no saved Zbar) gives bit-identical outputs and state."""
    inputs, weights = make_inputs(2, 2, 30, 8, 4, mlp, seed=4)
    inputs = [t.transpose(1, 2).contiguous() if i < 3 else t for i, t in enumerate(inputs)]
    state = InnerState.from_weights(tuple(w.clone().requires_grad_() for w in weights), 2)
    out, st = ttt_dual_heads(*inputs, state, THETA, backend="cpp")
    with torch.no_grad():
        out_ng, st_ng = ttt_dual_heads(*inputs, state, THETA, backend="cpp")
    assert out.requires_grad and not out_ng.requires_grad and len(heads_calls) == 2
    assert torch.equal(out, out_ng) and torch.equal(st.pos, st_ng.pos)
    assert all(torch.equal(a, b) for a, b in zip(st.weights() + st.grads(), st_ng.weights() + st_ng.grads()))


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_heads_fused_gradcheck(mlp) -> None:
    _backend("cpp")
    inputs, weights = make_inputs(1, 2, 7, 4, 3, mlp, seed=5)
    inputs = [t.transpose(1, 2).contiguous() if i < 3 else t for i, t in enumerate(inputs)]
    n_in = len(inputs)

    def fn(*xs):
        state = InnerState.from_weights(tuple(xs[n_in:]), 1)
        out, st = ttt_dual_heads(*xs[:n_in], state, THETA, remat_group_size=2, backend="cpp")
        return (out, *st.weights())

    leaves = tuple(t.clone().requires_grad_() for t in inputs + weights)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# scan level: each backend against the PyTorch scan on random states
# --------------------------------------------------------------------------------------------------

def random_scan_inputs(rows, n, b, f, mlp, ln, dtype, seed):
    """Random scan inputs with non-zero carried accumulators and ``n_complete`` varying per row."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=dtype)

    h = 4 * f if mlp else f
    k, q, s = r(rows, n, b, f), r(rows, n, b, f), r(rows, n, b, f)
    lr = torch.rand(rows, n, b, generator=g, dtype=dtype) * 0.3
    coef = 1.0 / torch.arange(1, b + 1, dtype=dtype)
    ln_w = 1 + r(rows, f, scale=0.1) if ln else None
    n_complete = torch.randint(0, n + 1, (rows,), generator=g)
    shapes = [(f, h), (1, h), (h, f), (1, f)] if mlp else [(f, f), (1, f)]
    weights = [r(rows, *sh, scale=0.2) for sh in shapes]
    accs = [r(rows, *sh, scale=0.05) for sh in shapes]
    return k, q, s, lr, coef, ln_w, n_complete, tuple(weights + accs)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("kind", ["linear", "linear-noln", "mlp"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("group", [1, 2, 3, 0])
def test_scan_matches_torch_backend(backend, kind, dtype, group) -> None:
    impl = _backend(backend)
    args = random_scan_inputs(5, 7, 5, 8 if kind == "mlp" else 12, kind == "mlp", kind != "linear-noln",
                              dtype, seed=group)
    group = group or default_group(7)
    z_t, fin_t, saved_t = torch_scan.scan_forward(*args, group, True)
    z_c, fin_c, saved_c = impl.forward(*args, group, True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip((z_c, *fin_c, *saved_c), (z_t, *fin_t, *saved_t), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) <= tol
    _, fin_nosave, saved_none = impl.forward(*args, group, False)
    assert saved_none == () and all(torch.equal(a, b) for a, b in zip(fin_nosave, fin_c))
    g = torch.Generator().manual_seed(9)
    d_z = torch.randn(z_t.shape, generator=g, dtype=dtype)
    d_fin = tuple(torch.randn(t.shape, generator=g, dtype=dtype) for t in fin_t)
    grads_t = torch_scan.scan_backward(*args[:7], saved_t, group, d_z, d_fin)
    grads_c = impl.backward(*args[:7], saved_c, group, d_z, d_fin)
    assert len(grads_t) == len(grads_c)
    for i, (a, b) in enumerate(zip(grads_c, grads_t, strict=True)):
        if b is None:
            assert a is None
            continue
        assert a.shape == b.shape
        assert rel_err(a, b) <= tol * 10, f"grad {i}: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("kind", ["linear", "linear-noln", "mlp"])
def test_scan_gradcheck(backend, kind) -> None:
    _backend(backend)
    k, q, s, lr, coef, ln_w, n_complete, state = random_scan_inputs(
        2, 3, 3, 4, kind == "mlp", kind != "linear-noln", torch.float64, seed=1)
    n_complete = torch.tensor([3, 1])
    leaves = [t.clone().requires_grad_() for t in (k, q, s, lr, coef, *state)]
    lnw = None if ln_w is None else ln_w.clone().requires_grad_()

    def fn(*xs):
        lw = xs[-1] if lnw is not None else None
        z, fin = ttt_scan(*xs[:5], lw, n_complete, tuple(xs[5:5 + len(state)]), group=2, backend=backend)
        return (z, *fin)

    inputs = tuple(leaves) + ((lnw,) if lnw is not None else ())
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# the compiled backend: bad input, unsupported input, fallback without a compiler
# --------------------------------------------------------------------------------------------------

def test_cpp_bad_input_names_the_problem() -> None:
    impl = _backend("cpp")
    k, q, s, lr, coef, ln_w, n_complete, state = random_scan_inputs(2, 3, 4, 8, False, True, torch.float64, 0)
    with pytest.raises(RuntimeError, match="lr must have shape"):
        impl.forward(k, q, s, lr[:, :2], coef, ln_w, n_complete, state, 1, False)
    with pytest.raises(RuntimeError, match=r"state\[2\] must have shape"):
        impl.forward(k, q, s, lr, coef, ln_w, n_complete, (state[0], state[1], state[0][:, :4], state[3]), 1,
                     False)
    with pytest.raises(RuntimeError, match="group must be >= 1"):
        impl.forward(k, q, s, lr, coef, ln_w, n_complete, state, 0, False)
    assert impl.unsupported(k.to(torch.bfloat16), None, state) is not None
    assert impl.unsupported(k, ln_w, tuple(t.float() for t in state)) is not None
    assert impl.unsupported(k, ln_w, state) is None


def test_cpp_load_without_compiler_raises_and_leaves_no_library(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(extension, "_LOADED", {})
    with pytest.raises(RuntimeError, match="no C.. compiler found"):
        cpp_scan.load_library(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_dispatch_falls_back_with_one_warning(monkeypatch) -> None:
    def broken_load():
        raise RuntimeError("no C++ compiler found (test)")

    monkeypatch.setattr(scan_mod, "_LOADED", {"torch": scan_mod._LOADED["torch"]})
    monkeypatch.setattr(scan_mod, "_WHY_MISSING", {})
    monkeypatch.setattr(scan_mod, "_WARNED", set())
    monkeypatch.setattr(cpp_scan, "load", broken_load)
    inputs, weights = make_inputs(1, 2, 9, 8, 4, False, seed=0)
    state = InnerState.from_weights(tuple(weights), 1)
    expect, _ = ttt_dual(*inputs, state, backend="torch")
    with pytest.warns(RuntimeWarning, match="'cpp' is unavailable .*no C\\+\\+ compiler found.*PyTorch scan"):
        out, _ = ttt_dual(*inputs, state, backend="cpp")
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        ttt_dual(*inputs, state, backend="cpp")


def test_fresh_process_without_compiler_uses_torch_scan(tmp_path) -> None:
    """End to end in a new process: no compiler, empty cache -> one warning line, correct result."""
    code = textwrap.dedent("""
        import torch
        from ttt.ops import InnerState, ttt_dual
        g = torch.Generator().manual_seed(0)
        x = [torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64) for _ in range(3)]
        lr, coef = torch.full((1, 2, 9), 0.1, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        ln_w, ln_b = torch.ones(2, 8, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.float64)
        w = (0.1 * torch.randn(2, 8, 8, generator=g, dtype=torch.float64),
             torch.zeros(2, 1, 8, dtype=torch.float64))
        st = InnerState.from_weights(w, 1)
        a, _ = ttt_dual(*x, lr, coef, ln_w, ln_b, st)
        b, _ = ttt_dual(*x, lr, coef, ln_w, ln_b, st, backend="torch")
        assert torch.equal(a, b)
        print("OK")
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TTT_EXTENSIONS_DIR=str(tmp_path / "cache"),
               TTT_SCAN_BACKEND="cpp", PYTHONWARNINGS="default")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "OK"
    warn_lines = [ln for ln in res.stderr.splitlines() if "RuntimeWarning" in ln]
    assert len(warn_lines) == 1 and "no C++ compiler found" in warn_lines[0], res.stderr
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_scan_speed_benchmark_smoke(tmp_path) -> None:
    from ttt.benchmarks import scan_speed

    rows = scan_speed.main(["--lengths", "32", "--rounds", "1", "--backends", "torch", "--heads", "2",
                            "--head-dim", "8", "--out", str(tmp_path)])
    assert (tmp_path / "scan_speed.json").exists() and (tmp_path / "scan_speed.md").exists()
    assert [(r["layer"], r["phase"]) for r in rows] == [
        ("ttt_linear", "fwd"), ("ttt_linear", "fwd+bwd"), ("ttt_mlp", "fwd"), ("ttt_mlp", "fwd+bwd")]
    assert all(r["torch_ms"] > 0 for r in rows)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_cpp_scan_is_the_same_on_more_threads(kind) -> None:
    """Rows run in parallel (at::parallel_for); the result must not depend on the thread count."""
    impl = _backend("cpp")
    args = random_scan_inputs(6, 5, 4, 8, kind == "mlp", True, torch.float64, seed=3)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            z, fin, saved = impl.forward(*args, 2, True)
            d_z = torch.ones_like(z)
            grads = impl.backward(*args[:7], saved, 2, d_z, tuple(torch.ones_like(t) for t in fin))
            results.append([z, *fin, *saved, *grads])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_chunk_leaves_state_untouched(backend) -> None:
    """Every row of a chunk is padding (lengths all 0, L > 0): zero output, the state unchanged."""
    g = torch.Generator().manual_seed(3)
    bsz, heads, length, f, mb = 2, 2, 5, 8, 4
    x = [torch.randn(bsz, heads, length, f, generator=g) for _ in range(3)]
    lr = torch.rand(bsz, heads, length, generator=g)
    coef, ln_w, ln_b = torch.rand(mb, generator=g), torch.ones(heads, f), torch.zeros(heads, f)
    state = InnerState.from_weights((torch.randn(heads, f, f, generator=g), torch.zeros(heads, 1, f)), bsz)
    state.pos = torch.tensor([1, 3])
    out, new = ttt_dual(*x, lr, coef, ln_w, ln_b, state, lengths=torch.zeros(bsz, dtype=torch.long),
                        backend=backend)
    assert out.shape == x[0].shape and out.abs().max() == 0
    for a, b in zip(new.weights() + new.grads(), state.weights() + state.grads(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(new.pos, state.pos)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_mlp_backend_with_saturated_gelu(backend, dtype) -> None:
    """TTT-MLP pre-activations far out on both sides (|Z1| up to ~100): the compiled tanh-GELU once
    overflowed there (NaN or the wrong branch below -10 in float32, below -21.5 in float64)."""
    impl = _backend(backend)
    assert impl is not None
    inputs64, weights64 = make_inputs(2, 2, 40, 16, 16, True, seed=5)
    weights64[0] = weights64[0] * 30.0
    for sign in (1.0, -1.0):  # mostly-negative and mostly-positive W1 rows included either way
        weights = [weights64[0] * sign, *weights64[1:]]
        z1 = torch.einsum("bhlf,hfk->bhlk", inputs64[1], weights[0])
        assert z1.min() < -40 and z1.max() > 40
        ref_vals, ref_grads, _ = _run(ttt_reference, inputs64, weights, None, None)
        vals, grads, _ = _run(ttt_dual, [t.to(dtype) for t in inputs64], [w.to(dtype) for w in weights], None,
                              None, backend=backend)
        for i, (a, b) in enumerate(zip(vals + grads, ref_vals + ref_grads, strict=True)):
            assert torch.isfinite(a).all(), f"tensor {i} not finite"
            assert rel_err(a, b) <= TOL[dtype], f"tensor {i}: {rel_err(a, b):.2e}"
