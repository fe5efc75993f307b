"""Interoperability with the official PyTorch port of TTT (its parameter and config names).

The official port stores a causal LM as ``model.embed_tokens.weight``, ``model.layers.{i}.<part>``,
``model.norm.weight`` and ``lm_head.weight``, with the TTT layer's parameters under
``model.layers.{i}.seq_modeling_block.`` and its config as a flat ``config.json`` with the fields
``vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, rms_norm_eps,
tie_word_embeddings, rope_theta, use_gate, share_qk, ttt_layer_type, ttt_base_lr, mini_batch_size,
pre_conv, conv_kernel``.

This project's :class:`~ttt.models.TTTForCausalLM` uses the same module names by design, so the mapping
of names is the identity; what this module adds is the *checking*: the full list of expected names and
shapes is derived from the config alone (:func:`official_param_shapes`, written from the port's
naming, not from our model), and loading fails with a clear message on missing or unexpected keys,
shape mismatches, or an unknown ``ttt_layer_type``.

>>> sd, cfg = export_official(model)              # official naming
>>> model2 = load_official(sd, cfg)                 # back into this project's model
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .models.configuration_ttt import TTT_LAYER_TYPES, TTTConfig
from .models.modeling_ttt import TTTForCausalLM

#: config fields of the official port and, for export, the extra ones it also writes
OFFICIAL_CONFIG_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "rms_norm_eps", "tie_word_embeddings", "rope_theta", "use_gate", "share_qk", "ttt_layer_type",
    "ttt_base_lr", "mini_batch_size", "pre_conv", "conv_kernel",
)
_OPTIONAL_CONFIG_FIELDS = ("max_position_embeddings", "initializer_range", "use_cache", "pad_token_id",
                           "bos_token_id", "eos_token_id")
_IGNORED_CONFIG_FIELDS = ("hidden_act", "pretraining_tp", "scan_checkpoint_group_size", "model_type",
                          "architectures", "transformers_version", "torch_dtype", "dtype", "auto_map")
#: defaults of the official port's ``TTTConfig`` (a config saved as a diff omits fields at these values)
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 24,
    "num_attention_heads": 32, "max_position_embeddings": 2048, "initializer_range": 0.02,
    "rms_norm_eps": 1e-6, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": True, "rope_theta": 10000.0, "use_gate": False, "share_qk": False,
    "ttt_layer_type": "linear", "ttt_base_lr": 1.0, "mini_batch_size": 16, "pre_conv": False,
    "conv_kernel": 4,
}
#: non-persistent buffers some exports contain; never parameters
_IGNORED_KEY_SUFFIXES = ("rotary_emb.inv_freq", "token_idx_buffer")


class OfficialCheckpointError(ValueError):
    """A state dict or config does not match the official port's layout for the given config."""


