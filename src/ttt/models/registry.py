"""Every architecture of the study by name, at matched parameter counts.

``build_model(arch, size, vocab_size, max_seq_len, **overrides)`` builds one of

* ``"ttt-linear"`` / ``"ttt-mlp"``: :class:`ttt.models.TTTForCausalLM` from
  :func:`ttt.models.presets.get_config` (``backbone="transformer"`` unless overridden);
* ``"transformer"``: ``transformers.LlamaForCausalLM`` (RoPE, SwiGLU, RMSNorm; SDPA attention);
* ``"mamba"``: ``transformers.MambaForCausalLM`` with ``use_mambapy=True`` (see below);
* ``"mamba2"``: ``transformers.Mamba2ForCausalLM`` (its pure-PyTorch chunked scan on CPU).

Size matching (:func:`match_size`)
----------------------------------
The reference is the TTT-Linear model of the same preset (``reference_arch``), counted **without the
token embedding** (Hugging Face's ``num_parameters(exclude_embeddings=True)``; all models tie the LM
head to the embedding, so the vocabulary adds the same count to every architecture). Then

* Transformer: same width, depth and heads as the preset (head dim 64 at the paper sizes); only the
  SwiGLU width ``intermediate_size`` is solved for (rounded to a multiple of 8). The TTT layer's q/k/v/o
  projections equal attention's, so the result stays close to the preset's FFN width.
* Mamba / Mamba-2: same width as the preset; the depth is ``round((target - base) / per_layer)``
  (a Mamba block has about half the parameters of an attention+MLP block, so about twice the
  layers). If that leaves more than 2% error, widths within +-25% of the preset's are tried (steps
  of 8 for Mamba, of head_dim / 2 for Mamba-2, which needs ``expand * width`` divisible by its head
  dim), each with its best depth; the least error wins, ties going to the width nearest the preset's.

Counts come from building the model on the ``meta`` device (no memory, exact by construction);
``match_size`` fits ``base + layers * per_layer`` from two such builds per width.

Mamba on CPU
------------
``transformers`` 5.x's Mamba mixer calls ``mamba_selective_scan``; without the ``mamba_ssm`` CUDA
package that is its PyTorch fallback, which with ``config.use_mambapy=True`` runs
``mambapy.pscan.pscan`` (a parallel Blelloch scan over the sequence) instead of the per-token loop.
This holds on every device (the fused ``mamba_inner_fn`` training shortcut returns ``None`` without
the kernels). ``tests/training/test_registry.py`` checks that ``pscan`` is really called in training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
)

ARCHS = ("ttt-linear", "ttt-mlp", "transformer", "mamba", "mamba2")
TTT_ARCHS = ("ttt-linear", "ttt-mlp")
ARCH_LABELS = {
    "ttt-linear": "TTT-Linear",
    "ttt-mlp": "TTT-MLP",
    "transformer": "Transformer",
    "mamba": "Mamba",
    "mamba2": "Mamba-2",
}
MATCH_TOLERANCE = 0.02  # relative error above which Mamba widths are searched


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` naming the choices for an architecture outside :data:`ARCHS`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {list(ARCHS)}")


def _preset(size: str) -> Any:
    from ttt.models.presets import get_config, list_presets

    if str(size).lower() not in list_presets():
        raise ValueError(f"unknown model size {size!r}; choose from {list_presets()}")
    return get_config(size)


def list_sizes() -> list[str]:
    """Size names accepted by :func:`build_model` (the presets of :mod:`ttt.models.presets`)."""
    from ttt.models.presets import list_presets

    return list_presets()


# --------------------------------------------------------------------------- configs
def _ttt_config(
    arch: str, size: str, vocab_size: int, max_seq_len: int, backbone: str = "transformer", **overrides: Any
) -> Any:
    from ttt.models.presets import get_config

    layer_type = "linear" if arch == "ttt-linear" else "mlp"
    fields = {"vocab_size": vocab_size, "max_position_embeddings": max_seq_len, **overrides}
    return get_config(size, ttt_layer_type=layer_type, backbone=backbone, **fields)


def _llama_config(size: str, vocab_size: int, max_seq_len: int, **overrides: Any) -> LlamaConfig:
    p = _preset(size)
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_attention_heads,
        "max_position_embeddings": max_seq_len,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "use_cache": False,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def _mamba_config(size: str, vocab_size: int, max_seq_len: int, **overrides: Any) -> MambaConfig:
    p = _preset(size)
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": p.hidden_size,
        "num_hidden_layers": 2 * p.num_hidden_layers,
        "state_size": 16,
        "expand": 2,
        "conv_kernel": 4,
        "tie_word_embeddings": True,
        "use_mambapy": True,
        "use_cache": False,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    fields.update(overrides)
    return MambaConfig(**fields)


def _mamba2_head_dim(inner: int) -> int:
    return 64 if inner >= 512 else max(8, inner // 8)


def _mamba2_config(size: str, vocab_size: int, max_seq_len: int, **overrides: Any) -> Mamba2Config:
    p = _preset(size)
    hidden = overrides.get("hidden_size", p.hidden_size)
    expand = overrides.get("expand", 2)
    head_dim = overrides.get("head_dim", _mamba2_head_dim(expand * hidden))
    paper = p.vocab_size >= 32000
    fields: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": 2 * p.num_hidden_layers,
        "expand": expand,
        "head_dim": head_dim,
        "num_heads": expand * hidden // head_dim,
        "n_groups": 1,
        "state_size": 128 if paper else 64,
        "chunk_size": 256,
        "conv_kernel": 4,
        "tie_word_embeddings": True,
        "use_cache": False,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    fields.update(overrides)
    if "hidden_size" in overrides and "num_heads" not in overrides:
        fields["num_heads"] = fields["expand"] * fields["hidden_size"] // fields["head_dim"]
    return Mamba2Config(**fields)


_CONFIGS: dict[str, Callable[..., Any]] = {
    "transformer": _llama_config,
    "mamba": _mamba_config,
    "mamba2": _mamba2_config,
}
_CLASSES: dict[str, type[PreTrainedModel]] = {
    "transformer": LlamaForCausalLM,
    "mamba": MambaForCausalLM,
    "mamba2": Mamba2ForCausalLM,
}


def _config_class(arch: str) -> type:
    from ttt.models import TTTConfig

    return TTTConfig if arch in TTT_ARCHS else {"transformer": LlamaConfig, "mamba": MambaConfig,
                                                "mamba2": Mamba2Config}[arch]


def check_overrides(arch: str, overrides: dict[str, Any]) -> None:
    """Raise ``ValueError`` for override keys that are not fields of ``arch``'s config class."""
    check_arch(arch)
    cls = _config_class(arch)
    valid = {f.name for f in dataclasses.fields(cls)} - {"backbone"}
    bad = sorted(set(overrides) - valid)
    if bad:
        raise ValueError(
            f"unknown key(s) {bad} for arch {arch!r} ({cls.__name__}); valid keys: {sorted(valid)}"
        )


