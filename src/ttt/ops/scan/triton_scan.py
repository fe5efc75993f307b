"""The Triton backend of the TTT scan (GPU kernels; the Triton interpreter runs them on CPU for tests).

:func:`load` returns the backend (raises if Triton is not importable); :meth:`TritonBackend.unsupported`
names what the kernels do not cover, so the dispatcher of :mod:`ttt.ops.scan` falls back visibly.
Kernels live in ``triton_kernels.py`` and are loaded per mode: compiled for CUDA tensors, interpreted
for CPU tensors when ``TRITON_INTERPRET=1`` is set at call time (so tests need no special import order).

``tl.dot`` precision of the fp32 products: ``ieee`` (exact fp32) unless ``$TTT_TRITON_PRECISION`` says
``tf32``, or, with the variable unset, PyTorch's own setting allows TF32
(``torch.get_float32_matmul_precision() != "highest"``). See ``docs/triton.md``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from ..state import InnerState
from . import torch_scan

EPS = 1e-6
PRECISION_ENV = "TTT_TRITON_PRECISION"
HEAD_DIMS = (16, 32, 64, 128)
MIN_MB, MAX_MB = 8, 64
_KERNEL_FILE = Path(__file__).with_name("triton_kernels.py")
_KMODS: dict[bool, ModuleType] = {}


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (CPU tensors then run in the Triton interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels(interpret: bool) -> ModuleType:
    """The kernel module, decorated for the interpreter or for the GPU compiler (loaded once each)."""
    if interpret not in _KMODS:
        old = os.environ.pop("TRITON_INTERPRET", None)
        if interpret:
            os.environ["TRITON_INTERPRET"] = "1"
        try:
            name = f"ttt.ops.scan._triton_kernels_{'interpreted' if interpret else 'compiled'}"
            spec = importlib.util.spec_from_file_location(name, _KERNEL_FILE)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
        finally:
            os.environ.pop("TRITON_INTERPRET", None)
            if old is not None:
                os.environ["TRITON_INTERPRET"] = old
        _KMODS[interpret] = mod
    return _KMODS[interpret]


def dot_precision() -> str:
    """``"ieee"`` or ``"tf32"`` (see the module docstring)."""
    env = os.environ.get(PRECISION_ENV, "").strip().lower()
    if env:
        if env not in ("ieee", "tf32"):
            raise ValueError(f"{PRECISION_ENV} must be ieee or tf32, got {env!r}")
        return env
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# --------------------------------------------------------------------------------------------------
# launch configurations (also enumerated by the ahead-of-time compile tests)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """One compiled variant: kernel name, compile-time constants and launch options."""

    kernel: str
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int = 1

    @property
    def consts(self) -> dict[str, object]:
        return dict(self.constexprs)


def mlp_tile(f: int, bb: int, backward: bool) -> int:
    """Hidden-dimension tile width of the TTT-MLP kernels (at least 2 tiles; narrower where shared
    memory would not fit: the backward keeps ~10 tiles live, see docs/triton.md)."""
    if backward:
        bh = 16 if f * bb >= 64 * 64 or f >= 128 else 32
    else:
        bh = 32 if f * bb >= 64 * 32 or f >= 128 else 64
    return min(bh, 2 * f)


def num_warps(f: int, bb: int, mlp: bool) -> int:
    """Warps per program: 8 for the bigger tiles, else 4."""
    return 8 if f >= 64 or (mlp and bb >= 32) else 4


def scan_config(kind: str, b: int, f: int, has_ln: bool, save: bool, prec: str) -> Config:
    """The configuration the backend launches for ``kind`` in ``linear_fwd/linear_bwd/mlp_fwd/mlp_bwd``."""
    bb = max(b, 16)
    mlp = kind.startswith("mlp")
    c: dict[str, object] = {"B": b, "BB": bb, "F": f, "PREC": prec, "EPS": EPS}
    if mlp:
        c["F1"], c["BH"] = 4 * f, mlp_tile(f, bb, kind.endswith("bwd"))
    else:
        c["HAS_LN"] = has_ln
    if kind.endswith("fwd"):
        c["SAVE"] = save
    return Config(f"{kind}_kernel", tuple(c.items()), num_warps(f, bb, mlp))


def decode_config(f: int, mlp: bool) -> Config:
    """The configuration of the fused decode step (TTT-MLP streams hidden tiles of 64)."""
    c: dict[str, object] = {"F": f, "EPS": EPS}
    if mlp:
        c["F1"], c["BH"] = 4 * f, min(64, 4 * f)
    return Config("mlp_decode_kernel" if mlp else "linear_decode_kernel", tuple(c.items()),
                  8 if f >= 64 else 4)


# Largest padded mini-batch BB per (kernel, head dim) verified ahead of time to compile and fit the
# shared memory of both A100 (sm_80, 164 KiB) and H100 (sm_90, 227 KiB) with both dot precisions
# (docs/triton.md lists every measured size). Anything else is refused by `unsupported` and runs
# the PyTorch scan: over budget, or not yet compiled on the 2-core machine the kernels were built on.
MAX_BB: dict[tuple[str, int], int] = {
    ("linear_bwd", 16): 64,
    ("linear_bwd", 32): 64,
    ("linear_bwd", 64): 64,
    ("linear_fwd", 16): 64,
    ("linear_fwd", 32): 64,
    ("linear_fwd", 64): 64,
    ("linear_fwd", 128): 32,
    ("mlp_bwd", 16): 64,
    ("mlp_bwd", 32): 64,
    ("mlp_bwd", 64): 32,
    ("mlp_bwd", 128): 16,
    ("mlp_fwd", 16): 64,
    ("mlp_fwd", 32): 64,
    ("mlp_fwd", 64): 32,
    ("mlp_fwd", 128): 32,
}


def supported_config(kind: str, b: int, f: int) -> str | None:
    """``None`` if the ``kind`` kernel (``linear_fwd``, ``mlp_bwd``, ...) is launched at these sizes."""
    bb = max(b, 16)
    if bb > MAX_BB.get((kind, f), 0):
        return (f"{kind} at head dim {f}, mini-batch {b} is not verified to fit the shared memory of "
                "sm_80/sm_90 (docs/triton.md)")
    return None


def all_configs() -> list[Config]:
    """Every configuration :class:`TritonBackend` can launch (inputs fp32; bf16/fp16 only change loads)."""
    out = []
    for prec in ("ieee", "tf32"):
        for f in HEAD_DIMS:
            for b in (8, 16, 32, 64):
                for has_ln in (True, False):
                    for save in (True, False):
                        out.append(scan_config("linear_fwd", b, f, has_ln, save, prec))
                    out.append(scan_config("linear_bwd", b, f, has_ln, False, prec))
                for save in (True, False):
                    out.append(scan_config("mlp_fwd", b, f, True, save, prec))
                out.append(scan_config("mlp_bwd", b, f, True, False, prec))
    out += [decode_config(f, mlp) for f in HEAD_DIMS for mlp in (False, True)]
    return out


SHARED_LIMIT = {80: 164 * 1024, 86: 100 * 1024, 89: 100 * 1024, 90: 227 * 1024}
_INT_ARGS = {"N", "group", "NG", "H", "MB"}


def aot_compile(cfg: Config, capability: int, in_dtype: str = "fp32"):
    """Compile ``cfg`` ahead of time for ``sm_<capability>`` (no GPU needed); returns Triton's kernel.

    ``.metadata.shared`` is the shared memory one program needs, in bytes.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(kernels(False), cfg.kernel)
    consts = cfg.consts
    sig: dict[str, str] = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in _INT_ARGS:
            sig[name] = "i32"
        elif name in ("nc_ptr", "pos_ptr"):
            sig[name] = "*i64"
        elif name == "act_ptr":
            sig[name] = "*i32"
        elif name in ("k_ptr", "q_ptr", "s_ptr", "v_ptr", "lr_ptr"):
            sig[name] = f"*{in_dtype}"
        else:
            sig[name] = "*fp32"
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _launch(cfg: Config, interpret: bool, rows: int, *args) -> bool:
    """Run ``cfg`` over ``rows`` programs; False (after a one-time warning) if this GPU lacks the
    shared memory or registers for it (e.g. 100 KiB parts), so the caller can use the PyTorch path."""
    fn = getattr(kernels(interpret), cfg.kernel)
    dev = args[0].device
    try:
        with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
            fn[(rows,)](*args, **cfg.consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    except Exception as exc:
        if type(exc).__name__ != "OutOfResources":
            raise
        from . import warn_once

        warn_once(f"TTT Triton kernel {cfg.kernel} {cfg.consts} does not fit this GPU ({exc}); "
                   "using the PyTorch path")
        return False
    return True


# --------------------------------------------------------------------------------------------------
# packing the state: one fp32 vector per row
# --------------------------------------------------------------------------------------------------

def _pack(state: tuple[Tensor, ...]) -> Tensor:
    r = state[0].shape[0]
    return torch.cat([t.reshape(r, -1).to(torch.float32) for t in state], 1).contiguous()


def _unpack(flat: Tensor, like: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    out, o = [], 0
    for t in like:
        n = t[0].numel()
        out.append(flat[..., o:o + n].reshape(*flat.shape[:-1], *t.shape[1:]).to(t.dtype))
        o += n
    return tuple(out)


def _c(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


class TritonBackend:
    """The scan backend of :mod:`ttt.ops.scan` running the kernels of ``triton_kernels.py``."""

    name = "triton"

    def unsupported(self, k: Tensor, ln_w: Tensor | None, state: tuple[Tensor, ...]) -> str | None:
        interp = interpreting()
        if k.device.type != "cuda" and not (interp and k.device.type == "cpu"):
            return f"{k.device.type} tensors (the kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
        if k.device.type == "cuda" and interp:
            return "TRITON_INTERPRET=1 is set but the tensors are on CUDA"
        if state[0].dtype != torch.float32:
            return f"inner state in {state[0].dtype} (the kernels keep an fp32 state)"
        if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"inputs in {k.dtype}"
        f, b = k.shape[-1], k.shape[-2]
        if f not in HEAD_DIMS:
            return f"head dim {f} (kernels cover {', '.join(map(str, HEAD_DIMS))})"
        if not MIN_MB <= b <= MAX_MB or b & (b - 1):
            return f"mini-batch size {b} (kernels cover powers of 2 in {MIN_MB}-{MAX_MB})"
        if len(state) == 8 and state[0].shape[-1] != 4 * f:
            return f"TTT-MLP hidden size {state[0].shape[-1]} (kernels cover 4 * head dim)"
        if k.device.type != "cuda":  # the interpreter has no shared-memory budget
            return None
        kind = "mlp" if len(state) == 8 else "linear"
        return supported_config(f"{kind}_fwd", b, f) or supported_config(f"{kind}_bwd", b, f)

    def forward(self, k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                n_complete: Tensor, state: tuple[Tensor, ...], group: int, save: bool
                ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        rows, n, b, f = k.shape
        kind = "mlp" if len(state) == 8 else "linear"
        interp = k.device.type == "cpu"
        cfg = scan_config(f"{kind}_fwd", b, f, ln_w is not None, save, dot_precision())
        ng = -(-n // group) if save else 1
        st = _pack(state)
        out = st.clone() if kind == "mlp" else torch.empty_like(st)
        ck = st.new_empty(rows, ng, st.shape[1]) if save else st.new_empty(1)
        zbar = torch.empty(k.shape, dtype=torch.float32, device=k.device)
        lnw = _c(ln_w) if ln_w is not None else coef
        nc = n_complete.to(torch.int64).contiguous()
        args = (_c(k), _c(q), _c(s), _c(lr), _c(coef), lnw, nc, st, zbar, out, ck, n, group, ng)
        if n == 0:
            out = st
        elif not _launch(cfg, interp, rows, *args):
            return torch_scan.scan_forward(k, q, s, lr, coef, ln_w, n_complete, state, group, save)
        saved = (ck,) if save else ()
        return zbar.to(k.dtype) if k.dtype != torch.float32 else zbar, _unpack(out, state), saved

    def backward(self, k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                 n_complete: Tensor, saved: tuple[Tensor, ...], group: int, d_zbar: Tensor,
                 d_final: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        rows, n, b, f = k.shape
        kind = "mlp" if len(d_final) == 8 else "linear"
        if len(saved) != 1:  # the forward fell back to the PyTorch scan
            return torch_scan.scan_backward(k, q, s, lr, coef, ln_w, n_complete, saved, group, d_zbar,
                                            d_final)
        interp = k.device.type == "cpu"
        cfg = scan_config(f"{kind}_bwd", b, f, ln_w is not None, False, dot_precision())
        (ck,) = saved
        ng = ck.shape[1]
        dst = _pack(d_final)
        scr = dst.new_empty(rows, group, dst.shape[1])
        dk, dq, ds, dlr = (torch.empty_like(t) for t in (k, q, s, lr))
        bb = max(b, 16)
        dcoef = torch.zeros(rows, bb, dtype=torch.float32, device=k.device)
        dlnw = torch.zeros(rows, f, dtype=torch.float32, device=k.device)
        lnw = _c(ln_w) if ln_w is not None else coef
        nc = n_complete.to(torch.int64).contiguous()
        args = [_c(k), _c(q), _c(s), _c(lr), _c(coef), lnw, nc, ck, _c(d_zbar), dst, scr]
        if kind == "mlp":
            args.append(dst.new_empty(rows, bb, 4 * f))
        args += [dk, dq, ds, dlr, dcoef, dlnw, n, group, ng]
        if not _launch(cfg, interp, rows, *args):
            return torch_scan.scan_backward(k, q, s, lr, coef, ln_w, n_complete, _unpack(ck, d_final), group,
                                            d_zbar, d_final)
        d_coef = dcoef[:, :b].sum(0).to(coef.dtype)
        d_lnw = dlnw.to(ln_w.dtype) if ln_w is not None else None
        return (dk, dq, ds, dlr, d_coef, d_lnw, *_unpack(dst, d_final))


    # ---------------------------------------------------------------------------------------------
    # one-token decode step (ttt.ops.decode.ttt_step)
    # ---------------------------------------------------------------------------------------------

    def decode_unsupported(self, xq: Tensor, state: InnerState) -> str | None:
        """``None`` if :meth:`decode` can run these inputs, else a short reason."""
        interp = interpreting()
        if xq.device.type != "cuda" and not (interp and xq.device.type == "cpu"):
            return f"{xq.device.type} tensors (the kernels need CUDA, or TRITON_INTERPRET=1 on CPU)"
        if state.W1.dtype != torch.float32:
            return f"inner state in {state.W1.dtype} (the kernels keep an fp32 state)"
        if xq.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return f"inputs in {xq.dtype}"
        f = xq.shape[-1]
        if f not in HEAD_DIMS:
            return f"head dim {f} (kernels cover {', '.join(map(str, HEAD_DIMS))})"
        if state.is_mlp and state.W1.shape[-1] != 4 * f:
            return f"TTT-MLP hidden size {state.W1.shape[-1]} (kernels cover 4 * head dim)"
        return None

    def decode(self, xq: Tensor, xk: Tensor, xv: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor,
               ln_b: Tensor, state: InnerState, lengths: Tensor | None = None
               ) -> tuple[Tensor, InnerState] | None:
        """:func:`ttt.ops.decode.ttt_step` in one kernel launch (same contract, no autograd).

        ``None`` if the kernel does not fit this GPU (after a one-time warning).
        """
        bsz, heads, _, f = xq.shape
        mb = coef.shape[0]
        tensors = tuple(_c(t) for t in state.weights() + state.grads())
        new = tuple(torch.empty_like(t) for t in tensors)
        out = torch.empty_like(xq)
        pos = state.pos.to(device=xq.device, dtype=torch.int64).contiguous()
        if lengths is None:
            active = torch.ones(bsz, dtype=torch.int32, device=xq.device)
        else:
            active = (lengths.to(xq.device) > 0).to(torch.int32)
        cfg = decode_config(f, state.is_mlp)
        if not _launch(cfg, xq.device.type == "cpu", bsz * heads, _c(xq), _c(xk), _c(xv), _c(lr), _c(coef),
                       _c(ln_w), _c(ln_b), pos, active, *tensors, out, *new, heads, mb):
            return None
        new_pos = torch.where(active.bool(), (pos + 1) % mb, pos).to(state.pos.dtype)
        n = len(new) // 2
        w, g = new[:n], new[n:]
        if state.is_mlp:
            return out, InnerState(w[0], w[1], g[0], g[1], new_pos, w[2], w[3], g[2], g[3])
        return out, InnerState(w[0], w[1], g[0], g[1], new_pos)


def load() -> TritonBackend:
    """The backend; raises ImportError when Triton is not installed."""
    import triton  # noqa: F401

    return TritonBackend()
