"""ttt.interop: the official PyTorch port's state-dict / config naming."""

from __future__ import annotations

import pytest
import torch
from ttt_model_helpers import VOCAB, build_model

from ttt.interop import (
    OFFICIAL_DEFAULTS,
    OfficialCheckpointError,
    config_from_official,
    export_official,
    load_official,
    load_official_pretrained,
    official_param_shapes,
    save_official,
)

# every test here runs once per CPU scan backend (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("scan_backend")


@pytest.mark.parametrize("tie", [True, False])
def test_export_import_roundtrip_same_logits(variant, tie, tmp_path) -> None:
    model = build_model(*variant, tie_word_embeddings=tie)
    state, config = export_official(model)
    loaded = load_official(state, config)
    x = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    save_official(model, tmp_path)
    again = load_official_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tie


def test_official_names_and_shapes_are_exactly_spec_section_9() -> None:
    """Hand-written from the spec: TTT-MLP with shared Q/K, gate and pre-conv, and TTT-Linear without."""
    d, h, f, b, k, ffn, v = 32, 4, 8, 4, 4, 64, VOCAB
    model = build_model("mlp", "mamba", num_hidden_layers=1)
    state, config = export_official(model)
    s = "model.layers.0.seq_modeling_block."
    expected = {
        "model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d),
        "model.layers.0.seq_norm.weight": (d,), "model.layers.0.ffn_norm.weight": (d,),
        "model.layers.0.mlp.gate_proj.weight": (ffn, d), "model.layers.0.mlp.up_proj.weight": (ffn, d),
        "model.layers.0.mlp.down_proj.weight": (d, ffn),
        "model.layers.0.conv.norm.weight": (d,), "model.layers.0.conv.conv.weight": (d, 1, k),
        "model.layers.0.conv.conv.bias": (d,),
        s + "q_proj.weight": (d, d), s + "v_proj.weight": (d, d), s + "o_proj.weight": (d, d),
        s + "g_proj.weight": (d, d),
        s + "conv_q.weight": (d, 1, k), s + "conv_q.bias": (d,), s + "conv_k.weight": (d, 1, k),
        s + "conv_k.bias": (d,),
        s + "learnable_ttt_lr_weight": (h, 1, d), s + "learnable_ttt_lr_bias": (h, 1),
        s + "learnable_token_idx": (b,), s + "ttt_norm_weight": (h, f), s + "ttt_norm_bias": (h, f),
        s + "post_norm.weight": (d,), s + "post_norm.bias": (d,),
        s + "W1": (h, f, 4 * f), s + "b1": (h, 1, 4 * f), s + "W2": (h, 4 * f, f), s + "b2": (h, 1, f),
    }
    assert {key: tuple(t.shape) for key, t in state.items()} == expected
    assert official_param_shapes(config) == expected
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "rms_norm_eps", "tie_word_embeddings", "rope_theta", "use_gate",
                  "share_qk", "ttt_layer_type", "ttt_base_lr", "mini_batch_size", "pre_conv", "conv_kernel"):
        assert field in config, field
    assert config["ttt_layer_type"] == "mlp"
    assert config["share_qk"] and config["pre_conv"] and config["use_gate"]

    linear = build_model("linear", "transformer", num_hidden_layers=1)
    lstate, _ = export_official(linear)
    assert tuple(lstate[s + "W1"].shape) == (h, f, f) and tuple(lstate[s + "b1"].shape) == (h, 1, f)
    assert tuple(lstate[s + "k_proj.weight"].shape) == (d, d)
    for absent in ("W2", "b2", "g_proj.weight", "conv_q.weight", "conv_k.weight"):
        assert s + absent not in lstate
    assert "model.layers.0.conv.conv.weight" not in lstate


def test_tied_checkpoint_without_lm_head_loads() -> None:
    model = build_model(tie_word_embeddings=True)
    state, config = export_official(model)
    state.pop("lm_head.weight")
    loaded = load_official(state, config)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_clear_errors() -> None:
    model = build_model("mlp", "mamba")
    state, config = export_official(model)
    bad = dict(state)
    bad.pop("model.layers.1.seq_modeling_block.W2")
    with pytest.raises(OfficialCheckpointError, match=r"missing keys .*W2"):
        load_official(bad, config)
    bad = {**state, "model.layers.0.extra.weight": torch.zeros(1)}
    with pytest.raises(OfficialCheckpointError, match=r"unexpected keys .*extra"):
        load_official(bad, config)
    bad = {**state, "model.layers.0.seq_modeling_block.W1": torch.zeros(4, 8, 8)}
    with pytest.raises(OfficialCheckpointError, match=r"shape mismatches .*W1"):
        load_official(bad, config)
    with pytest.raises(OfficialCheckpointError, match="unknown ttt_layer_type"):
        load_official(state, {**config, "ttt_layer_type": "transformer"})
    # a TTT-Linear config against TTT-MLP weights
    with pytest.raises(OfficialCheckpointError, match="W2"):
        load_official(state, {**config, "ttt_layer_type": "linear"})
    assert issubclass(OfficialCheckpointError, ValueError)


def test_official_config_saved_as_a_diff_takes_official_defaults() -> None:
    """Repro: a real official config saved as a diff (no ``tie_word_embeddings``, default True) was
    rejected; fields left out must take the official port's defaults."""
    model = build_model("linear", "transformer", tie_word_embeddings=True)
    state, config = export_official(model)
    diff = {k: v for k, v in config.items() if k not in OFFICIAL_DEFAULTS or OFFICIAL_DEFAULTS[k] != v}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the official model's ids are defaults
        diff.pop(name, None)
    assert "tie_word_embeddings" not in diff and "ttt_layer_type" not in diff
    cfg = config_from_official(diff)
    assert cfg.tie_word_embeddings is True and cfg.bos_token_id == 1 and cfg.eos_token_id == 2
    assert cfg.mini_batch_size == model.config.mini_batch_size
    state.pop("lm_head.weight")
    loaded = load_official(state, diff)
    x = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    # an empty config is the official 1B-style default model
    assert config_from_official({}).hidden_size == 2048


def test_loaded_official_checkpoint_decodes_with_the_cache() -> None:
    """Repro: load_official copied the official default use_cache=False, so generate() recomputed the
    whole prefix for every new token."""
    model = build_model("mlp", "mamba")
    state, config = export_official(model)
    config["use_cache"] = False  # as the official port writes it
    loaded = load_official(state, config)
    assert loaded.config.use_cache is True
    lengths: list[int] = []
    loaded.model.register_forward_pre_hook(lambda mod, args, kw: lengths.append(kw["input_ids"].shape[1]),
                                           with_kwargs=True)
    prompt = torch.randint(0, VOCAB, (1, 6))
    out = loaded.generate(prompt, max_new_tokens=5, do_sample=False)
    assert lengths == [6, 1, 1, 1, 1]  # prefill once, then one token per step
    with torch.no_grad():
        ids = prompt
        for _ in range(5):  # greedy decoding without a cache, recomputing everything
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ids)
