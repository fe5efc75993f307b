"""The Triton backend: interpreter runs on CPU equal the token-by-token reference; kernels compile for GPUs.

Interpreter tests set ``TRITON_INTERPRET=1`` per test (the backend loads an interpreted copy of the
kernels whenever it is set at call time, so import order and xdist workers do not matter) and force
``ieee`` dot precision. The float32 Triton results are compared with the float64 reference, so the
tolerance (1e-5 relative to the largest entry) only absorbs float32 rounding.
Ahead-of-time compilation (``triton.compile`` for ``sm_80`` / ``sm_90``) needs no GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install 'ttt[gpu]' or '.[dev]')")

from ttt.ops import InnerState, scan, ttt_dual, ttt_reference, ttt_step  # noqa: E402
from ttt.ops.scan import torch_scan, triton_scan  # noqa: E402

REL = 1e-5


def make(bsz: int, heads: int, length: int, f: int, mb: int, mlp: bool, seed: int = 0):
    """float64 inputs and initial weights (cast to float32 for the kernels)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    xq, xk, xv = r(bsz, heads, length, f), r(bsz, heads, length, f), r(bsz, heads, length, f)
    lr = torch.rand(bsz, heads, length, generator=g, dtype=torch.float64) * 0.5
    coef = 1.0 / torch.arange(1, mb + 1, dtype=torch.float64)
    ln_w, ln_b = 1 + r(heads, f, scale=0.1), r(heads, f, scale=0.1)
    f1 = 4 * f if mlp else f
    weights = [r(heads, f, f1, scale=0.1), r(heads, 1, f1, scale=0.1)]
    if mlp:
        weights += [r(heads, f1, f, scale=0.1), r(heads, 1, f, scale=0.1)]
    return [xq, xk, xv, lr, coef, ln_w, ln_b], weights


def f32(ts):
    return [t.float() for t in ts]


