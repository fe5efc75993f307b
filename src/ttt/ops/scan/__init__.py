"""The scan over mini-batches (the sequential heart of TTT), with interchangeable backends.

Every backend computes the same thing on the same layout (``R = batch * heads`` rows, ``N``
mini-batches of ``b`` tokens, head dim ``F``):

* inputs ``k, q, s [R, N, b, F]`` (keys, queries, ``s = ln_b - target``), ``lr [R, N, b]``,
  ``coef [b]``, ``ln_w [R, F]`` (``None``: no inner LayerNorm, TTT-Linear only), ``n_complete [R]``
  (mini-batch ``m`` of row ``r`` closes, i.e. its weights step, iff ``m < n_complete[r]``);
* the state ``(W1, b1, gW1, gb1)`` for TTT-Linear or ``(W1, b1, W2, b2, gW1, gb1, gW2, gb2)`` for
  TTT-MLP, each ``[R, ...]``: weights at the start of mini-batch 0 and the gradient sums already
  accumulated in it (a carried, partially filled mini-batch);
* outputs ``Zbar [R, N, b, F]`` (the inner model's output before the output LayerNorm) and the state
  after the last mini-batch.

Gradients flow to every input and to the initial state through a hand-written reverse scan (a
:class:`torch.autograd.Function`), which restarts from a checkpoint of the state every ``group``
mini-batches instead of keeping every intermediate (docs/scan-backward.md).

Backends: ``torch`` (plain PyTorch, readable, runs everywhere), ``cpp`` (compiled CPU scan) and
``triton`` (GPU kernels), chosen by :func:`resolve_backend`: the ``backend`` argument, else the
``TTT_SCAN_BACKEND`` environment variable, else ``auto`` (the fastest one that supports the inputs).
A backend that cannot run the inputs falls back to ``torch`` with a one-time warning, never silently.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from typing import Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import torch_scan

BACKENDS = ("torch", "cpp", "triton")
ENV_VAR = "TTT_SCAN_BACKEND"


class ScanBackend(Protocol):
    """What a scan backend provides (see the module docstring for the layout)."""

    name: str

    def unsupported(self, k: Tensor, ln_w: Tensor | None, state: tuple[Tensor, ...]) -> str | None:
        """``None`` if the backend can run these inputs, else a short reason."""

    def forward(self, k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                n_complete: Tensor, state: tuple[Tensor, ...], group: int, save: bool
                ) -> tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, ...]]:
        """``(Zbar, final state, checkpoints)``; checkpoints only when ``save``."""

    def backward(self, k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
                 n_complete: Tensor, saved: tuple[Tensor, ...], group: int, d_zbar: Tensor,
                 d_final: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        """``(dk, dq, ds, dlr, dcoef, dln_w, *d_initial_state)``."""


class _TorchBackend:
    name = "torch"

    def unsupported(self, k: Tensor, ln_w: Tensor | None, state: tuple[Tensor, ...]) -> str | None:
        return None

    forward = staticmethod(torch_scan.scan_forward)
    backward = staticmethod(torch_scan.scan_backward)


_LOADED: dict[str, ScanBackend | None] = {"torch": _TorchBackend()}
_WHY_MISSING: dict[str, str] = {}
_WARNED: set[str] = set()


def warn_once(msg: str) -> None:
    """Issue ``msg`` as a ``RuntimeWarning`` the first time only (fallback notices)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def get_backend(name: str) -> ScanBackend | None:
    """The backend called ``name``, loading it on first use; ``None`` if it cannot load here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown TTT scan backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
    if name not in _LOADED:
        try:
            mod = importlib.import_module(f".{name}_scan", __name__)
            _LOADED[name] = mod.load()
        except Exception as exc:  # a missing compiler / triton / GPU: report and use the fallback
            _LOADED[name] = None
            _WHY_MISSING[name] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return _LOADED[name]


def why_unavailable(name: str) -> str:
    """Why backend ``name`` could not be loaded (after :func:`get_backend` returned ``None``)."""
    return _WHY_MISSING.get(name, "unavailable")


def backend_status() -> dict[str, str]:
    """``{backend: "available" | reason it is not}`` (loads every backend; for diagnostics)."""
    return {n: "available" if get_backend(n) is not None else _WHY_MISSING.get(n, "unavailable")
            for n in BACKENDS}


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else ``$TTT_SCAN_BACKEND``, else ``"auto"``."""
    name = backend if backend not in (None, "", "auto") else os.environ.get(ENV_VAR, "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown TTT scan backend {name!r} (from {'argument' if backend else ENV_VAR}); "
                         f"choose one of auto, {', '.join(BACKENDS)}")
    return name


