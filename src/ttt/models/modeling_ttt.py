"""The TTT language model as a Hugging Face model (docs/math.md §7): ``TTTModel`` and ``TTTForCausalLM``.

Block: optional pre-conv ``h = h + conv(RMSNorm(h))``; ``h = h + TTT(RMSNorm(h))``;
``h = h + SwiGLU(RMSNorm(h))``. Model: token embedding, blocks, final RMSNorm, LM head (optionally tied).
Module names follow the official PyTorch port (``model.layers.{i}.seq_modeling_block.W1``,
``seq_norm``, ``ffn_norm``, ``mlp.gate_proj``, ``conv.conv.weight``, ...), as in the official port.

Padding and packing: the model regroups the tokens of each forward into compact right-padded
segments (:mod:`ttt.ops.layout`): a row's padding tokens (``attention_mask == 0``, any position) are
dropped before the blocks, and packed documents (``position_ids`` restarting at 0 inside a row) are cut
into segments that each start from a fresh state. Outputs are scattered back to their original
positions (padding positions get zero hidden states / logits). The regrouping only happens when needed;
an all-real, unpacked batch runs as is.

Cache: :class:`~ttt.models.TTTCache` holds, per block, the TTT state and the pre-conv buffer. A forward
with a cache continues each row where the previous call stopped, so a sequence may be fed in any split
into chunks (prefill in pieces, then one token at a time) and gives the same outputs as one forward.
With packed documents and a cache, each row's first segment continues the cached state and the cache
returned holds the state after each row's last document.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import fields, is_dataclass, replace

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from ..layers import TTTLayer, TTTLayerState
from ..ops.conv import causal_conv1d
from ..ops.layout import (
    SegmentLayout,
    build_layout,
    document_starts,
    position_ids_from_cu_seqlens,
    real_token_mask,
)
from ..ops.norm import rms_norm
from ..ops.swiglu import swiglu
from .cache_ttt import CACHE_KEY, TTTCache
from .configuration_ttt import TTTConfig
from .training_run import find_training_checkpoint, verify_weights

logger = logging.get_logger(__name__)


class TTTRMSNorm(nn.Module):
    """RMSNorm with a learned scale, computed in fp32 (docs/math.md §7, eps 1e-6)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class TTTSwiGLU(nn.Module):
    """Feed-forward network ``down(silu(gate(x)) * up(x))`` (no biases)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        # inference: in the gate projection's buffer (no fresh [.., FFN] tensor)
        return self.down_proj(swiglu(gate, up, inplace=not torch.is_grad_enabled()))


class TTTPreConv(nn.Module):
    """``conv(RMSNorm(h))``: a depthwise causal convolution with bias, streaming its last ``K-1`` inputs."""

    def __init__(self, hidden_size: int, kernel: int, eps: float) -> None:
        super().__init__()
        self.norm = TTTRMSNorm(hidden_size, eps)
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel, groups=hidden_size, bias=True)

    def forward(self, h: Tensor, state: Tensor | None = None, lengths: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        return causal_conv1d(self.norm(h), self.conv.weight, self.conv.bias, state, lengths)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        w = self.conv.weight
        return torch.zeros(batch_size, w.shape[0], w.shape[-1] - 1, device=device or w.device, dtype=w.dtype)


class TTTBlock(GradientCheckpointingLayer):
    """One residual block of the TTT language model (docs/math.md §7)."""

    def __init__(self, config: TTTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.conv = TTTPreConv(d, config.conv_kernel, config.rms_norm_eps) if config.pre_conv else None
        self.seq_norm = TTTRMSNorm(d, config.rms_norm_eps)
        self.seq_modeling_block = TTTLayer(
            d,
            config.num_attention_heads,
            ttt_layer_type=config.ttt_layer_type,
            mini_batch_size=config.mini_batch_size,
            ttt_base_lr=config.ttt_base_lr,
            share_qk=config.share_qk,
            use_gate=config.use_gate,
            conv_kernel=config.conv_kernel,
            rope_theta=config.rope_theta,
            remat_group_size=config.remat_group_size,
            scan_backend=config.scan_backend,
        )
        self.ffn_norm = TTTRMSNorm(d, config.rms_norm_eps)
        self.mlp = TTTSwiGLU(d, config.intermediate_size)

    def forward(
        self,
        hidden_states: Tensor,
        layer_state: TTTLayerState | None = None,
        conv_state: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, TTTLayerState, Tensor | None]:
        """Returns ``(hidden_states, new TTT state, new pre-conv buffer or None)``."""
        h = hidden_states
        new_conv = None
        if self.conv is not None:
            y, new_conv = self.conv(h, conv_state, lengths)
            h = h + y
        y, new_state = self.seq_modeling_block(self.seq_norm(h), layer_state, lengths)
        h = h + y
        h = h + self.mlp(self.ffn_norm(h))
        return h, new_state, new_conv


def _where_state(keep: Tensor, a: TTTLayerState, b: TTTLayerState) -> TTTLayerState:
    """Row-wise ``a if keep[row] else b`` for two layer states of the same batch size."""

    def pick(x: object, y: object) -> object:
        if isinstance(x, Tensor):
            k = keep.to(x.device).view(-1, *([1] * (x.dim() - 1)))
            return torch.where(k, x, y.to(device=x.device, dtype=x.dtype))
        if is_dataclass(x) and not isinstance(x, type):
            return replace(x, **{f.name: pick(getattr(x, f.name), getattr(y, f.name)) for f in fields(x)})
        return x

    return pick(a, b)


def _rows_starting_fresh(position_ids: Tensor | None, real: Tensor | None, bsz: int, length: int
                         ) -> Tensor | None:
    """``[B]`` bool: rows whose first real token has position 0 (a new document; None if no row does)."""
    if position_ids is None:
        return None
    pos = (position_ids.unsqueeze(0) if position_ids.dim() == 1 else position_ids).expand(bsz, length)
    if real is None:
        first = pos[:, 0] == 0
    else:
        idx = real.long().argmax(1, keepdim=True)  # first real token (0 for an all-padding row)
        first = (pos.gather(1, idx).squeeze(1) == 0) & real.any(1)
    return first if bool(first.any()) else None


def _state_requires_grad(state: TTTLayerState | None, conv: Tensor | None) -> bool:
    if state is None:
        return conv is not None and conv.requires_grad
    tensors = (*state.inner.weights(), *state.inner.grads(), state.conv_q, state.conv_k, conv)
    return any(t is not None and t.requires_grad for t in tensors)


def _check_checkpointing(block: TTTBlock, state: TTTLayerState | None, conv: Tensor | None) -> None:
    """Refuse reentrant gradient checkpointing through a carried state that needs gradients.

    Reentrant ``torch.utils.checkpoint`` only sees tensor arguments, so the gradient reaching a carried
    :class:`TTTCache` (truncated back-propagation through time) would silently be dropped.
    """
    if not (block.gradient_checkpointing and block.training and torch.is_grad_enabled()):
        return
    func = getattr(block, "_gradient_checkpointing_func", None)
    reentrant = getattr(func, "keywords", {}).get("use_reentrant", True)
    if reentrant and _state_requires_grad(state, conv):
        raise ValueError("reentrant gradient checkpointing cannot back-propagate into a carried TTTCache "
                         "state; enable it with gradient_checkpointing_kwargs={'use_reentrant': False} "
                         "(or detach the cache)")


# Keyword arguments of the transformers attention/cache plumbing that a recurrent model has no use for.
_IGNORED_KWARGS = ("cu_seq_lens_k", "max_length_q", "max_length_k", "cache_position", "output_attentions")
# Keyword arguments forwarded to ``self.loss_function``.
_LOSS_KWARGS = frozenset({"num_items_in_batch", "ignore_index", "shift_labels"})


def _one_cache(cache: TTTCache | None, past_key_values: TTTCache | None) -> TTTCache | None:
    """The cache passed as ``cache`` (transformers >= 5.24) or as its older name ``past_key_values``."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("pass the cache once: as `cache` (or the older name `past_key_values`), not both")
    return past_key_values


