"""TTT-Linear and TTT-MLP as PyTorch modules (math §4, §6), with an explicit streaming state."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.conv import causal_conv1d
from ..ops.decode import ttt_step
from ..ops.dual import ttt_dual_heads
from ..ops.functional import gelu_tanh, rope_adjacent, token_coefficients, ttt_learning_rate
from ..ops.linear import PACK_MIN_ROWS, PackedWeight, pack_weight, packable, packed_linear
from ..ops.norm import gated_layer_norm_
from ..ops.reference import ttt_reference
from ..ops.scan import BACKENDS
from ..ops.state import InnerState
from ..ops.workspace import scratch

LayerType = Literal["linear", "mlp"]


@dataclass
class TTTLayerState:
    """Everything a TTT layer carries from one call to the next.

    ``inner``: inner weights, the open mini-batch's accumulated gradients and the position inside it.
    ``conv_q`` / ``conv_k``: the last ``K-1`` inputs of the Q/K convolutions (shared-Q/K variant only).
    """

    inner: InnerState
    conv_q: Tensor | None = None
    conv_k: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    def _map(self, fn_inner, fn) -> TTTLayerState:
        return replace(self, inner=fn_inner(self.inner),
                       conv_q=None if self.conv_q is None else fn(self.conv_q),
                       conv_k=None if self.conv_k is None else fn(self.conv_k))

    def detach(self) -> TTTLayerState:
        return self._map(lambda s: s.detach(), lambda t: t.detach())

    def clone(self) -> TTTLayerState:
        return self._map(lambda s: s.clone(), lambda t: t.clone())

    def to(self, device: torch.device | str) -> TTTLayerState:
        return self._map(lambda s: s.to(device), lambda t: t.to(device))

    def index_select(self, index: Tensor) -> TTTLayerState:
        """Keep / reorder batch rows (beam search, dropping finished sequences)."""
        return self._map(lambda s: s.index_select(index), lambda t: t.index_select(0, index.to(t.device)))


def _owns_storage(w: Tensor) -> bool:
    """``w`` is a parameter with a storage of its own, so a change of its values shows in its version
    counter (a view into a shared buffer, e.g. FSDP's gathered parameters, can change without that)."""
    return (type(w) is nn.Parameter and w.storage_offset() == 0
            and w.untyped_storage().nbytes() == w.numel() * w.element_size())


def _dropped() -> None:
    """What an unpickled :class:`_Derived` becomes."""
    return None


class _Derived(tuple):
    """``(key, value)``: a value derived from parameters for inference (:meth:`TTTLayer._cached`). A copy of
    the module (``copy.deepcopy``, pickling) leaves it behind (None), so the copy derives its own from its
    own parameters: a stale copy would be rebuilt on its first use anyway (the key names the parameters
    by identity), and a packed weight is tied to the address it was packed at."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __reduce__(self) -> tuple:
        return (_dropped, ())


@dataclass
class _InferenceWeights:
    """What inference derives from a layer's parameters, kept between calls (:meth:`TTTLayer._cached`):
    the input projections' weights concatenated (None when they cannot be fused or fusing is off), the
    token coefficients, and MKL packings of the fused weight and ``o_proj``'s (``packs[name][(rows,
    threads)]``). Small ops and lookups cost far more than their arithmetic right after the GEMMs (their
    code and data are out of the caches), so one cache, checked once per call, serves all of them."""

    fused: Tensor | None
    coef: Tensor
    packs: dict[str, dict[tuple[int, int], PackedWeight | None]]


def _autocast_off(device_type: str) -> AbstractContextManager:
    """A context with autocast off on ``device_type``: nothing to enter where it is off already (the
    usual case; entering ``torch.autocast`` cost ~0.3-0.5 ms right after the layer's large kernels)."""
    if device_type in ("cpu", "cuda") and not torch.is_autocast_enabled(device_type):
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


def _plain_linear(m: nn.Module) -> bool:
    """``m`` is a plain bias-free ``nn.Linear`` without hooks (so its weight alone computes it)."""
    return type(m) is nn.Linear and m.bias is None and not (m._forward_hooks or m._forward_pre_hooks)


def _inner_dtype(dtype: torch.dtype) -> torch.dtype:
    """Inner state and LayerNorm statistics stay in fp32 for half-precision models."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class TTTLayer(nn.Module):
    """A Test-Time Training sequence layer (TTT-Linear or TTT-MLP) on ``[batch, length, width]`` input.

    Args:
        hidden_size: model width ``D``.
        num_heads: heads ``H``; each has its own inner model on ``F = D / H`` features.
        ttt_layer_type: ``"linear"`` (``f(x) = x W + b``) or ``"mlp"`` (2 layers, hidden ``4F``).
        mini_batch_size: tokens per TTT mini-batch ``b``.
        ttt_base_lr: base inner learning rate (1.0 for linear, 0.1 for MLP in the paper's recipes).
        share_qk: one ``q_proj`` followed by two depthwise causal convs (Mamba backbone) instead of
            separate ``q_proj`` / ``k_proj``.
        use_gate: multiply the output by ``gelu_tanh(g_proj(x))`` before ``o_proj``.
        conv_kernel: kernel size of the Q/K convs.
        rope_theta: rotary base; positions are taken modulo ``mini_batch_size``.
        remat_group_size: the scan's backward restarts from a saved inner state every that many
            mini-batches (memory ``O(N / group + group)`` states); 0 picks ``~sqrt(N)``.
        scan_backend: ``"auto"`` (default: ``$TTT_SCAN_BACKEND`` if set, else the fastest backend for
            the device), ``"torch"``, ``"cpp"`` or ``"triton"``; see :mod:`ttt.ops.scan`.
        impl: ``"dual"`` (fast) or ``"reference"`` (token-by-token primal form, for testing).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        ttt_layer_type: LayerType = "linear",
        mini_batch_size: int = 16,
        ttt_base_lr: float = 1.0,
        share_qk: bool = False,
        use_gate: bool = False,
        conv_kernel: int = 4,
        rope_theta: float = 10000.0,
        remat_group_size: int = 0,
        scan_backend: str = "auto",
        impl: Literal["dual", "reference"] = "dual",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if hidden_size < 1 or num_heads < 1 or hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a positive multiple of num_heads ({num_heads})")
        head_dim = hidden_size // num_heads
        if head_dim % 2:
            raise ValueError(f"head dim hidden_size/num_heads = {head_dim} must be even (rotary embedding)")
        if ttt_layer_type not in ("linear", "mlp"):
            raise ValueError(f"ttt_layer_type must be 'linear' or 'mlp', got {ttt_layer_type!r}")
        if not isinstance(mini_batch_size, int) or mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be an integer >= 1, got {mini_batch_size!r}")
        if share_qk and conv_kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {conv_kernel}")
        if remat_group_size < 0:
            raise ValueError(f"remat_group_size must be >= 0, got {remat_group_size}")
        if scan_backend not in ("auto", *BACKENDS):
            raise ValueError(f"scan_backend must be one of auto, {', '.join(BACKENDS)}; got {scan_backend!r}")
        if impl not in ("dual", "reference"):
            raise ValueError(f"impl must be 'dual' or 'reference', got {impl!r}")
        fk = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.ttt_layer_type = ttt_layer_type
        self.mini_batch_size = mini_batch_size
        self.ttt_base_lr = float(ttt_base_lr)
        self.share_qk, self.use_gate = share_qk, use_gate
        self.conv_kernel, self.rope_theta = conv_kernel, rope_theta
        self.remat_group_size, self.scan_backend, self.impl = remat_group_size, scan_backend, impl

        d, h, f = hidden_size, num_heads, head_dim
        self.q_proj = nn.Linear(d, d, bias=False, **fk)
        if share_qk:
            self.conv_q = nn.Conv1d(d, d, conv_kernel, groups=d, bias=True, **fk)
            self.conv_k = nn.Conv1d(d, d, conv_kernel, groups=d, bias=True, **fk)
        else:
            self.k_proj = nn.Linear(d, d, bias=False, **fk)
        self.v_proj = nn.Linear(d, d, bias=False, **fk)
        self.o_proj = nn.Linear(d, d, bias=False, **fk)
        if use_gate:
            self.g_proj = nn.Linear(d, d, bias=False, **fk)
        self.learnable_ttt_lr_weight = nn.Parameter(torch.empty(h, 1, d, **fk))
        self.learnable_ttt_lr_bias = nn.Parameter(torch.empty(h, 1, **fk))
        self.learnable_token_idx = nn.Parameter(torch.empty(mini_batch_size, **fk))
        self.ttt_norm_weight = nn.Parameter(torch.empty(h, f, **fk))
        self.ttt_norm_bias = nn.Parameter(torch.empty(h, f, **fk))
        self.post_norm = nn.LayerNorm(d, eps=1e-6, **fk)
        f1 = f if ttt_layer_type == "linear" else 4 * f
        self.W1 = nn.Parameter(torch.empty(h, f, f1, **fk))
        self.b1 = nn.Parameter(torch.empty(h, 1, f1, **fk))
        if ttt_layer_type == "mlp":
            self.W2 = nn.Parameter(torch.empty(h, f1, f, **fk))
            self.b2 = nn.Parameter(torch.empty(h, 1, f, **fk))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Math §7 initialisation: linear and inner weights N(0, std), biases 0, norms 1/0."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=std)
        for name in ("conv_q", "conv_k"):
            conv = getattr(self, name, None)
            if conv is not None:
                conv.reset_parameters()
        nn.init.normal_(self.learnable_ttt_lr_weight, std=std)
        nn.init.zeros_(self.learnable_ttt_lr_bias)
        nn.init.zeros_(self.learnable_token_idx)
        nn.init.ones_(self.ttt_norm_weight)
        nn.init.zeros_(self.ttt_norm_bias)
        self.post_norm.reset_parameters()
        nn.init.normal_(self.W1, std=std)
        nn.init.zeros_(self.b1)
        if self.ttt_layer_type == "mlp":
            nn.init.normal_(self.W2, std=std)
            nn.init.zeros_(self.b2)

    def inner_weights(self) -> tuple[Tensor, ...]:
        """The learned initial inner weights ``W0`` (``[H, ...]`` each)."""
        if self.ttt_layer_type == "linear":
            return (self.W1, self.b1)
        return (self.W1, self.b1, self.W2, self.b2)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> TTTLayerState:
        """A fresh state at a sequence start (learned ``W0``, nothing accumulated, empty conv buffers)."""
        ref = self.W1
        device = ref.device if device is None else torch.device(device)
        weights = tuple(w if w.device == device else w.to(device) for w in self.inner_weights())
        inner = InnerState.from_weights(weights, batch_size, dtype=_inner_dtype(ref.dtype))
        conv_q = conv_k = None
        if self.share_qk:
            shape = (batch_size, self.hidden_size, self.conv_kernel - 1)
            conv_q = torch.zeros(shape, device=device, dtype=ref.dtype)
            conv_k = torch.zeros(shape, device=device, dtype=ref.dtype)
        return TTTLayerState(inner, conv_q, conv_k)

    def _check_inputs(self, x: Tensor, state: TTTLayerState | None, lengths: Tensor | None) -> None:
        if x.dim() != 3:
            raise ValueError(f"{type(self).__name__} expects input [batch, length, {self.hidden_size}], "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"input width {x.shape[-1]} does not match hidden_size {self.hidden_size}")
        if not x.is_floating_point():
            raise ValueError(f"input must be floating point, got {x.dtype}")
        bsz = x.shape[0]
        if bsz == 0:
            raise ValueError("empty batch: the input has batch size 0")
        if lengths is not None:
            if lengths.shape != (bsz,) or lengths.dtype.is_floating_point:
                raise ValueError(f"lengths must be an integer tensor of shape [{bsz}], got "
                                 f"{tuple(lengths.shape)} {lengths.dtype}")
            if x.shape[1] > 0 and not bool((lengths > 0).any()):
                raise ValueError("lengths are all 0: no row of the batch holds a real token")
        if state is None:
            return
        if not isinstance(state, TTTLayerState):
            raise TypeError(f"state must be a TTTLayerState, got {type(state).__name__}")
        want = (bsz, *self.W1.shape)
        if tuple(state.inner.W1.shape) != want or state.inner.is_mlp != (self.ttt_layer_type == "mlp"):
            raise ValueError(f"state does not fit this layer/input: state.inner.W1 has shape "
                             f"{tuple(state.inner.W1.shape)}, expected {want} ({self.ttt_layer_type})")
        pos = state.inner.pos
        if bool(((pos < 0) | (pos >= self.mini_batch_size)).any()):
            raise ValueError(f"state position {pos.tolist()} does not fit this layer's mini_batch_size "
                             f"{self.mini_batch_size} (a state carried from a layer with another mini-batch "
                             "size?)")
        if state.inner.W1.device != x.device:
            raise ValueError(f"state is on {state.inner.W1.device} but the input is on {x.device}")
        if state.inner.W1.dtype != _inner_dtype(self.W1.dtype):
            raise ValueError(f"state dtype {state.inner.W1.dtype} does not match the layer's inner dtype "
                             f"{_inner_dtype(self.W1.dtype)}")
        if self.share_qk and (state.conv_q is None or state.conv_q.shape[0] != bsz):
            raise ValueError("state lacks Q/K conv buffers of the right batch size for this share_qk layer")

    def forward(
        self, x: Tensor, state: TTTLayerState | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, TTTLayerState]:
        """Run the layer on ``x [B, L, D]``, continuing from ``state`` (fresh when None).

        With ``lengths [B]``, row ``r`` has ``lengths[r]`` real tokens at the front; the rest are padding,
        which touches no state and gets output 0. Returns ``(out [B, L, D], new_state)``.
        """
        self._check_inputs(x, state, lengths)
        bsz, length, _ = x.shape
        if state is None:
            state = self.init_state(bsz, device=x.device)
        h, f = self.num_heads, self.head_dim

        inference = not torch.is_grad_enabled()
        # inference on the CPU: the big intermediates in reusable huge-page scratch (ttt.ops.workspace);
        # none of them leaves this call
        reuse = inference and x.device.type == "cpu"
        derived = self._inference_weights() if inference else None
        w = derived.fused if derived is not None else None
        if w is not None:
            # inference: the projections of x (q, k, v, gate, learning-rate gate) as one GEMM
            if reuse:
                buf = scratch("ttt.layer.projections", (bsz, length, len(w)), x.dtype)
                packed = self._packed(derived, "input", w, bsz * length)
                y = torch.matmul(x, w.t(), out=buf) if packed is None else packed_linear(x, packed, out=buf)
            else:
                y = F.linear(x, w)
            projs = y.split(self._fused_input_sizes(), dim=-1)
            proj = dict(zip(self._fused_input_names(), projs, strict=True))
        else:
            proj = {"q": self.q_proj(x), "v": self.v_proj(x),
                    "lr": F.linear(x, self.learnable_ttt_lr_weight.squeeze(1))}
            if not self.share_qk:
                proj["k"] = self.k_proj(x)
        xq, xv = proj["q"], proj["v"]
        conv_q_state = conv_k_state = None
        if self.share_qk:
            bufs = [scratch(f"ttt.layer.conv_{n}", xq.shape, xq.dtype) if reuse else None for n in "kq"]
            xk, conv_k_state = causal_conv1d(xq, self.conv_k.weight, self.conv_k.bias, state.conv_k, lengths,
                                             bufs[0])
            xq, conv_q_state = causal_conv1d(xq, self.conv_q.weight, self.conv_q.bias, state.conv_q, lengths,
                                             bufs[1])
        else:
            xk = proj["k"]

        # [B, H, L], from a strided column block of the fused projection output
        logits = proj["lr"].transpose(1, 2)
        lr_bias = self.learnable_ttt_lr_bias.view(h)
        lr_gate = None
        if inference and self.impl == "dual" and length != 1 and x.dtype == _inner_dtype(x.dtype):
            # the dual form forms the learning rates from the logits (inside its compiled pass on the CPU)
            lr, lr_gate = logits, (lr_bias, self.ttt_base_lr)
        elif inference:  # the same arithmetic in place, in a contiguous [B, H, L] (the scan's layout)
            gate = torch.empty((bsz, h, length), dtype=_inner_dtype(x.dtype), device=x.device)
            # (added in the input's dtype, as in training)
            lr = torch.add(logits, lr_bias.view(1, h, 1), out=gate).sigmoid_()
            if self.ttt_base_lr != 1.0:  # (x * 1 is x: skipped, same result)
                lr.mul_(self.ttt_base_lr)
            lr.div_(f)
        else:
            lr = ttt_learning_rate(logits, lr_bias, self.ttt_base_lr, f, _inner_dtype(x.dtype))
        coef = derived.coef if derived is not None else token_coefficients(self.learnable_token_idx)
        # the inner loop runs in the state's dtype (fp32 for half models): keep autocast out of it
        with _autocast_off(x.device.type):
            if self.impl == "dual" and length != 1:  # [B, L, H, F] views in, [B, L, H, F] out
                xq, xk, xv = (t.view(bsz, length, h, f) for t in (xq, xk, xv))
                buf = scratch("ttt.layer.scan_out", xq.shape, xq.dtype) if reuse else None
                out, inner = ttt_dual_heads(xq, xk, xv, lr, coef, self.ttt_norm_weight, self.ttt_norm_bias,
                                            state.inner, self.rope_theta, lengths,
                                            remat_group_size=self.remat_group_size, backend=self.scan_backend,
                                            out=buf, lr_gate=lr_gate)
            else:
                xq, xk, xv = (t.view(bsz, length, h, f).transpose(1, 2) for t in (xq, xk, xv))
                positions = (state.inner.pos.view(bsz, 1) + torch.arange(length, device=x.device)) \
                    % self.mini_batch_size
                xq = rope_adjacent(xq, positions, self.rope_theta, period=self.mini_batch_size)
                xk = rope_adjacent(xk, positions, self.rope_theta, period=self.mini_batch_size)
                args = (xq, xk, xv, lr, coef, self.ttt_norm_weight, self.ttt_norm_bias, state.inner, lengths)
                # decoding: the primal one-token step beats the dual form's set-up
                out, inner = (ttt_reference if self.impl == "reference" else ttt_step)(*args)
                out = out.transpose(1, 2)
        gate = (proj["g"] if "g" in proj else self.g_proj(x)) if self.use_gate else None
        # drop the references to the projections: at inference their memory serves what follows
        proj = xq = xk = xv = args = None
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        out = out.reshape(bsz, length, self.hidden_size)
        if self._plain_post_norm():  # post-norm and gate in one pass, over the scan's output at inference
            out = gated_layer_norm_(out, self.post_norm.weight, self.post_norm.bias, self.post_norm.eps, gate)
        else:
            out = self.post_norm(out)
            if gate is not None:
                out = gelu_tanh(gate) * out
        out = self._output_projection(out, derived)
        if lengths is not None:
            valid = torch.arange(length, device=x.device).view(1, length) < lengths.to(x.device).view(bsz, 1)
            out = out * valid.unsqueeze(-1).to(out.dtype)
        return out, TTTLayerState(inner, conv_q_state, conv_k_state)

    # Inference (no autograd) computes the projections of the input in one GEMM over the concatenated
    # weights, kept in a cache that is rebuilt when any of them changes (in place or replaced); the
    # parameters themselves stay separate (names, state dicts and training are unchanged). The cache is
    # a second copy of those weights (3-4 D x D per layer); TTTLayer.fuse_projections = False saves it.
    fuse_projections = True
    # Inference on the CPU also runs those GEMMs (and o_proj) from weights packed once for MKL's kernel
    # (ttt.ops.linear), one more copy of them per row count in use (at most three; the fused input weight's
    # on huge pages, ~1.4x its size resident); False saves it.
    pack_weights = True
    _PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "g": "g_proj"}  # fused name -> module

    def _plain_post_norm(self) -> bool:
        """``post_norm`` is the plain affine ``nn.LayerNorm`` over the width, without hooks."""
        m = self.post_norm
        return (type(m) is nn.LayerNorm and m.elementwise_affine and m.bias is not None
                and not (m._forward_hooks or m._forward_pre_hooks))

    def _fused_input_params(self) -> list[Tensor] | None:
        """The input projections' weights in the fused order (q, k, v, gate, learning-rate gate), or None
        when they are not all plain bias-free ``nn.Linear`` modules without hooks (wrapped, e.g. by an
        adapter or a parametrization: then the concatenation would not compute them)."""
        ws = []
        for name in self._fused_input_names()[:-1]:
            m = self._modules[self._PROJECTIONS[name]]
            if not _plain_linear(m):
                return None
            ws.append(m.weight)
        ws.append(self.learnable_ttt_lr_weight)
        return ws

    def _inference_weights(self) -> _InferenceWeights | None:
        """The values inference derives from the parameters (:class:`_InferenceWeights`), from one cache
        checked once per call; None when some parameter involved does not own its storage (then nothing
        is cached and the plain modules run)."""
        fused = self._fused_input_params() if self.fuse_projections else None
        out = [self.o_proj.weight] if _plain_linear(self.o_proj) else []
        params = [*(fused or []), *out, self.learnable_token_idx]

        def build() -> _InferenceWeights:
            cat = None if fused is None else torch.cat([w.detach().reshape(-1, self.hidden_size)
                                                        for w in fused])
            return _InferenceWeights(cat, token_coefficients(self.learnable_token_idx.detach()), {})

        return self._cached("_inference_cache", params, build)

    def _output_projection(self, y: Tensor, derived: _InferenceWeights | None) -> Tensor:
        """``o_proj(y)``; at inference on the CPU from its packed weight where that applies."""
        m = self.o_proj
        if derived is not None and y.device.type == "cpu" and _plain_linear(m):
            packed = self._packed(derived, "output", m.weight, y.numel() // y.shape[-1])
            if packed is not None:
                return packed_linear(y, packed)
        return m(y)

    def _packed(self, derived: _InferenceWeights, name: str, weight: Tensor,
                rows: int) -> PackedWeight | None:
        """``weight`` (the fused input weight or ``o_proj``'s, derived from the parameters of ``derived``)
        packed for ``rows``-row inputs (``ttt.ops.linear``), or None: where packing does not apply or does
        not pay (fewer than ``PACK_MIN_ROWS`` rows, e.g. decoding), and on the first call with a row count
        (packing costs about two of the GEMM's own packings: a row count seen once would not repay it).
        Kept per row count and thread count, for the last three of each weight, in ``derived`` (so made
        anew when a parameter changes)."""
        if not (self.pack_weights and rows >= PACK_MIN_ROWS and packable(weight, rows)):
            return None
        packs = derived.packs.setdefault(name, {})
        key = (rows, torch.get_num_threads())  # MKL lays a packing out by the whole shape and thread count
        if key not in packs:
            packs[key] = None
            if len(packs) > 3:
                packs.pop(next(iter(packs)))
            return None
        packs[key] = packs.pop(key) or pack_weight(weight, rows)  # (re-inserted: most recently used last)
        return packs[key]

    def _fused_input_names(self) -> tuple[str, ...]:
        return ("q", *(() if self.share_qk else ("k",)), "v", *(("g",) if self.use_gate else ()), "lr")

    def _fused_input_sizes(self) -> list[int]:
        return [self.hidden_size] * (len(self._fused_input_names()) - 1) + [self.num_heads]

    def _cached(self, slot: str, params: list[Tensor], build: Callable[[], Any]) -> Any | None:
        """``build()`` (a value derived from ``params``, for inference), kept in ``self.__dict__[slot]``
        and rebuilt when any of ``params`` changes (in place, which bumps its version, or replaced);
        None when some parameter does not own its storage (then nothing is cached). Copies of the module
        do not carry it (:class:`_Derived`)."""
        if not all(_owns_storage(w) for w in params):
            self.__dict__.pop(slot, None)
            return None
        key = tuple((id(w), w.data_ptr(), w._version, w.dtype, w.device) for w in params)
        cache = self.__dict__.get(slot)
        if cache is None or cache[0] != key:
            with torch.inference_mode(False):  # a normal tensor even when first built in inference mode
                cache = _Derived((key, build()))
            self.__dict__[slot] = cache
        return cache[1]

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, type={self.ttt_layer_type}, "
                f"mini_batch_size={self.mini_batch_size}, ttt_base_lr={self.ttt_base_lr}, "
                f"share_qk={self.share_qk}, use_gate={self.use_gate}")


class TTTLinear(TTTLayer):
    """TTT layer whose hidden state is a linear model (math §1)."""

    def __init__(self, hidden_size: int, num_heads: int, **kwargs) -> None:
        kwargs.setdefault("ttt_base_lr", 1.0)
        super().__init__(hidden_size, num_heads, ttt_layer_type="linear", **kwargs)


class TTTMLP(TTTLayer):
    """TTT layer whose hidden state is a 2-layer MLP with hidden width ``4F`` (math §1)."""

    def __init__(self, hidden_size: int, num_heads: int, **kwargs) -> None:
        kwargs.setdefault("ttt_base_lr", 0.1)
        super().__init__(hidden_size, num_heads, ttt_layer_type="mlp", **kwargs)