def resolve_backend(k: Tensor, ln_w: Tensor | None, state: tuple[Tensor, ...],
                    backend: str | None = None) -> ScanBackend:
    """Pick the backend for these inputs (see the module docstring); warns once on a fallback."""
    name = requested_backend(backend)
    if name == "auto":
        candidates = ["triton"] if k.device.type == "cuda" else ["cpp"] if k.device.type == "cpu" else []
        forced = False
    else:
        candidates, forced = [name], True
    for cand in candidates:
        if cand == "torch":
            break
        impl = get_backend(cand)
        if impl is None:
            warn_once(f"TTT scan backend '{cand}' is unavailable ({_WHY_MISSING[cand]}); "
                       "using the PyTorch scan")
            continue
        reason = impl.unsupported(k, ln_w, state)
        if reason is None:
            return impl
        if forced:
            warn_once(f"TTT scan backend '{cand}' does not support these inputs ({reason}); "
                       "using the PyTorch scan")
    return _LOADED["torch"]


def default_group(n_minibatches: int) -> int:
    """Checkpoint spacing of the backward when none is given: ``ceil(sqrt(N))`` mini-batches."""
    return max(1, math.isqrt(max(n_minibatches - 1, 0)) + 1)


class _ScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl: ScanBackend, group: int, k: Tensor, q: Tensor, s: Tensor, lr: Tensor,
                coef: Tensor, ln_w: Tensor | None, n_complete: Tensor, *state: Tensor):
        zbar, final, saved = impl.forward(k, q, s, lr, coef, ln_w, n_complete, state, group, True)
        ctx.impl, ctx.group, ctx.n_state = impl, group, len(state)
        ctx.save_for_backward(k, q, s, lr, coef, ln_w, n_complete, *saved)
        return (zbar, *final)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_zbar: Tensor, *d_final: Tensor):
        k, q, s, lr, coef, ln_w, n_complete, *saved = ctx.saved_tensors
        grads = ctx.impl.backward(k, q, s, lr, coef, ln_w, n_complete, tuple(saved), ctx.group,
                                  d_zbar.contiguous(), tuple(d.contiguous() for d in d_final))
        dk, dq, ds, dlr, dcoef, dlnw, *d_state = grads
        return (None, None, dk, dq, ds, dlr, dcoef, dlnw, None, *d_state)


def ttt_scan(k: Tensor, q: Tensor, s: Tensor, lr: Tensor, coef: Tensor, ln_w: Tensor | None,
             n_complete: Tensor, state: tuple[Tensor, ...], group: int = 0, backend: str | None = None
             ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Scan TTT-Linear (4 state tensors) or TTT-MLP (8) over all mini-batches.

    Layout and meaning of the arguments: see the module docstring. ``group`` is the checkpoint
    spacing of the backward in mini-batches (0: :func:`default_group`). ``backend``: ``"auto"``,
    ``"torch"``, ``"cpp"`` or ``"triton"`` (``None``: ``$TTT_SCAN_BACKEND`` or auto).
    Returns ``(Zbar, final state)``.
    """
    if len(state) not in (4, 8):
        raise ValueError(f"state must hold 4 (TTT-Linear) or 8 (TTT-MLP) tensors, got {len(state)}")
    if ln_w is None and len(state) == 8:
        raise ValueError("the scan without inner LayerNorm is only defined for TTT-Linear")
    impl = resolve_backend(k, ln_w, state, backend)
    group = group if group > 0 else default_group(k.shape[1])
    tensors = (k, q, s, lr, coef, ln_w, *state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        zbar, *final = _ScanFunction.apply(impl, group, k, q, s, lr, coef, ln_w, n_complete, *state)
        return zbar, tuple(final)
    zbar, final, _ = impl.forward(k, q, s, lr, coef, ln_w, n_complete, state, group, False)
    return zbar, final
