"""The compiled normalisations against their PyTorch references.

Tolerances: float64 1e-12 relative (same formulas, sums in another order; the gate's tanh is a
polynomial accurate to ~1e-16); float32 1e-5 relative (ISSUE standard for fp32 fast paths), for the
float32 training RMSNorm against the float64 formula (its own rounding, about 1e-7).
"""

from __future__ import annotations

import pytest
import torch

from ttt.ops.norm import (
    _extension,
    gated_layer_norm_,
    gated_layer_norm_reference,
    rms_norm,
    rms_norm_reference,
)

TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}


def test_extension_builds() -> None:
    assert _extension() is not None, "the compiled normalisations must build on this machine"


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    d = shape[-1]
    y = torch.randn(*shape, dtype=dtype, generator=g) * 3 + 0.5
    w = torch.randn(d, dtype=dtype, generator=g)
    b = torch.randn(d, dtype=dtype, generator=g)
    # the gate: a column block of a wider tensor (as the layer's fused projection output)
    wide = torch.randn(*shape[:-1], 3 * d + 5, dtype=dtype, generator=g) * 4
    return y, w, b, wide[..., d + 3:2 * d + 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 9, 768), (1, 33, 13), (4, 1, 16), (3, 5, 100), (7, 64)])
@pytest.mark.parametrize("gated", [False, True])
def test_gated_layer_norm_equals_reference(dtype, shape, gated) -> None:
    y, w, b, gate = _inputs(shape, dtype, seed=shape[-1] + gated)
    gate = gate if gated else None
    ref = gated_layer_norm_reference(y, w, b, 1e-6, gate)
    buf = y.clone()
    with torch.no_grad():
        out = gated_layer_norm_(buf, w, b, 1e-6, gate)
    assert out.data_ptr() == buf.data_ptr(), "CPU inference writes over the given buffer"
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 9, 768), (1, 33, 13), (4, 1, 16), (7, 100)])
def test_rms_norm_equals_reference(dtype, shape) -> None:
    y, w, _, _ = _inputs(shape, dtype, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(y, w, 1e-6), rms_norm_reference(y, w, 1e-6), **TOL[dtype])


def test_autograd_uses_the_reference() -> None:
    """With gradients needed in float64, RMSNorm is the differentiable reference (computed in float32)."""
    y, w, _, _ = _inputs((2, 5, 32), torch.float64, seed=3)
    w.requires_grad_(True)
    r = rms_norm(y, w)
    assert r.requires_grad and r.grad_fn is not None and "RMSNorm" not in type(r.grad_fn).__name__
    torch.autograd.gradcheck(lambda w_: rms_norm(y, w_).sum(), (w,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 9, 768), (1, 33, 13), (600, 20), (3, 5, 100)])
@pytest.mark.parametrize("gated", [False, True])
def test_gated_layer_norm_training_equals_the_reference(dtype, shape, gated) -> None:
    """Training: the compiled Function's output and every gradient (input, weight, bias, gate) equal the
    float64 reference's autograd; nothing is written over the input."""
    y, w, b, gate = _inputs(shape, dtype, seed=shape[-1] + 2 * gated)
    gate = gate.contiguous() if gated else None
    dout = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
    ins = [t.clone().requires_grad_() for t in (y, w, b, *(() if gate is None else (gate,)))]
    before = ins[0].detach().clone()
    out = gated_layer_norm_(ins[0], ins[1], ins[2], 1e-6, ins[3] if gated else None)
    assert type(out.grad_fn).__name__ == "_GatedLayerNormFunctionBackward"
    assert torch.equal(ins[0].detach(), before)
    out.backward(dout)
    refs = [t.double().requires_grad_() for t in (y, w, b, *(() if gate is None else (gate,)))]
    ref = gated_layer_norm_reference(refs[0], refs[1], refs[2], 1e-6, refs[3] if gated else None)
    ref.backward(dout.double())
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for a, r in zip(ins, refs, strict=True):  # relative to each gradient's largest element
        torch.testing.assert_close(a.grad.double(), r.grad, rtol=TOL[dtype]["rtol"],
                                   atol=TOL[dtype]["atol"] * float(r.grad.abs().max()))


def test_gated_layer_norm_gradcheck() -> None:
    y, w, b, gate = _inputs((3, 4, 10), torch.float64, seed=8)
    args = [t.contiguous().requires_grad_() for t in (y, w, b, gate)]
    torch.autograd.gradcheck(lambda *a: gated_layer_norm_(a[0], a[1], a[2], 1e-6, a[3]), args)
    torch.autograd.gradcheck(lambda *a: gated_layer_norm_(a[0], a[1], a[2], 1e-6), args[:3])


