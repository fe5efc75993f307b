"""The compiled channels-last causal conv against the ``F.conv1d`` reference (outputs, state, gradients).

Tolerances: float64 1e-12 (the two sum the same K products in different orders); bf16 inputs are
compared loosely (rtol 2e-2) since both round to bf16.
"""

from __future__ import annotations

import pytest
import torch

from ttt.ops.conv import _extension, causal_conv1d, causal_conv1d_reference

F64 = {"rtol": 1e-12, "atol": 1e-12}


def test_extension_builds() -> None:
    assert _extension() is not None, "the compiled causal conv must build on this machine"


@pytest.mark.parametrize("bsz,length,dim,k", [(2, 7, 5, 4), (1, 1, 3, 4), (3, 2, 130, 4), (2, 9, 4, 1),
                                               (2, 5, 3, 6), (1, 40, 64, 3), (2, 150, 130, 4)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_compiled_equals_reference(bsz, length, dim, k, with_state, with_lengths) -> None:
    g = torch.Generator().manual_seed(bsz * 100 + length)
    x = torch.randn(bsz, length, dim, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(dim, 1, k, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(dim, dtype=torch.float64, generator=g, requires_grad=True)
    state = (torch.randn(bsz, dim, k - 1, dtype=torch.float64, generator=g, requires_grad=True)
             if with_state else None)
    lengths = torch.randint(0, length + 1, (bsz,), generator=g) if with_lengths else None
    y, st = causal_conv1d(x, w, b, state, lengths)
    y_ref, st_ref = causal_conv1d_reference(x, w, b, state, lengths)
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(st, st_ref, **F64)
    leaves = [t for t in (x, w, b, state) if t is not None]
    gy, gs = torch.randn_like(y), torch.randn_like(st)
    grads = torch.autograd.grad((y * gy).sum() + (st * gs).sum(), leaves)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (st_ref * gs).sum(), leaves)
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, **F64)


@pytest.mark.parametrize("with_state", [False, True])
def test_strided_input(with_state) -> None:
    """x may be a column block of a wider tensor (the layer's fused projections): read in place."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(2, 150, 3 * 70, dtype=torch.float64, generator=g, requires_grad=True)
    x = wide[..., 70:140]
    w = torch.randn(70, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(70, dtype=torch.float64, generator=g)
    state = torch.randn(2, 70, 3, dtype=torch.float64, generator=g) if with_state else None
    y, st = causal_conv1d(x, w, b, state)
    y_ref, st_ref = causal_conv1d_reference(x.contiguous(), w, b, state)
    torch.testing.assert_close(y, y_ref, **F64)
    torch.testing.assert_close(st, st_ref, **F64)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad((y * gy).sum(), (wide, w))
    grads_ref = torch.autograd.grad((y_ref * gy).sum(), (wide, w))
    for a, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, r, **F64)


def test_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 1, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.randn(2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d(*a)[0], (x, w, b, s))


def test_bf16_close_to_reference() -> None:
    x = torch.randn(2, 33, 48).bfloat16()
    w, b = torch.randn(48, 1, 4), torch.randn(48)
    y, _ = causal_conv1d(x, w, b)
    y_ref, _ = causal_conv1d_reference(x.double(), w.double(), b.double())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=5e-2)


def test_fallback_when_extension_unavailable(monkeypatch) -> None:
    import ttt.ops.conv as conv

    monkeypatch.setattr(conv, "_EXT", [None])
    x, w = torch.randn(1, 5, 4), torch.randn(4, 1, 4)
    torch.testing.assert_close(conv.causal_conv1d(x, w)[0], causal_conv1d_reference(x, w)[0])


@pytest.mark.parametrize("path", ["compiled", "compiled-grad", "reference"])
def test_out_buffer(monkeypatch, path) -> None:
    """``out=``: y lands in the given tensor and is returned as it, bit-identical to a fresh y, written
    directly without autograd and copied in with it or on the reference path; the new state is its own
    memory; a wrong buffer is refused with its description."""
    import ttt.ops.conv as conv

    if path == "reference":
        monkeypatch.setattr(conv, "_EXT", [None])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 6, dtype=torch.float64, generator=g, requires_grad=path == "compiled-grad")
    w = torch.randn(6, 1, 4, dtype=torch.float64, generator=g)
    b = torch.randn(6, dtype=torch.float64, generator=g)
    state = torch.randn(2, 6, 3, dtype=torch.float64, generator=g)
    y_ref, st_ref = conv.causal_conv1d(x, w, b, state)
    buf = torch.full((2, 9, 6), float("nan"), dtype=torch.float64)
    y, st = conv.causal_conv1d(x, w, b, state, out=buf)
    assert y.data_ptr() == buf.data_ptr() and torch.equal(y, y_ref) and torch.equal(st, st_ref)
    assert st.untyped_storage().data_ptr() != buf.untyped_storage().data_ptr()
    if path == "compiled-grad":
        assert y.requires_grad
    for bad in (buf[:, :-1].clone(), buf.float(), buf.transpose(0, 1).contiguous().transpose(0, 1)):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            conv.causal_conv1d(x, w, b, state, out=bad)