def build_config(
    arch: str,
    size: str,
    vocab_size: int,
    max_seq_len: int,
    match: bool = True,
    reference_arch: str = "ttt-linear",
    backbone: str = "transformer",
    **overrides: Any,
) -> Any:
    """The Hugging Face config of a model (:func:`build_model` builds the model itself).

    Args:
        arch: one of :data:`ARCHS`.
        size: a model size (:func:`list_sizes`: ``tiny, mini, small, 125m, 350m, 760m, 1.3b``).
        vocab_size: the tokenizer's vocabulary size.
        max_seq_len: training context; the Transformer's ``max_position_embeddings``.
        match: for baselines, size them with :func:`match_size` to ``reference_arch`` (explicit
            overrides win); ``False`` keeps the size's own width, depth and FFN width.
        reference_arch: the TTT arch whose non-embedding parameter count baselines match.
        backbone: ``"transformer"`` or ``"mamba"``: the TTT model's backbone (for baselines, the
            backbone of the reference they are matched to).
        **overrides: config fields of the architecture's config class (:func:`check_overrides`).

    Raises:
        ValueError: unknown arch, size or config field.
    """
    check_overrides(arch, overrides)
    if arch in TTT_ARCHS:
        return _ttt_config(arch, size, vocab_size, max_seq_len, backbone=backbone, **overrides)
    fields = dict(overrides)
    if match:
        matched = match_size(arch, size, vocab_size=vocab_size, max_seq_len=max_seq_len,
                             reference_arch=reference_arch, backbone=backbone)
        for key, value in matched.items():
            fields.setdefault(key, value)
    return _CONFIGS[arch](size, vocab_size, max_seq_len, **fields)


def _instantiate(arch: str, config: Any) -> PreTrainedModel:
    if arch in TTT_ARCHS:
        from ttt.models import TTTForCausalLM

        return TTTForCausalLM(config)
    if arch == "transformer":
        config._attn_implementation = "sdpa"
    return _CLASSES[arch](config)