def _rms_formula(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(2, 9, 768), (1, 33, 13), (4, 1, 16), (600, 20), (3, 257, 48)])
@pytest.mark.parametrize("needs", ["both", "x", "weight"])
def test_rms_norm_training_equals_the_formula(shape, needs) -> None:
    """float32 training: the compiled Function's output and gradients equal the float64 formula's
    autograd (rows over several 256-row weight blocks, widths that are not a multiple of the vector)."""
    x, w, _, _ = _inputs(shape, torch.float32, seed=shape[0] + shape[-1])
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    xa, wa = x.clone().requires_grad_(needs != "weight"), w.clone().requires_grad_(needs != "x")
    y = rms_norm(xa, wa)
    assert type(y.grad_fn).__name__ == "_RMSNormFunctionBackward"
    y.backward(dy)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    ref = _rms_formula(x64, w64)
    ref.backward(dy.double())
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), ref, **tol)
    if needs != "weight":
        torch.testing.assert_close(xa.grad.double(), x64.grad, **tol)
    else:
        assert xa.grad is None
    if needs != "x":
        torch.testing.assert_close(wa.grad.double(), w64.grad, rtol=1e-5, atol=1e-5 * shape[0])
    else:
        assert wa.grad is None


def test_rms_norm_training_weight_grad_does_not_depend_on_threads() -> None:
    """d weight sums fixed 256-row blocks in order: bit-identical for any thread count."""
    x, w, _, _ = _inputs((1000, 64), torch.float32, seed=2)
    dy = torch.randn(1000, 64, generator=torch.Generator().manual_seed(3))
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            wa = w.clone().requires_grad_()
            rms_norm(x, wa).backward(dy)
            grads.append(wa.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


def test_rms_norm_backward_checks_its_inputs() -> None:
    ext = _extension()
    x, w = torch.randn(4, 8), torch.ones(8)
    _, rstd = ext.rms_norm_forward(x, w, 1e-6)
    with pytest.raises(RuntimeError, match="rstd must hold one"):
        ext.rms_norm_backward(torch.randn(4, 8), x, w, rstd[:3])
    with pytest.raises(RuntimeError, match="does not match x"):
        ext.rms_norm_backward(torch.randn(4, 7), x, w, rstd)


def test_non_contiguous_and_other_dtypes_fall_back() -> None:
    y, w, b, gate = _inputs((3, 4, 24), torch.float32, seed=5)
    yt = y.transpose(0, 1)  # not contiguous: no in-place kernel, the reference result
    with torch.no_grad():
        ref = gated_layer_norm_reference(yt, w, b, 1e-6)
        torch.testing.assert_close(gated_layer_norm_(yt, w, b, 1e-6), ref)
        yb, wb = y.bfloat16(), w.bfloat16()
        torch.testing.assert_close(rms_norm(yb, wb), rms_norm_reference(yb, wb))


def test_bad_shapes_are_rejected_by_the_kernel() -> None:
    ext = _extension()
    y = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="does not fit"):
        ext.rms_norm(y, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="gate must be"):
        ext.layer_norm_gate_(y, torch.ones(8), torch.zeros(8), 1e-6, torch.randn(4, 7))


def test_unbuildable_library_warns_once_and_falls_back(monkeypatch, tmp_path) -> None:
    """Without a compiler: one RuntimeWarning naming what runs instead, then the PyTorch references."""
    import ttt.ops.extension as extension
    import ttt.ops.norm as norm

    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TTT_EXTENSIONS_DIR", str(tmp_path / "cache"))  # nothing built there
    monkeypatch.setattr(norm, "_EXT", [])
    monkeypatch.delitem(extension._LOADED, "ttt_norm", raising=False)  # as in a fresh process
    y, w, b, gate = _inputs((2, 3, 16), torch.float32, seed=1)
    with pytest.warns(RuntimeWarning, match="compiled normalisations unavailable .*no C\\+\\+ compiler"):
        with torch.no_grad():
            out = rms_norm(y, w)
    torch.testing.assert_close(out, rms_norm_reference(y, w))
    with torch.no_grad():
        torch.testing.assert_close(gated_layer_norm_(y.clone(), w, b, 1e-6, gate),
                                   gated_layer_norm_reference(y, w, b, 1e-6, gate))
    assert norm._EXT == [None]
