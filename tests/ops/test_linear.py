"""The packed-weight GEMM (MKL's packed routines) against ``F.linear``.

Tolerance: float32, ``rtol = atol = 1e-5`` against the reference (the same products, summed in a
possibly different order), with inputs of unit scale and weights of scale ``1 / sqrt(K)``.
"""

from __future__ import annotations

import copy
import platform

import pytest
import torch

from ttt.ops import linear as L
from ttt.ops.linear import PackedWeight, linear_reference, pack_weight, packed_linear, packing_available

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _needs_packing() -> None:
    if not packing_available():
        pytest.skip("this PyTorch build has no MKL packed GEMM")


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.machine() == "x86_64"),
                    reason="PyTorch links MKL on x86-64 Linux")
def test_available_with_mkl() -> None:
    """Where PyTorch has MKL (its x86-64 Linux builds), the packed GEMM must load and pass its check."""
    if not torch.backends.mkl.is_available():
        pytest.skip("this PyTorch build has no MKL")
    assert packing_available()


def _operands(rows: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) / k**0.5


@pytest.mark.parametrize("rows,n,k", [(1, 7, 5), (3, 40, 24), (16, 64, 64), (37, 2316, 768),
                                      (2048, 768, 768), (5, 1, 300)])
def test_matches_reference(rows, n, k) -> None:
    _needs_packing()
    x, w = _operands(rows, n, k)
    p = pack_weight(w, rows)
    assert isinstance(p, PackedWeight) and (p.rows, p.out_features, p.in_features) == (rows, n, k)
    with torch.no_grad():
        y = packed_linear(x, p)
    assert y.shape == (rows, n) and y.dtype == torch.float32
    torch.testing.assert_close(y, linear_reference(x, w), **TOL)


def test_batched_strided_and_out() -> None:
    """``x [..., K]`` (leading dimensions flattened into the packed row count), rows that are a slice of a
    wider buffer, a transposed ``x`` (copied), and ``out``: the result lands in ``out``."""
    _needs_packing()
    x, w = _operands(2 * 9, 33, 20)
    ref = linear_reference(x, w)
    p = pack_weight(w, 18)
    with torch.no_grad():
        torch.testing.assert_close(packed_linear(x.view(2, 9, 20), p), ref.view(2, 9, 33), **TOL)
        wide = torch.randn(18, 50)
        wide[:, 7:27] = x
        torch.testing.assert_close(packed_linear(wide[:, 7:27], p), ref, **TOL)
        torch.testing.assert_close(packed_linear(x.t().contiguous().t(), p), ref, **TOL)
        out = torch.full((2, 9, 33), float("nan"))
        y = packed_linear(x.view(2, 9, 20), p, out=out)
    assert y is out
    torch.testing.assert_close(out, ref.view(2, 9, 33), **TOL)


def test_weight_changes_need_a_new_packing() -> None:
    """A packing is a copy: it keeps the weight it was made from."""
    _needs_packing()
    x, w = _operands(4, 8, 6)
    p = pack_weight(w, 4)
    before = linear_reference(x, w)
    w.mul_(2)
    with torch.no_grad():
        torch.testing.assert_close(packed_linear(x, p), before, **TOL)
        torch.testing.assert_close(packed_linear(x, pack_weight(w, 4)), 2 * before, **TOL)


def test_bad_inputs() -> None:
    _needs_packing()
    x, w = _operands(4, 8, 6)
    p = pack_weight(w, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="packed for 4 rows, x has 5"):
            packed_linear(torch.randn(5, 6), p)
        with pytest.raises(ValueError, match=r"x must be float32 \[\.\.\., 6\]"):
            packed_linear(x.double(), p)
        with pytest.raises(ValueError, match=r"x must be float32 \[\.\.\., 6\]"):
            packed_linear(torch.randn(4, 7), p)
        with pytest.raises(ValueError, match="out must be contiguous"):
            packed_linear(x, p, out=torch.empty(4, 9))
        with pytest.raises(ValueError, match="out must be contiguous"):
            packed_linear(x, p, out=torch.empty(8, 4).t())
    with pytest.raises(ValueError, match="no backward"):
        packed_linear(x.requires_grad_(), p)
    with pytest.raises(RuntimeError, match="not a packed weight"):  # the C++ op checks its header
        L._extension().linear_out(x.detach(), torch.zeros(200, dtype=torch.uint8), torch.empty(4, 8))


def test_a_copied_packing_is_refused(tmp_path) -> None:
    """MKL's packed data is tied to its address: a copy of the packed tensor (clone, deepcopy, a round trip
    through a file) gives a one-line error instead of a wrong product; the original keeps working."""
    _needs_packing()
    x, w = _operands(16, 40, 24)
    p = pack_weight(w, 16)
    torch.save(p.data, tmp_path / "packed.pt")
    copies = {"clone": p.data.clone(), "deepcopy": copy.deepcopy(p).data,
              "file": torch.load(tmp_path / "packed.pt", weights_only=True)}
    with torch.no_grad():
        for how, data in copies.items():
            assert torch.equal(data, p.data), how  # byte for byte the same...
            with pytest.raises(RuntimeError, match="copied or moved from where it was packed"):
                packed_linear(x, PackedWeight(data, 16, 40, 24))  # ...and refused
        torch.testing.assert_close(packed_linear(x, p), linear_reference(x, w), **TOL)


@pytest.mark.skipif(platform.system() != "Linux", reason="huge-page allocation is Linux-only")
def test_large_packings_are_huge_page_aligned() -> None:
    """On Linux the packing of a weight of 4 MiB or more gets its own 2 MiB-aligned allocation (advised for
    transparent huge pages); smaller ones come from ATen's allocator. Both compute the same product."""
    _needs_packing()
    for rows, n, k in ((256, 2316, 768), (64, 768, 768)):
        x, w = _operands(rows, n, k)
        p = pack_weight(w, rows)
        if w.numel() * 4 >= 4 << 20:
            assert p.data.data_ptr() % (1 << 21) == 0
        with torch.no_grad():
            torch.testing.assert_close(packed_linear(x, p), linear_reference(x, w), **TOL)


def test_where_packing_does_not_apply() -> None:
    """Not float32, not a matrix, no rows or no elements: None (callers keep ``F.linear``)."""
    w = torch.randn(8, 6)
    assert pack_weight(w.double(), 4) is None
    assert pack_weight(w.half(), 4) is None
    assert pack_weight(w[0], 4) is None
    assert pack_weight(w, 0) is None
    assert pack_weight(torch.empty(0, 6), 4) is None
    assert pack_weight(w.to("meta"), 4) is None


def test_self_check_rejects_a_wrong_product() -> None:
    """The one-time check disables packing (with a warning) when MKL's product disagrees."""
    _needs_packing()

    class Wrong:
        def __init__(self, ext):
            self.ext = ext

        def pack(self, w, rows):
            return self.ext.pack(w, rows)

        def linear_out(self, x, packed, out):
            return self.ext.linear_out(x, packed, out).mul_(1.01)

    with pytest.warns(RuntimeWarning, match="self-check disagreed"):
        assert not L._self_check(Wrong(L._extension()))
    assert L._self_check(L._extension())
