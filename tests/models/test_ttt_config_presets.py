"""TTTConfig validation and the named presets."""

from __future__ import annotations

import pytest
import torch

from ttt.models import TTTConfig, TTTForCausalLM, get_config, list_presets
from ttt.models.presets import CPU_PRESETS, PAPER_PRESETS


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_size": 66, "num_attention_heads": 5}, "divisible"),
        ({"hidden_size": 64, "num_attention_heads": 5}, "divisible"),
        ({"hidden_size": 36, "num_attention_heads": 4}, "even"),
        ({"ttt_layer_type": "rnn"}, "ttt_layer_type"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"vocab_size": -3}, "vocab_size"),
        ({"conv_kernel": 0}, "conv_kernel"),
        ({"ttt_base_lr": 0.0}, "ttt_base_lr"),
        ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
        ({"remat_group_size": -1}, "remat_group_size"),
    ],
)
def test_bad_config_values_raise_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TTTConfig(**fields)


def test_config_defaults_and_official_fields() -> None:
    cfg = TTTConfig()
    assert cfg.model_type == "ttt"
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "use_gate",
                 "share_qk", "ttt_layer_type", "ttt_base_lr", "mini_batch_size", "pre_conv", "conv_kernel",
                 "max_position_embeddings", "initializer_range", "remat_group_size"):
        assert hasattr(cfg, name), name
    assert cfg.head_dim == 64 and cfg.backbone == "transformer" and cfg.initializer_range == 0.02
    # fields of the official port that have no effect here are accepted
    cfg = TTTConfig(hidden_act="silu", pretraining_tp=1, scan_checkpoint_group_size=2)
    assert cfg.remat_group_size == 2


def test_config_save_load(tmp_path) -> None:
    cfg = get_config("tiny", ttt_layer_type="mlp", backbone="mamba", vocab_size=99)
    cfg.save_pretrained(tmp_path)
    loaded = TTTConfig.from_pretrained(tmp_path)
    for key, value in cfg.to_dict().items():
        assert loaded.to_dict()[key] == value, key
    assert loaded.backbone == "mamba" and loaded.vocab_size == 99 and loaded.ttt_base_lr == 0.1


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_match_spec_table(name: str) -> None:
    table = {"125m": (12, 768, 12, 2048), "350m": (24, 1024, 16, 2736), "760m": (24, 1536, 16, 4096),
             "1.3b": (24, 2048, 32, 5504)}
    cfg = get_config(name)
    shape = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size)
    assert shape == table[name]
    assert cfg.vocab_size == 32000 and cfg.mini_batch_size == 16


def test_125m_parameter_count_on_meta_device() -> None:
    with torch.device("meta"):
        model = TTTForCausalLM(get_config("125m"))
    n = sum(p.numel() for p in model.parameters())
    assert 100e6 < n < 140e6


@pytest.mark.parametrize("name", CPU_PRESETS)
@pytest.mark.parametrize("layer_type", ["linear", "mlp"])
@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
def test_cpu_presets_sizes(name: str, layer_type: str, backbone: str) -> None:
    cfg = get_config(name, ttt_layer_type=layer_type, backbone=backbone)
    n = sum(p.numel() for p in TTTForCausalLM(cfg).parameters())
    lo, hi = {"tiny": (0.15e6, 0.35e6), "mini": (0.8e6, 1.5e6), "small": (4e6, 6e6)}[name]
    assert lo < n < hi, n
    assert cfg.ttt_base_lr == (1.0 if layer_type == "linear" else 0.1)
    assert cfg.backbone == backbone


def test_preset_overrides_and_errors() -> None:
    cfg = get_config("small", backbone="mamba", use_gate=False, vocab_size=1000, mini_batch_size=8)
    assert (cfg.pre_conv, cfg.share_qk, cfg.use_gate) == (True, True, False) and cfg.backbone == "custom"
    assert cfg.vocab_size == 1000 and cfg.mini_batch_size == 8
    assert get_config("125M").hidden_size == 768
    assert set(PAPER_PRESETS + CPU_PRESETS) <= set(list_presets())
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="backbone"):
        get_config("tiny", backbone="rwkv")
    with pytest.raises(ValueError, match="ttt_layer_type"):
        get_config("tiny", ttt_layer_type="attention")