def build_model(arch: str, size: str, vocab_size: int, max_seq_len: int, **options: Any) -> PreTrainedModel:
    """A randomly initialised causal LM of :func:`build_config` ``(arch, size, vocab_size, max_seq_len,
    **options)`` (see there for the options: sizing, backbone, config overrides)."""
    return _instantiate(arch, build_config(arch, size, vocab_size, max_seq_len, **options))


def _meta_count(arch: str, size: str, vocab_size: int, max_seq_len: int, **fields: Any) -> int:
    config = build_config(arch, size, vocab_size, max_seq_len, match=False, **fields)
    with torch.device("meta"):
        model = _instantiate(arch, config)
    return model.num_parameters(exclude_embeddings=True)


def _layers_fit(arch: str, size: str, vocab: int, seq: int, **fields: Any) -> tuple[int, int]:
    """``(base, per_layer)`` non-embedding parameter counts for the given other fields."""
    one = _meta_count(arch, size, vocab, seq, num_hidden_layers=1, **fields)
    two = _meta_count(arch, size, vocab, seq, num_hidden_layers=2, **fields)
    return one - (two - one), two - one


def match_size(
    arch: str,
    size: str,
    vocab_size: int | None = None,
    max_seq_len: int = 2048,
    target_params: int | None = None,
    reference_arch: str = "ttt-linear",
    backbone: str = "transformer",
) -> dict[str, Any]:
    """Config fields giving ``arch`` the non-embedding parameter count of the reference TTT model.

    Args:
        arch: the baseline (``"transformer"``, ``"mamba"``, ``"mamba2"``); TTT archs return ``{}``.
        size: preset name.
        vocab_size: vocabulary (only matters for counting; defaults to the preset's).
        max_seq_len: context (does not change counts).
        target_params: explicit non-embedding target; by default that of ``reference_arch`` at ``size``.
        reference_arch: the TTT arch whose count is matched.
        backbone: the reference model's backbone.

    Returns:
        A dict of config fields (``intermediate_size`` for the Transformer; ``num_hidden_layers`` and
        possibly ``hidden_size`` for Mamba/Mamba-2). The rule is described in the module docstring.
    """
    check_arch(arch)
    if arch in TTT_ARCHS:
        return {}
    p = _preset(size)
    vocab = vocab_size or p.vocab_size
    if target_params is None:
        target_params = _meta_count(reference_arch, size, vocab, max_seq_len, backbone=backbone)
    target = int(target_params)
    if arch == "transformer":
        a = _meta_count(arch, size, vocab, max_seq_len, intermediate_size=8)
        b = _meta_count(arch, size, vocab, max_seq_len, intermediate_size=16)
        per8 = (b - a) / 8
        inter = 8 + (target - a) / per8
        inter = max(8, int(round(inter / 8)) * 8)
        return {"intermediate_size": inter}

    width = p.hidden_size
    head_dim = _mamba2_head_dim(2 * width)
    extra: dict[str, Any] = {"head_dim": head_dim} if arch == "mamba2" else {}

    def best_layers(w: int) -> tuple[int, int]:
        base, per = _layers_fit(arch, size, vocab, max_seq_len, hidden_size=w, **extra)
        layers = max(1, int(round((target - base) / per)))
        return layers, base + layers * per

    layers, count = best_layers(width)
    best = (abs(count - target) / target, 0, width, layers)
    if best[0] > MATCH_TOLERANCE:
        # joint search: widths within +-25% of the preset's (steps of 8, or of head_dim/2 for Mamba-2 so
        # that expand * width stays divisible by the head dim), best depth for each; least error wins,
        # ties go to the width closest to the preset's.
        step = 8 if arch == "mamba" else max(8, head_dim // 2)
        for k in range(1, max(1, width // (4 * step)) + 1):
            for w in (width - k * step, width + k * step):
                if w < step:
                    continue
                n_layers, c = best_layers(w)
                cand = (abs(c - target) / target, k, w, n_layers)
                if cand < best:
                    best = cand
            if best[0] <= MATCH_TOLERANCE / 4:
                break
    return {"num_hidden_layers": best[3], "hidden_size": best[2], **extra}


def model_max_length(model: PreTrainedModel) -> float:
    """Longest sequence the model supports in training (``inf`` for recurrent models)."""
    if isinstance(model.config, LlamaConfig):
        return int(model.config.max_position_embeddings)
    return math.inf


__all__ = [
    "ARCHS",
    "ARCH_LABELS",
    "TTT_ARCHS",
    "build_config",
    "build_model",
    "check_arch",
    "check_overrides",
    "list_sizes",
    "match_size",
    "model_max_length",
]
