"""The compiled CPU scan backend: the whole scan (forward and reverse-scan backward) in C++.

The sources in ``csrc/`` are built on first use by :mod:`ttt.ops.extension` (ninja, cached per sources,
flags, compiler, torch/Python versions and CPU; file lock between processes; atomic install) and
register ``torch.ops.ttt_scan.forward`` / ``.backward``. Without a working compiler :func:`load`
raises, and the dispatcher in :mod:`ttt.ops.scan` warns once and uses the PyTorch scan. Design notes:
``docs/scan-backward.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .. import extension

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / n for n in ("scan_ops.cpp", "scan_linear.cpp", "scan_mlp.cpp"))
HEADERS = tuple(CSRC / n for n in ("scan_api.h", "scan_driver.h", "scan_io.h", "scan_kernels.h"))
NAME = "ttt_scan_cpp"


def load_library(root: Path | None = None) -> Path:
    """Load the compiled scan into this process (building it first if needed); returns its path."""
    return extension.load_library(NAME, SOURCES, HEADERS, root)


class CppBackend:
    """The compiled CPU scan (fp32/fp64, CPU tensors); see :class:`ttt.ops.scan.ScanBackend`."""

    name = "cpp"

    def unsupported(self, k: Tensor, ln_w: Tensor | None, state: tuple[Tensor, ...]) -> str | None:
        if k.device.type != "cpu":
            return f"inputs on {k.device}, it runs on the CPU"
        if k.dtype not in (torch.float32, torch.float64):
            return f"dtype {k.dtype}, it runs float32/float64"
        if any(t.dtype != k.dtype or t.device != k.device for t in state):
            return "the state's dtype or device differs from the inputs'"
        return None

    def forward(self, k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                n_complete: Tensor, state: tuple[Tensor, ...], group: int, save: bool
                ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        out = torch.ops.ttt_scan.forward(
            k.contiguous(), q.contiguous(), s.contiguous(), lr.contiguous(), coef.contiguous(),
            None if ln_w is None else ln_w.contiguous(), n_complete.to(torch.long).contiguous(),
            [t.contiguous() for t in state], int(group), bool(save))
        ns = len(state)
        return out[0], tuple(out[1:1 + ns]), tuple(out[1 + ns:])

    def backward(self, k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                 n_complete: Tensor, saved: tuple[Tensor, ...], group: int, d_zbar: Tensor,
                 d_final: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        out = torch.ops.ttt_scan.backward(
            k.contiguous(), q.contiguous(), s.contiguous(), lr.contiguous(), coef.contiguous(),
            None if ln_w is None else ln_w.contiguous(), n_complete.to(torch.long).contiguous(),
            [t.contiguous() for t in saved], int(group), d_zbar.contiguous(),
            [t.contiguous() for t in d_final])
        dk, dq, ds, dlr, dcoef_rows, dlnw, *d_state = out
        return (dk, dq, ds, dlr, dcoef_rows.sum(0), None if ln_w is None else dlnw, *d_state)

    def heads_forward(self, xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor,
                      ln_b: Tensor, cos: Tensor, sin: Tensor, n_complete: Tensor, state: tuple[Tensor, ...],
                      group: int, save: bool, out: Tensor | None = None, lr_bias: Tensor | None = None,
                      lr_base: float = 1.0) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...], Tensor]:
        """The fused layer pass (:mod:`ttt.ops.scan.fused`): ``(out, final state, checkpoints, Zbar)``;
        checkpoints and ``Zbar`` (for the backward) only when ``save``. ``out`` (contiguous
        ``[B, L, H, F]``, the inputs' dtype) receives the output instead of a new tensor. With ``lr_bias``
        ``[H]``, ``lr`` holds the gate's logits (any strides) and the pass forms the learning rates
        ``lr_base * sigmoid(lr + lr_bias) / F`` itself."""
        out = torch.ops.ttt_scan.heads_forward(xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete,
                                               [t.contiguous() for t in state], int(group), bool(save), out,
                                               lr_bias, float(lr_base))
        ns = len(state)
        return out[0], tuple(out[1:1 + ns]), tuple(out[1 + ns:-1]), out[-1]

    def heads_backward(self, xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor,
                       ln_b: Tensor, cos: Tensor, sin: Tensor, n_complete: Tensor, saved: tuple[Tensor, ...],
                       zbar: Tensor, group: int, d_out: Tensor, d_final: tuple[Tensor, ...]
                       ) -> tuple[Tensor, ...]:
        """``(dxq, dxk, dxv, dlr, dcoef [R, b], d ln_w [R, F], d ln_b [R, F], *d_initial_state)``."""
        if d_out.stride(-1) != 1:
            d_out = d_out.contiguous()
        return tuple(torch.ops.ttt_scan.heads_backward(xq, xk, xv, lr, coef, ln_w, ln_b, cos, sin, n_complete,
                                                       list(saved), zbar, int(group), d_out, list(d_final)))


def load() -> CppBackend:
    """Build/load the compiled scan; raises (with a one-line reason) when it cannot."""
    load_library()
    return CppBackend()
