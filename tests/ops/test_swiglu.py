"""The compiled SwiGLU gate against its PyTorch reference.

Tolerances: float64 1e-12 relative (the same formula; the exp is a polynomial accurate to ~1e-16);
float32 1e-5 relative against the float64 reference (ISSUE standard for fp32 fast paths).
"""

from __future__ import annotations

import pytest
import torch

from ttt.ops.swiglu import _extension, swiglu, swiglu_reference

TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def test_extension_builds() -> None:
    assert _extension() is not None, "the compiled SwiGLU must build on this machine"


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(*shape, dtype=dtype, generator=g) * 4
    up = torch.randn(*shape, dtype=dtype, generator=g)
    dh = torch.randn(*shape, dtype=dtype, generator=g)
    return gate, up, dh


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 9, 1376), (1, 33, 13), (5,), (3, 100), (40000,)])
def test_forward_and_backward_equal_the_reference(dtype, shape) -> None:
    gate, up, dh = _inputs(shape, dtype, seed=shape[-1])
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    h = swiglu(g, u)
    assert type(h.grad_fn).__name__ == "_SwiGLUFunctionBackward"
    h.backward(dh)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    ref = swiglu_reference(g64, u64)
    ref.backward(dh.double())
    torch.testing.assert_close(h.double(), ref, **TOL[dtype])
    torch.testing.assert_close(g.grad.double(), g64.grad, **TOL[dtype])
    torch.testing.assert_close(u.grad.double(), u64.grad, **TOL[dtype])


def test_gradcheck_float64() -> None:
    gate, up, _ = _inputs((3, 17), torch.float64, seed=4)
    torch.autograd.gradcheck(swiglu, (gate.requires_grad_(), up.requires_grad_()))


def test_only_one_input_needs_grad() -> None:
    gate, up, dh = _inputs((4, 24), torch.float32, seed=5)
    u = up.clone().requires_grad_()
    swiglu(gate, u).backward(dh)
    u64 = up.double().requires_grad_()
    swiglu_reference(gate.double(), u64).backward(dh.double())
    torch.testing.assert_close(u.grad.double(), u64.grad, **TOL[torch.float32])


def test_extreme_values() -> None:
    """Large |gate| neither overflows nor loses the sign: silu(g) -> g for g >> 0, -> -0 for g << 0."""
    g = torch.tensor([-1e4, -100.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 100.0, 1e4])
    u = torch.linspace(-2, 2, 9)
    with torch.no_grad():
        torch.testing.assert_close(swiglu(g, u), swiglu_reference(g, u), rtol=1e-6, atol=1e-30)
    ga, ua = g.clone().requires_grad_(), u.clone().requires_grad_()
    swiglu(ga, ua).sum().backward()
    gb, ub = g.clone().requires_grad_(), u.clone().requires_grad_()
    swiglu_reference(gb, ub).sum().backward()
    torch.testing.assert_close(ga.grad, gb.grad, rtol=1e-6, atol=1e-30)
    torch.testing.assert_close(ua.grad, ub.grad, rtol=1e-6, atol=1e-30)


def test_inference_in_place() -> None:
    gate, up, _ = _inputs((2, 5, 32), torch.float32, seed=6)
    ref = swiglu_reference(gate, up)
    buf = gate.clone()
    with torch.no_grad():
        out = swiglu(buf, up, inplace=True)
    assert out.data_ptr() == buf.data_ptr()
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    with torch.no_grad():  # not in place: the inputs are left alone
        keep = gate.clone()
        torch.testing.assert_close(swiglu(gate, up), ref, **TOL[torch.float32])
        assert torch.equal(gate, keep)


def test_other_dtypes_and_broadcasting_fall_back() -> None:
    gate, up, _ = _inputs((3, 4, 8), torch.float32, seed=7)
    torch.testing.assert_close(swiglu(gate.bfloat16(), up.bfloat16()),
                               swiglu_reference(gate.bfloat16(), up.bfloat16()))
    torch.testing.assert_close(swiglu(gate, up[:1]), swiglu_reference(gate, up[:1]))  # broadcast up
    t = gate.transpose(0, 1)  # not contiguous: made contiguous, same values
    torch.testing.assert_close(swiglu(t, up.transpose(0, 1)), swiglu_reference(t, up.transpose(0, 1)),
                               **TOL[torch.float32])


def test_bad_inputs_are_rejected_by_the_kernel() -> None:
    ext = _extension()
    gate = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="up must be a contiguous CPU Float tensor of shape"):
        ext.forward(gate, torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="dh must be"):
        ext.backward(torch.randn(4, 8, dtype=torch.float64), gate, torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="gate must be a contiguous CPU float32/float64"):
        ext.forward(gate.half(), gate.half())


def test_unbuildable_library_warns_once_and_falls_back(monkeypatch, tmp_path) -> None:
    """Without a compiler: one RuntimeWarning naming what runs instead, then the PyTorch reference."""
    import ttt.ops.extension as extension
    import ttt.ops.swiglu as mod

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TTT_EXTENSIONS_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(mod, "_EXT", [])
    monkeypatch.delitem(extension._LOADED, "ttt_swiglu", raising=False)
    gate, up, _ = _inputs((2, 3, 16), torch.float32, seed=1)
    with pytest.warns(RuntimeWarning, match="compiled SwiGLU unavailable .*no C\\+\\+ compiler"):
        out = swiglu(gate, up)
    torch.testing.assert_close(out, swiglu_reference(gate, up))
    with torch.no_grad():
        torch.testing.assert_close(swiglu(gate.clone(), up, inplace=True), swiglu_reference(gate, up))
    assert mod._EXT == [None]