class TTTPreTrainedModel(PreTrainedModel):
    """Weight initialisation (docs/math.md §7) and Hugging Face plumbing shared by the TTT models."""

    config_class = TTTConfig
    config: TTTConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TTTBlock"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _is_stateful = True
    _supports_sdpa = False
    _supports_flash_attn = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """``PreTrainedModel.from_pretrained``, which also accepts a ``ttt train`` run directory (its
        latest checkpoint) or one of its checkpoint directories; the model then decodes with the cache.
        """
        ckpt = (find_training_checkpoint(pretrained_model_name_or_path)
                if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) else None)
        if ckpt is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        meta = verify_weights(ckpt)
        fields = dict(meta.get("model_config") or {})
        if fields.get("model_type") != TTTConfig.model_type:
            raise ValueError(f"checkpoint {ckpt} holds a {meta.get('arch') or fields.get('model_type')!r} "
                             f"model, not a TTT model")
        config = kwargs.pop("config", None)
        if config is None:
            config = TTTConfig.from_dict(fields)
            config.use_cache = True  # trained with use_cache=False; inference decodes with the cache
        with tempfile.TemporaryDirectory() as tmp:  # a standard HF layout pointing at the checkpoint
            os.symlink(os.path.abspath(ckpt / "model.safetensors"), os.path.join(tmp, "model.safetensors"))
            config.save_pretrained(tmp)
            return super().from_pretrained(tmp, *model_args, config=config, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Conv1d):
            # PyTorch's default for the depthwise convolutions (the official port does not re-initialise them)
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight.shape[2]
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, TTTRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, TTTLayer):
            init.normal_(module.learnable_ttt_lr_weight, mean=0.0, std=std)
            init.zeros_(module.learnable_ttt_lr_bias)
            init.zeros_(module.learnable_token_idx)
            init.ones_(module.ttt_norm_weight)
            init.zeros_(module.ttt_norm_bias)
            init.normal_(module.W1, mean=0.0, std=std)
            init.zeros_(module.b1)
            if module.ttt_layer_type == "mlp":
                init.normal_(module.W2, mean=0.0, std=std)
                init.zeros_(module.b2)
        else:
            super()._init_weights(module)


