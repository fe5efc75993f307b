"""Named model sizes: the paper's four (docs/math.md §7) and small ones that train on a CPU.

>>> from ttt.models.presets import get_config
>>> cfg = get_config("125m", ttt_layer_type="mlp", backbone="mamba")
>>> cfg.hidden_size, cfg.ttt_base_lr, cfg.pre_conv
(768, 0.1, True)
"""

from __future__ import annotations

from typing import Any

from .configuration_ttt import TTTConfig

BACKBONES = ("transformer", "mamba")

# name -> (layers, width, heads, FFN width, vocab, context)
_SIZES: dict[str, tuple[int, int, int, int, int, int]] = {
    # paper sizes (vocab 32000, Llama-2 tokenizer)
    "125m": (12, 768, 12, 2048, 32000, 2048),
    "350m": (24, 1024, 16, 2736, 32000, 2048),
    "760m": (24, 1536, 16, 4096, 32000, 2048),
    "1.3b": (24, 2048, 32, 5504, 32000, 2048),
    # CPU sizes (byte-level vocabulary by default; pass vocab_size= for another tokenizer)
    "tiny": (4, 64, 4, 176, 256, 512),  # ~0.2M parameters
    "mini": (4, 128, 4, 512, 256, 512),  # ~1.1M
    "small": (6, 256, 8, 688, 256, 1024),  # ~4.9M
}

PAPER_PRESETS = ("125m", "350m", "760m", "1.3b")
CPU_PRESETS = ("tiny", "mini", "small")

DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1}


def list_presets() -> list[str]:
    """Names accepted by :func:`get_config`."""
    return list(_SIZES)


def backbone_flags(backbone: str) -> dict[str, bool]:
    """Config fields of a backbone: ``"mamba"`` = pre-conv + shared Q/K with convs + output gate."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    on = backbone == "mamba"
    return {"pre_conv": on, "share_qk": on, "use_gate": on}


def get_config(
    name: str, ttt_layer_type: str = "linear", backbone: str = "transformer", **overrides: Any
) -> TTTConfig:
    """The :class:`TTTConfig` of a named size.

    Args:
        name: one of ``125m, 350m, 760m, 1.3b`` (paper) or ``tiny, mini, small`` (CPU-sized).
        ttt_layer_type: ``"linear"`` or ``"mlp"``; sets ``ttt_base_lr`` to 1.0 / 0.1 unless overridden.
        backbone: ``"transformer"`` or ``"mamba"`` (sets ``pre_conv``, ``share_qk``, ``use_gate``; each can
            still be overridden individually).
        **overrides: any :class:`TTTConfig` field (``vocab_size=...``, ``mini_batch_size=...``, ...).
    """
    key = str(name).lower()
    if key not in _SIZES:
        raise ValueError(f"unknown preset {name!r}; choose from {list_presets()}")
    layers, width, heads, ffn, vocab, context = _SIZES[key]
    fields: dict[str, Any] = {
        "num_hidden_layers": layers,
        "hidden_size": width,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": context,
        "ttt_layer_type": ttt_layer_type,
        "ttt_base_lr": DEFAULT_BASE_LR.get(ttt_layer_type, 1.0),  # TTTConfig rejects other layer types
        "mini_batch_size": 16,
        "tie_word_embeddings": True,
        **backbone_flags(backbone),
    }
    fields.update(overrides)
    return TTTConfig(**fields)


__all__ = ["BACKBONES", "CPU_PRESETS", "PAPER_PRESETS", "backbone_flags", "get_config", "list_presets"]
