"""Configuration of the TTT language model (docs/math.md §7, field names of the official port)."""

from __future__ import annotations

import sys
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from ..ops.scan import BACKENDS

TTT_LAYER_TYPES = ("linear", "mlp")
SCAN_BACKENDS = ("auto", *BACKENDS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@strict
class TTTConfig(PreTrainedConfig):
    r"""Configuration of a :class:`~ttt.models.TTTForCausalLM` (a stack of TTT blocks, docs/math.md §7).

    Field names follow the official PyTorch port of the TTT paper, so its ``config.json`` loads as is.

    Args:
        vocab_size: number of token ids.
        hidden_size: model width ``D``.
        intermediate_size: hidden width of the SwiGLU feed-forward network.
        num_hidden_layers: number of blocks.
        num_attention_heads: TTT heads ``H``; ``hidden_size / H`` must be an even integer.
        rms_norm_eps: epsilon of the block / final RMSNorms.
        initializer_range: std of the N(0, std) initialisation of linear, embedding and inner weights.
        max_position_embeddings: nominal training context (informational; TTT has no position table and
            runs on any length).
        tie_word_embeddings: share the LM head with the token embedding.
        rope_theta: rotary base (positions are taken modulo ``mini_batch_size``).
        use_gate: output gate ``gelu_tanh(g_proj(x))`` inside the TTT layer (Mamba backbone).
        share_qk: one ``q_proj`` followed by two causal convs for Q and K (Mamba backbone).
        pre_conv: ``h = h + conv(RMSNorm(h))`` before the TTT layer in every block (Mamba backbone).
        conv_kernel: kernel of the pre-conv and the Q/K convs.
        ttt_layer_type: ``"linear"`` (TTT-Linear) or ``"mlp"`` (TTT-MLP).
        ttt_base_lr: base inner learning rate (1.0 linear, 0.1 MLP in the paper's recipes).
        mini_batch_size: TTT mini-batch size ``b``.
        remat_group_size: the inner scan's backward restarts from a saved inner state every that
            many mini-batches (0: about ``sqrt`` of their number); whole blocks are checkpointed with
            the standard ``gradient_checkpointing_enable()`` switch.
        scan_backend: ``"auto"`` (``$TTT_SCAN_BACKEND`` if set, else the fastest for the device),
            ``"torch"``, ``"cpp"`` or ``"triton"`` (see :mod:`ttt.ops.scan`).
        use_cache: return a :class:`~ttt.models.TTTCache` from ``forward`` by default (inference).
    """

    model_type = "ttt"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    use_gate: bool = False
    share_qk: bool = False
    pre_conv: bool = False
    conv_kernel: int = 4
    ttt_layer_type: str = "linear"
    ttt_base_lr: float = 1.0
    mini_batch_size: int = 16
    remat_group_size: int = 0
    scan_backend: str = "auto"
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Fields of the official port that have no effect here: accepted and dropped.
        for name in ("hidden_act", "pretraining_tp", "scan_checkpoint_group_size"):
            value = kwargs.pop(name, None)
            if name == "scan_checkpoint_group_size" and value and not self.remat_group_size:
                self.remat_group_size = int(value)
        if isinstance(self.rope_theta, int) and not isinstance(self.rope_theta, bool):
            self.rope_theta = float(self.rope_theta)
        for name in ("rms_norm_eps", "initializer_range", "ttt_base_lr"):
            value = getattr(self, name)
            if _is_int(value):
                setattr(self, name, float(value))
        self._check_values()
        super().__post_init__(**kwargs)
        # first config created: make the model classes known to AutoModel / AutoModelForCausalLM. Looked up
        # without an import: the exported copy of this file (ttt.models.remote_code) has no such package
        # and relies on the config's auto_map instead.
        register = getattr(sys.modules.get(__name__.rpartition(".")[0]), "register_auto_classes", None)
        if register is not None:
            register()

    def _check_values(self) -> None:
        """Raise a clear ``ValueError`` for inconsistent values."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "mini_batch_size", "conv_kernel", "max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"TTTConfig.{name} must be an integer >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"TTTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"the head dim hidden_size/num_attention_heads = "
                             f"{self.hidden_size // self.num_attention_heads} must be even (rotary "
                             "embedding)")
        if self.ttt_layer_type not in TTT_LAYER_TYPES:
            raise ValueError(f"TTTConfig.ttt_layer_type must be one of {TTT_LAYER_TYPES}, "
                             f"got {self.ttt_layer_type!r}")
        if not self.ttt_base_lr > 0:
            raise ValueError(f"TTTConfig.ttt_base_lr must be > 0, got {self.ttt_base_lr!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"TTTConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not self.initializer_range > 0:
            raise ValueError(f"TTTConfig.initializer_range must be > 0, got {self.initializer_range!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"TTTConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if not _is_int(self.remat_group_size) or self.remat_group_size < 0:
            raise ValueError(f"TTTConfig.remat_group_size must be an integer >= 0, "
                             f"got {self.remat_group_size!r}")
        if self.scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"TTTConfig.scan_backend must be one of {SCAN_BACKENDS}, "
                             f"got {self.scan_backend!r}")

    @property
    def head_dim(self) -> int:
        """Features per TTT head ``F = hidden_size / num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @property
    def backbone(self) -> str:
        """``"mamba"`` (pre-conv + shared Q/K + gate), ``"transformer"`` (none) or ``"custom"``."""
        flags = (self.pre_conv, self.share_qk, self.use_gate)
        if all(flags):
            return "mamba"
        if not any(flags):
            return "transformer"
        return "custom"


__all__ = ["TTTConfig", "TTT_LAYER_TYPES"]