def _cfg_get(config: Mapping[str, Any] | TTTConfig | Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def config_from_official(config: Mapping[str, Any] | Any) -> TTTConfig:
    """A :class:`TTTConfig` from an official-port config (dict, config object, ``config.json`` path)."""
    if isinstance(config, TTTConfig):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    if not isinstance(config, Mapping):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    config = {**OFFICIAL_DEFAULTS, **config}  # fields left out take the official port's defaults
    layer_type = config["ttt_layer_type"]
    if layer_type not in TTT_LAYER_TYPES:
        raise OfficialCheckpointError(f"unknown ttt_layer_type {layer_type!r}; the official port defines "
                                      f"{TTT_LAYER_TYPES}")
    fields = {f: config[f] for f in OFFICIAL_CONFIG_FIELDS}
    fields.update({f: config[f] for f in _OPTIONAL_CONFIG_FIELDS if f in config})
    # the official default use_cache=False would make generate() recompute the whole prefix every token;
    # this model's cache is exact, so loaded checkpoints decode with it
    fields["use_cache"] = True
    group = config.get("scan_checkpoint_group_size")
    if group:
        fields["remat_group_size"] = int(group)
    return TTTConfig(**fields)


def config_to_official(config: TTTConfig) -> dict[str, Any]:
    """The official port's ``config.json`` content for ``config``."""
    out: dict[str, Any] = {"model_type": "ttt", "architectures": ["TTTForCausalLM"]}
    out.update({f: getattr(config, f) for f in OFFICIAL_CONFIG_FIELDS})
    out.update({f: getattr(config, f) for f in _OPTIONAL_CONFIG_FIELDS})
    out.update({"hidden_act": "silu", "pretraining_tp": 1,
                "scan_checkpoint_group_size": int(config.remat_group_size)})
    return out


def official_param_shapes(config: Mapping[str, Any] | Any) -> dict[str, tuple[int, ...]]:
    """Every parameter name of the official port for ``config`` and its shape.

    ``lm_head.weight`` is listed even with tied embeddings (a torch state dict holds both names).
    """
    layer_type = _cfg_get(config, "ttt_layer_type")
    if layer_type not in TTT_LAYER_TYPES:
        raise OfficialCheckpointError(f"unknown ttt_layer_type {layer_type!r}; expected one of "
                                      f"{TTT_LAYER_TYPES}")
    v, d = int(_cfg_get(config, "vocab_size")), int(_cfg_get(config, "hidden_size"))
    ffn, n_layers = int(_cfg_get(config, "intermediate_size")), int(_cfg_get(config, "num_hidden_layers"))
    h = int(_cfg_get(config, "num_attention_heads"))
    f, b, k = d // h, int(_cfg_get(config, "mini_batch_size")), int(_cfg_get(config, "conv_kernel"))
    f1 = f if layer_type == "linear" else 4 * f
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes[p + "seq_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (ffn, d)
        shapes[p + "mlp.up_proj.weight"] = (ffn, d)
        shapes[p + "mlp.down_proj.weight"] = (d, ffn)
        if _cfg_get(config, "pre_conv"):
            shapes[p + "conv.norm.weight"] = (d,)
            shapes[p + "conv.conv.weight"] = (d, 1, k)
            shapes[p + "conv.conv.bias"] = (d,)
        s = p + "seq_modeling_block."
        shapes[s + "q_proj.weight"] = (d, d)
        if not _cfg_get(config, "share_qk"):
            shapes[s + "k_proj.weight"] = (d, d)
        shapes[s + "v_proj.weight"] = (d, d)
        shapes[s + "o_proj.weight"] = (d, d)
        if _cfg_get(config, "use_gate"):
            shapes[s + "g_proj.weight"] = (d, d)
        if _cfg_get(config, "share_qk"):
            for c in ("conv_q", "conv_k"):
                shapes[s + f"{c}.weight"] = (d, 1, k)
                shapes[s + f"{c}.bias"] = (d,)
        shapes[s + "learnable_ttt_lr_weight"] = (h, 1, d)
        shapes[s + "learnable_ttt_lr_bias"] = (h, 1)
        shapes[s + "learnable_token_idx"] = (b,)
        shapes[s + "ttt_norm_weight"] = (h, f)
        shapes[s + "ttt_norm_bias"] = (h, f)
        shapes[s + "post_norm.weight"] = (d,)
        shapes[s + "post_norm.bias"] = (d,)
        shapes[s + "W1"] = (h, f, f1)
        shapes[s + "b1"] = (h, 1, f1)
        if layer_type == "mlp":
            shapes[s + "W2"] = (h, f1, f)
            shapes[s + "b2"] = (h, 1, f)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def _official_to_ours(name: str) -> str:
    """This project's parameter name for an official one (identical by design; the one place to map)."""
    return name


def _ours_to_official(name: str) -> str:
    return name


def check_official_state_dict(state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | Any) -> None:
    """Raise :class:`OfficialCheckpointError` listing missing / unexpected keys and shape mismatches."""
    expected = official_param_shapes(config)
    tied = bool(_cfg_get(config, "tie_word_embeddings"))
    keys = {k for k in state_dict if not k.endswith(_IGNORED_KEY_SUFFIXES)}
    missing = sorted(k for k in expected if k not in keys and not (tied and k == "lm_head.weight"))
    unexpected = sorted(k for k in keys if k not in expected)
    wrong = sorted(f"{k}: expected {expected[k]}, got {tuple(state_dict[k].shape)}"
                   for k in keys if k in expected and tuple(state_dict[k].shape) != expected[k])
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:12]}"
                        f"{' ...' if len(unexpected) > 12 else ''}")
    if wrong:
        problems.append(f"shape mismatches ({len(wrong)}): {wrong[:12]}{' ...' if len(wrong) > 12 else ''}")
    if problems:
        raise OfficialCheckpointError("state dict does not match the official TTT layout for this config ("
                                      f"ttt_layer_type={_cfg_get(config, 'ttt_layer_type')!r}, "
                                      f"share_qk={_cfg_get(config, 'share_qk')}, "
                                      f"pre_conv={_cfg_get(config, 'pre_conv')}, "
                                      f"use_gate={_cfg_get(config, 'use_gate')}): " + "; ".join(problems))


def load_official(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | Any, dtype: torch.dtype | None = None
) -> TTTForCausalLM:
    """Build a :class:`TTTForCausalLM` from an official-port state dict and config.

    Args:
        state_dict: parameters named as in the official port (``lm_head.weight`` may be absent with tied
            embeddings).
        config: the official config (dict, object, or path to ``config.json`` / its directory).
        dtype: parameter dtype of the model (default: fp32).
    """
    cfg = config_from_official(config)
    check_official_state_dict(state_dict, cfg)
    model = TTTForCausalLM(cfg)
    ours = {_official_to_ours(k): v for k, v in state_dict.items() if not k.endswith(_IGNORED_KEY_SUFFIXES)}
    if cfg.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    result = model.load_state_dict(ours, strict=False)
    missing = [k for k in result.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:  # cannot happen after the check above unless the model changed
        raise OfficialCheckpointError(f"internal name mapping error: missing {missing}, "
                                      f"unexpected {result.unexpected_keys}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def export_official(model: TTTForCausalLM) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, config_dict)`` of ``model`` in the official port's naming (tensors are copies)."""
    if not isinstance(model, TTTForCausalLM):
        raise TypeError(f"export_official expects a TTTForCausalLM, got {type(model).__name__}")
    state = {_ours_to_official(k): v.detach().clone() for k, v in model.state_dict().items()}
    config = config_to_official(model.config)
    check_official_state_dict(state, config)
    return state, config


def save_official(model: TTTForCausalLM, directory: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` in the official port's naming."""
    from safetensors.torch import save_file

    state, config = export_official(model)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # safetensors refuses shared storage; tied anyway
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"))


def load_official_pretrained(directory: str | os.PathLike, dtype: torch.dtype | None = None
                             ) -> TTTForCausalLM:
    """Load an official-port checkpoint directory (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``)."""
    directory = os.fspath(directory)
    st = os.path.join(directory, "model.safetensors")
    pt = os.path.join(directory, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.torch import load_file

        state = load_file(st)
    elif os.path.exists(pt):
        state = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {directory}")
    return load_official(state, os.path.join(directory, "config.json"), dtype=dtype)


__all__ = [
    "OFFICIAL_CONFIG_FIELDS",
    "OFFICIAL_DEFAULTS",
    "OfficialCheckpointError",
    "check_official_state_dict",
    "config_from_official",
    "config_to_official",
    "export_official",
    "load_official",
    "load_official_pretrained",
    "official_param_shapes",
    "save_official",
]