class TTTModel(TTTPreTrainedModel):
    """Token embedding, TTT blocks and the final RMSNorm; returns hidden states (and the cache)."""

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TTTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = TTTRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    # ------------------------------------------------------------------ checks
    def _check_inputs(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> tuple[int, int]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
            if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
                raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
            bsz, length = input_ids.shape
            if bsz > 0 and length > 0:
                lo, hi = int(input_ids.min()), int(input_ids.max())
                if lo < 0 or hi >= self.config.vocab_size:
                    bad = lo if lo < 0 else hi
                    raise ValueError(f"token id {bad} is outside the vocabulary "
                                     f"[0, {self.config.vocab_size})")
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, length, {self.config.hidden_size}], "
                                 f"got shape {tuple(inputs_embeds.shape)}")
            bsz, length = inputs_embeds.shape[:2]
        if bsz == 0 or length == 0:
            raise ValueError(f"empty input: got batch size {bsz} and length {length}; need at least one "
                             "token")
        return bsz, length

    @staticmethod
    def _check_cache(cache: object, bsz: int, length: int, attention_mask: Tensor | None) -> None:
        if not isinstance(cache, TTTCache):
            raise TypeError(f"{CACHE_KEY} must be a ttt.models.TTTCache (or None), got "
                            f"{type(cache).__name__}; TTT models keep a recurrent state, not keys/values")
        if cache.is_initialized and cache.batch_size != bsz:
            raise ValueError(f"the cache holds {cache.batch_size} rows but the input has {bsz}")
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed = {length, cache.seen_tokens + length}
            if attention_mask.shape[1] not in allowed:
                raise ValueError(f"attention_mask has {attention_mask.shape[1]} columns; with a cache "
                                 f"that has seen {cache.seen_tokens} tokens and {length} new tokens it "
                                 f"must have {length} (new tokens only) or {cache.seen_tokens + length} "
                                 "(all tokens)")

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: TTTCache | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: TTTCache | None = None,
        cu_seqlens: Tensor | None = None,
        cu_seq_lens_q: Tensor | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the blocks.

        Args:
            input_ids: ``[B, L]`` token ids (or ``inputs_embeds [B, L, D]``).
            attention_mask: ``[B, L]`` or, with a cache, ``[B, seen + L]``; 0 marks padding tokens (at any
                position), which touch no state and get zero outputs.
            position_ids: ``[B, L]`` or ``[1, L]``; a real token (other than a row's first) whose position
                is 0 starts a new packed document (fresh TTT state, conv buffers and mini-batch position).
                Instead, ``cu_seqlens`` (or ``cu_seq_lens_q``) ``[0, n_1, n_1 + n_2, ..., L]`` may describe
                the documents of a single flattened row.
            cache: a :class:`TTTCache` to continue from; updated in place and returned. Its older
                ``transformers`` name ``past_key_values`` is accepted too.
            use_cache: return the cache (default: ``config.use_cache`` in eval mode, False in training).
        """
        cache = _one_cache(cache, past_key_values)
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if use_cache is None:
            use_cache = self.config.use_cache if not self.training else cache is not None

        bsz, length = self._check_inputs(input_ids, inputs_embeds)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2-D [batch, length] (0 = padding), got shape "
                             f"{tuple(attention_mask.shape)}")
        if cache is not None:
            self._check_cache(cache, bsz, length, attention_mask)
        elif attention_mask is not None and tuple(attention_mask.shape) != (bsz, length):
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match the input "
                             f"[{bsz}, {length}]")
        if use_cache and cache is None:
            cache = TTTCache(len(self.layers))

        cu_seqlens = cu_seqlens if cu_seqlens is not None else cu_seq_lens_q
        if cu_seqlens is not None and position_ids is None:
            position_ids = position_ids_from_cu_seqlens(cu_seqlens, bsz, length)
        real = real_token_mask(attention_mask, bsz, length)
        if real is not None and not bool(real.any()):
            raise ValueError("attention_mask marks every token of the batch as padding: nothing to run")
        restarts = document_starts(position_ids, real, bsz, length)
        layout = build_layout(real, restarts, bsz, length)
        # with a carried state, a row whose first token has position 0 starts a new document here
        fresh_rows = (_rows_starting_fresh(position_ids, real, bsz, length)
                      if cache is not None and cache.is_initialized else None)

        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        lengths = None
        if layout is not None:
            hidden = layout.pack(hidden)
            lengths = layout.lengths

        all_hidden: list[Tensor] = []
        for i, block in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            state_in, conv_in = self._incoming_state(block, cache, i, layout, hidden, fresh_rows)
            _check_checkpointing(block, state_in, conv_in)
            hidden, state, conv_state = block(hidden, state_in, conv_in, lengths)
            if use_cache:
                state, conv_state = self._outgoing_state(state, conv_state, layout)
                cache.update(i, state, conv_state)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        if use_cache:
            cache.seen_tokens += length

        if layout is not None:
            hidden = layout.unpack(hidden)
            all_hidden = [layout.unpack(h) for h in all_hidden]
        hidden_states = tuple(all_hidden) if output_hidden_states else None
        out_cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden, out_cache, hidden_states) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden, hidden_states=hidden_states,
                                       **{CACHE_KEY: out_cache})

    @staticmethod
    def _incoming_state(block: TTTBlock, cache: TTTCache | None, idx: int, layout: SegmentLayout | None,
                        hidden: Tensor, fresh_rows: Tensor | None = None
                        ) -> tuple[TTTLayerState | None, Tensor | None]:
        """States the block starts from: the cached rows' (first segments) or fresh ones.

        ``fresh_rows [B]`` marks rows whose first token starts a new document: they drop the cached state.
        """
        state = conv = None
        if cache is not None and idx < len(cache) and cache.layer_states[idx] is not None:
            state, conv = cache.layer_states[idx], cache.conv_states[idx]
        if state is None:
            return state, conv
        if layout is None or layout.is_one_segment_per_row:
            if fresh_rows is None:
                return state, conv
            keep, rows = ~fresh_rows, None
        else:
            # packed documents continuing a cache: row's first segment continues it, the others start fresh
            rows = layout.rows
            keep = layout.first if fresh_rows is None else layout.first & ~fresh_rows.index_select(0, rows)
        n = keep.shape[0]
        fresh = block.seq_modeling_block.init_state(n, device=hidden.device)
        if rows is not None:
            state = state.index_select(rows)
            conv = None if conv is None else conv.index_select(0, rows)
        state = _where_state(keep, state, fresh)
        if conv is not None:
            conv = torch.where(keep.view(-1, 1, 1), conv, torch.zeros_like(conv[:1]))
        return state, conv

    @staticmethod
    def _outgoing_state(state: TTTLayerState, conv: Tensor | None, layout: SegmentLayout | None
                        ) -> tuple[TTTLayerState, Tensor | None]:
        """Per-row states after the call: the state after each row's last segment."""
        if layout is None or layout.is_one_segment_per_row:
            return state, conv
        idx = layout.last_segment
        return state.index_select(idx), None if conv is None else conv.index_select(0, idx)


class TTTForCausalLM(TTTPreTrainedModel, GenerationMixin):
    """TTT language model with an LM head; ``labels`` give the shifted next-token cross-entropy."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: TTTConfig) -> None:
        super().__init__(config)
        self.model = TTTModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def set_ttt_base_lr(self, value: float) -> None:
        """Set the inner base learning rate of every TTT layer (e.g. the TTT-MLP inner-LR warmup)."""
        value = float(value)
        if not value > 0:
            raise ValueError(f"ttt_base_lr must be > 0, got {value}")
        for block in self.model.layers:
            block.seq_modeling_block.ttt_base_lr = value
        self.config.ttt_base_lr = value

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: TTTCache | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        past_key_values: TTTCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for every position; with ``labels [B, L]`` also the mean next-token cross-entropy.

        Labels are shifted inside (``labels[:, t+1]`` is the target of position ``t``); -100 is ignored.
        See :meth:`TTTModel.forward` for padding, packing and the cache. Other keyword arguments are
        those of the ``transformers`` loss function (``num_items_in_batch``) and of its attention
        plumbing that a recurrent model does not need (flash-attention lengths, ``cache_position``);
        anything else is an error rather than silently ignored.
        """
        cache = _one_cache(cache, past_key_values)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        packing = {k: kwargs.pop(k) for k in ("cu_seqlens", "cu_seq_lens_q") if k in kwargs}
        for k in _IGNORED_KWARGS:
            kwargs.pop(k, None)
        unknown = sorted(set(kwargs) - _LOSS_KWARGS)
        if unknown:
            raise TypeError(f"TTTForCausalLM.forward got unexpected keyword arguments {unknown}")
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **packing,
        )
        hidden = outputs.last_hidden_state
        if labels is not None and tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match the input "
                             f"{tuple(hidden.shape[:2])}")
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:, :] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep, :]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits for every position; do not combine them with "
                                 "logits_to_keep")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size,
                                      **kwargs)
        out_cache = outputs[CACHE_KEY] if CACHE_KEY in outputs else None
        if not return_dict:
            out = tuple(v for v in (logits, out_cache, outputs.hidden_states) if v is not None)
            return (loss, *out) if loss is not None else out
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **{CACHE_KEY: out_cache})

    # -------------------------------------------------------------- generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode,
                                      batch_size: int, max_cache_length: int) -> None:
        """``generate`` keeps a :class:`TTTCache` under :data:`CACHE_KEY` (created here, filled lazily)."""
        if CACHE_KEY != "past_key_values" and "past_key_values" in model_kwargs:
            if CACHE_KEY in model_kwargs:
                raise ValueError("pass the cache once: as `cache` (or the older name `past_key_values`)")
            model_kwargs[CACHE_KEY] = model_kwargs.pop("past_key_values")
        cache = model_kwargs.get(CACHE_KEY)
        if cache is not None:
            if not isinstance(cache, TTTCache):
                raise TypeError(f"{CACHE_KEY} must be a ttt.models.TTTCache, got {type(cache).__name__}")
            cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation is not None:
            logger.warning_once(f"cache_implementation={generation_config.cache_implementation!r} is "
                                "ignored: "
                                "TTT models use their constant-size TTTCache")
        model_kwargs[CACHE_KEY] = TTTCache(self.config.num_hidden_layers)


__all__ = ["TTTBlock", "TTTForCausalLM", "TTTModel", "TTTPreConv", "TTTPreTrainedModel", "TTTRMSNorm",
           "TTTSwiGLU"]