def close(a: torch.Tensor, ref: torch.Tensor, rel: float = REL) -> None:
    err = (a.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * max(scale, 1e-30), f"max error {err:.3g} > {rel:g} * {scale:.3g}"


def states_close(a: InnerState, b: InnerState) -> None:
    for x, y in zip(a.weights() + a.grads(), b.weights() + b.grads(), strict=True):
        close(x, y)
    assert torch.equal(a.pos.cpu(), b.pos.cpu())


@pytest.fixture
def calls(monkeypatch):
    """Interpreter mode, exact dots, the triton backend registered; counts the kernel launches."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(triton_scan.PRECISION_ENV, "ieee")
    monkeypatch.delenv(scan.ENV_VAR, raising=False)
    backend = triton_scan.load()
    monkeypatch.setitem(scan._LOADED, "triton", backend)
    counts = {"forward": 0, "backward": 0, "decode": 0}
    for name in counts:
        orig = getattr(backend, name)

        def wrapped(*a, _orig=orig, _name=name, **kw):
            counts[_name] += 1
            return _orig(*a, **kw)

        monkeypatch.setattr(backend, name, wrapped)
    return counts


# --------------------------------------------------------------------------------------------------
# forward, carried state, ragged lengths
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mlp", [False, True])
def test_forward_equals_reference(calls, mlp) -> None:
    args, weights = make(2, 1, 19, 16, 8, mlp, seed=1)  # 3 mini-batches, the last one open
    out_ref, st_ref = ttt_reference(*args, InnerState.from_weights(weights, 2))
    out, st = ttt_dual(*f32(args), InnerState.from_weights(f32(weights), 2), backend="triton")
    assert calls["forward"] == 1
    close(out, out_ref)
    states_close(st, st_ref)


@pytest.mark.parametrize("mlp", [False, True])
def test_carried_state_and_ragged_lengths(calls, mlp) -> None:
    """Rows carry open mini-batches (0, 1, 3 tokens in) and have different real lengths."""
    args, weights = make(3, 1, 13, 16, 8, mlp, seed=2)
    pre, _ = make(3, 1, 3, 16, 8, mlp, seed=3)
    state = InnerState.from_weights(weights, 3)
    _, state = ttt_reference(*pre[:4], *args[4:], state, lengths=torch.tensor([0, 1, 3]))
    lengths = torch.tensor([13, 6, 0])
    out_ref, st_ref = ttt_reference(*args, state, lengths=lengths)
    st32 = InnerState(*[None if t is None else (t.float() if t.is_floating_point() else t)
                        for t in (state.W1, state.b1, state.gW1, state.gb1, state.pos, state.W2, state.b2,
                                  state.gW2, state.gb2)])
    out, st = ttt_dual(*f32(args), st32, lengths=lengths, backend="triton")
    assert calls["forward"] == 1
    close(out, out_ref)
    states_close(st, st_ref)
    assert out[2].abs().max() == 0


def test_without_inner_layernorm(calls) -> None:
    args, weights = make(2, 1, 16, 16, 8, False, seed=4)
    out_ref, st_ref = ttt_reference(*args, InnerState.from_weights(weights, 2), ln_residual=False)
    out, st = ttt_dual(*f32(args), InnerState.from_weights(f32(weights), 2), ln_residual=False,
                       backend="triton")
    assert calls["forward"] == 1
    close(out, out_ref)
    states_close(st, st_ref)


def test_low_precision_inputs_are_loaded_as_float32(calls) -> None:
    """bf16 / fp16 scan inputs give exactly what their float32 casts give (the state stays fp32)."""
    torch.manual_seed(0)
    rows, n, b, f = 2, 2, 16, 16
    k, q, s = (torch.randn(rows, n, b, f) for _ in range(3))
    lr, coef = torch.rand(rows, n, b) * 0.3, 1.0 / torch.arange(1, b + 1.0)
    lnw = 1 + 0.1 * torch.randn(rows, f)
    state = tuple(0.1 * torch.randn(rows, *sh) for sh in [(f, f), (1, f), (f, f), (1, f)])
    nc = torch.tensor([n, n])
    be = scan._LOADED["triton"]
    for dt in (torch.bfloat16, torch.float16):
        lo = [t.to(dt) for t in (k, q, s, lr)]
        z_lo, st_lo, _ = be.forward(*lo, coef, lnw, nc, state, 1, False)
        z_32, st_32, _ = be.forward(*[t.float() for t in lo], coef, lnw, nc, state, 1, False)
        assert z_lo.dtype == dt
        assert torch.equal(z_lo, z_32.to(dt))
        assert all(torch.equal(a, c) for a, c in zip(st_lo, st_32))


# --------------------------------------------------------------------------------------------------
# backward: every parameter gradient
# --------------------------------------------------------------------------------------------------

def _grads(fn, args, weights, lengths, group, **kw):
    leaves = [t.clone().requires_grad_() for t in args + weights]
    state = InnerState.from_weights(tuple(leaves[7:]), args[0].shape[0])
    out, st = fn(*leaves[:7], state, lengths=lengths, **kw)
    wgt = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    loss = (out * wgt).sum() + sum((w * w).sum() for w in st.weights() + st.grads())
    loss.backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("mlp", [False, True])
def test_gradients_equal_reference(calls, mlp) -> None:
    """Two checkpoint groups (group 2 over 3 mini-batches), a ragged row, all 7 + weight gradients."""
    args, weights = make(2, 1, 21, 16, 8, mlp, seed=5)
    lengths = torch.tensor([21, 12])
    ref = _grads(ttt_reference, args, weights, lengths, 0)
    got = _grads(ttt_dual, f32(args), f32(weights), lengths, 0, remat_group_size=2, backend="triton")
    assert calls["forward"] == 1 and calls["backward"] == 1
    for name, g, g_ref in zip(["xq", "xk", "xv", "lr", "coef", "ln_w", "ln_b", "W1", "b1", "W2", "b2"],
                              got, ref):
        assert g is not None, name
        close(g, g_ref)
    assert len(got) == (11 if mlp else 9)


@pytest.mark.parametrize("mlp,b,f", [(False, 8, 16), (True, 8, 16), (True, 16, 32)])
def test_backward_with_carried_gradient_sums(calls, mlp, b, f) -> None:
    """Backend level: non-zero initial accumulators, a row that never closes, group 1 and 3.

    TTT-MLP at head dim 32 tiles the hidden dimension differently in the forward (BH 64, 2 tiles) and
    in the backward's recompute (BH 32, 4 tiles).
    """
    torch.manual_seed(1)
    rows, n = 2, 3
    f1 = 4 * f if mlp else f
    k, q, s = (torch.randn(rows, n, b, f) for _ in range(3))
    lr, coef = torch.rand(rows, n, b) * 0.3, 1.0 / torch.arange(1, b + 1.0)
    lnw = 1 + 0.1 * torch.randn(rows, f)
    shapes = [(f, f1), (1, f1), (f1, f), (1, f)] if mlp else [(f, f1), (1, f1)]
    state = tuple(0.1 * torch.randn(rows, *sh) for sh in shapes + shapes)
    nc = torch.tensor([n, 0])
    be = scan._LOADED["triton"]
    for group in (1, 3):
        z_ref, fin_ref, ck_ref = torch_scan.scan_forward(k, q, s, lr, coef, lnw, nc, state, group, True)
        z, fin, ck = be.forward(k, q, s, lr, coef, lnw, nc, state, group, True)
        close(z, z_ref)
        for a, c in zip(fin, fin_ref):
            close(a, c)
        dz = torch.randn_like(z_ref)
        dfin = tuple(torch.randn_like(t) for t in fin_ref)
        ref = torch_scan.scan_backward(k, q, s, lr, coef, lnw, nc, ck_ref, group, dz, dfin)
        got = be.backward(k, q, s, lr, coef, lnw, nc, ck, group, dz, dfin)
        for a, c in zip(got, ref, strict=True):
            close(a, c)


# TF32 is not emulated by the interpreter (it multiplies in fp32); this truncates the fp32 operands of
# every dot the kernels request in TF32 to 10 mantissa bits, as tensor cores do, to measure its error.
TF32_TOL = {False: 5e-3, True: 3e-2}  # TTT-Linear, TTT-MLP: observed 1.6e-3 and 1e-2 (docs/triton.md)


@pytest.mark.parametrize("mlp", [False, True])
def test_tf32_dots_stay_within_the_documented_tolerance(calls, monkeypatch, mlp) -> None:
    import numpy as np
    import triton.runtime.interpreter as ti

    monkeypatch.setenv(triton_scan.PRECISION_ENV, "tf32")
    builder = ti.interpreter_builder
    orig, seen = builder.create_dot, []

    def trunc(x):
        return (np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)

    def create_dot(a, b, d, input_precision, max_num_imprecise_acc):
        if "TF32" in repr(input_precision) and a.data.dtype == np.float32:
            seen.append(1)
            a, b = ti.TensorHandle(trunc(a.data), a.dtype), ti.TensorHandle(trunc(b.data), b.dtype)
        return orig(a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(builder, "create_dot", create_dot)
    args, weights = make(2, 1, 21, 16, 8, mlp, seed=5)
    lengths = torch.tensor([21, 12])
    ref = _grads(ttt_reference, args, weights, lengths, 0)
    got = _grads(ttt_dual, f32(args), f32(weights), lengths, 0, remat_group_size=2, backend="triton")
    assert seen and calls["backward"] == 1
    errs = [((g.double() - r).abs().max() / r.abs().max()).item() for g, r in zip(got, ref)]
    assert max(errs) <= TF32_TOL[mlp], errs
    assert max(errs) > 1e-5  # the truncation did act: fp32 dots would be ~1e-7


# --------------------------------------------------------------------------------------------------
# decode step
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mlp", [False, True])
def test_decode_steps_equal_dual_form(calls, monkeypatch, mlp) -> None:
    """Token-by-token fused decode (one row idle for a step) equals the dual form over the chunk."""
    args, weights = make(2, 2, 10, 16, 4, mlp, seed=6)
    args, weights = f32(args), f32(weights)
    monkeypatch.setenv(scan.ENV_VAR, "triton")
    state = InnerState.from_weights(weights, 2)
    outs = []
    for t in range(10):
        sl = slice(t, t + 1)
        lengths = torch.tensor([1, 0]) if t == 4 else None
        out, state = ttt_step(args[0][:, :, sl], args[1][:, :, sl], args[2][:, :, sl], args[3][:, :, sl],
                              *args[4:], state, lengths=lengths)
        outs.append(out)
    assert calls["decode"] == 10 and calls["forward"] == 0
    monkeypatch.setenv(scan.ENV_VAR, "torch")
    # the same tokens through the dual form: row 1 skips token 4
    s0 = InnerState.from_weights(weights, 2)
    keep1 = [t for t in range(10) if t != 4]
    o0, st0 = ttt_dual(*[a[:1] for a in args[:4]], *args[4:], s0.index_select(torch.tensor([0])))
    o1, st1 = ttt_dual(*[a[1:, :, keep1] for a in args[:4]], *args[4:], s0.index_select(torch.tensor([1])))
    got = torch.cat(outs, 2)
    close(got[:1], o0)
    close(got[1:, :, keep1], o1)
    assert got[1, :, 4].abs().max() == 0
    states_close(state.index_select(torch.tensor([0])), st0)
    states_close(state.index_select(torch.tensor([1])), st1)


# --------------------------------------------------------------------------------------------------
# dispatch and visible fallback
# --------------------------------------------------------------------------------------------------

def test_unsupported_inputs_fall_back_with_a_warning(calls, monkeypatch) -> None:
    be = scan._LOADED["triton"]
    k = torch.zeros(2, 1, 16, 16)
    st = (torch.zeros(2, 16, 16), torch.zeros(2, 1, 16)) * 2
    assert be.unsupported(k, torch.ones(2, 16), st) is None
    assert "float64" in be.unsupported(k.double(), None, tuple(t.double() for t in st))
    assert "head dim 24" in be.unsupported(torch.zeros(2, 1, 16, 24), None, st)
    assert "mini-batch size 4" in be.unsupported(torch.zeros(2, 1, 4, 16), None, st)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "cpu tensors" in be.unsupported(k, None, st)
    monkeypatch.setattr(scan, "_WARNED", set())
    args, weights = make(1, 1, 8, 16, 8, False)
    with pytest.warns(RuntimeWarning, match="does not support these inputs"):
        out, _ = ttt_dual(*f32(args), InnerState.from_weights(f32(weights), 1), backend="triton")
    ref, _ = ttt_dual(*f32(args), InnerState.from_weights(f32(weights), 1), backend="torch")
    assert torch.equal(out, ref) and calls["forward"] == 0
    # auto never picks triton for CPU tensors
    assert scan.resolve_backend(k, None, st, "auto").name != "triton"


def test_kernel_that_does_not_fit_the_gpu_falls_back(calls, monkeypatch) -> None:
    """A launch refused for lack of shared memory (e.g. a 100 KiB GPU) runs the PyTorch scan instead."""
    from triton.runtime.errors import OutOfResources

    class Refuses:
        def __getitem__(self, grid):
            def launch(*a, **kw):
                raise OutOfResources(300000, 101376, "shared memory")
            return launch

    mod = triton_scan.kernels(True)
    monkeypatch.setattr(mod, "linear_fwd_kernel", Refuses())
    monkeypatch.setattr(scan, "_WARNED", set())
    args, weights = make(2, 1, 16, 16, 8, False)
    with pytest.warns(RuntimeWarning, match="does not fit this GPU"):
        got = _grads(ttt_dual, f32(args), f32(weights), None, 0, backend="triton")
    ref = _grads(ttt_dual, f32(args), f32(weights), None, 0, backend="torch")
    assert calls["forward"] == 1 and calls["backward"] == 1
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


def test_gpu_sizes_over_the_shared_memory_budget_are_refused() -> None:
    assert triton_scan.supported_config("linear_fwd", 16, 64) is None
    assert triton_scan.supported_config("mlp_bwd", 8, 64) is None  # mini-batch 8 runs as BB = 16
    assert "not verified" in triton_scan.supported_config("linear_bwd", 16, 128)
    assert "not verified" in triton_scan.supported_config("mlp_bwd", 64, 64)


def test_precision_setting(monkeypatch) -> None:
    monkeypatch.setenv(triton_scan.PRECISION_ENV, "tf32")
    assert triton_scan.dot_precision() == "tf32"
    monkeypatch.delenv(triton_scan.PRECISION_ENV)
    assert triton_scan.dot_precision() == ("ieee" if torch.get_float32_matmul_precision() == "highest"
                                           else "tf32")
    monkeypatch.setenv(triton_scan.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError):
        triton_scan.dot_precision()


# --------------------------------------------------------------------------------------------------
# ahead-of-time compilation for real GPUs (no GPU needed)
# --------------------------------------------------------------------------------------------------

def _compile_fits(cfg: triton_scan.Config, cc: int) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = triton_scan.aot_compile(cfg, cc)
    shared = kernel.metadata.shared
    assert shared <= triton_scan.SHARED_LIMIT[cc], f"{cfg} needs {shared} B of shared memory on sm_{cc}"
    return shared


# the configuration of the 125m model (head dim 64, mini-batch 16) with TF32 dots (what A100/H100
# users get under torch's "high" matmul precision), each kernel on one of the two targets (a few
# seconds to a minute per compile on 2 CPU cores; the slow test covers every pair)
_DEFAULT = [("linear_fwd", 90), ("linear_bwd", 80), ("mlp_fwd", 80), ("mlp_bwd", 90)]


@pytest.mark.parametrize("kind,cc", _DEFAULT)
def test_aot_compile_head64_minibatch16(kind, cc) -> None:
    assert triton_scan.supported_config(kind, 16, 64) is None
    _compile_fits(triton_scan.scan_config(kind, 16, 64, True, True, "tf32"), cc)


@pytest.mark.parametrize("mlp,cc", [(False, 80), (True, 90)])
def test_aot_compile_decode(mlp, cc) -> None:
    _compile_fits(triton_scan.decode_config(64, mlp), cc)


@pytest.mark.slow
@pytest.mark.parametrize("cc", [80, 90])
def test_aot_compile_every_dispatchable_config(cc) -> None:
    """Every configuration the backend may launch compiles and fits (hours on 2 CPU cores)."""
    picked = [c for c in triton_scan.all_configs()
              if c.kernel.endswith("decode_kernel")
              or triton_scan.supported_config(c.kernel[:-7], c.consts["B"], c.consts["F"]) is None]
    assert len(picked) >= 4 * 2 * 2  # at least head dim 64 / mini-batch 16 of every kernel
    for cfg in picked:
        _compile_fits(cfg, cc)
